//! The emulated GPU: device memory is host memory (a pointer is a host address) and a
//! launch runs the host build of the kernel under `remp_gpu_kernels::prims::emu`.
//!
//! Kernels are found by name in one table ([`EMULATED`]) that lists each kernel's
//! parameters; a unit test checks it against the kernel names of the PTX module, so
//! the emulator and the GPU always offer the same kernels. Arguments are converted to
//! the kernel's parameter types by inference ([`FromArg`]); a wrong count or kind is an
//! error, and a kernel that traps (a panic on the host) fails its launch with
//! [`Error::Device`] instead of taking the worker down.
//!
//! It runs GPU threads as coroutines on the calling thread, one block after another:
//! fine for tests and small demos, far from GPU speed. Launches CUDA would refuse (an
//! empty grid, grid.y or grid.z over 65535) are refused here too, so the emulator does
//! not accept what the GPU rejects.

use super::{check_range, Arg, Buf, Device};
use crate::{Error, Result};
use remp_gpu_kernels as k;
use std::sync::{Arc, Mutex, Weak};

/// The emulated device: a stream of its own (launches and device-to-device copies are
/// queued and run at the next synchronizing call, as on a GPU) over host memory.
pub struct EmuDevice {
    queue: Arc<Queue>,
}

/// Work queued on one emulated stream. Runs under the lock, so a flush by another
/// thread (a buffer being freed) and the owner's own flush never interleave.
#[derive(Default)]
struct Queue(Mutex<Vec<Op>>);

/// A queued launch or copy: captures device addresses (raw pointers) only.
struct Op(Box<dyn FnOnce() -> Result<()>>);
// SAFETY: an Op touches only emulated device memory through the addresses it captured;
// which thread runs it does not matter, and runs are serialized by the queue's lock.
unsafe impl Send for Op {}

/// Every live emulated stream: freeing emulated memory first drains them all, as
/// freeing on CUDA waits for the whole context (`DevBuf`'s drop).
static STREAMS: Mutex<Vec<Weak<Queue>>> = Mutex::new(Vec::new());

impl Queue {
    fn flush(&self) -> Result<()> {
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut first = Ok(());
        for op in q.drain(..) {
            // after a failure the rest is dropped, as a faulted CUDA stream runs nothing
            if first.is_ok() {
                first = (op.0)();
            }
        }
        first
    }
}

impl EmuDevice {
    pub fn new() -> Self {
        let queue = Arc::new(Queue::default());
        let mut all = STREAMS.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(&queue));
        EmuDevice { queue }
    }

    fn enqueue(&self, op: impl FnOnce() -> Result<()> + 'static) {
        self.queue
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Op(Box::new(op)));
    }
}

impl Default for EmuDevice {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for EmuDevice {
    fn drop(&mut self) {
        let _ = self.queue.flush();
    }
}

/// Runs the queued work of every emulated stream (one stream at a time: no lock is
/// held while taking another, so two threads draining at once cannot deadlock).
pub(crate) fn drain_all_streams() {
    let live: Vec<Arc<Queue>> = STREAMS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    for q in live {
        let _ = q.flush();
    }
}

/// Conversion of a launch argument to a kernel parameter type.
trait FromArg: Sized {
    fn from_arg(a: &Arg) -> Option<Self>;
}
impl FromArg for u32 {
    fn from_arg(a: &Arg) -> Option<Self> {
        match *a {
            Arg::U32(v) => Some(v),
            _ => None,
        }
    }
}
impl FromArg for u64 {
    fn from_arg(a: &Arg) -> Option<Self> {
        match *a {
            Arg::U64(v) => Some(v),
            _ => None,
        }
    }
}
impl FromArg for f32 {
    fn from_arg(a: &Arg) -> Option<Self> {
        match *a {
            Arg::F32(v) => Some(v),
            _ => None,
        }
    }
}
impl<T> FromArg for *const T {
    fn from_arg(a: &Arg) -> Option<Self> {
        match *a {
            Arg::Ptr(p) => Some(p as usize as *const T),
            _ => None,
        }
    }
}
impl<T> FromArg for *mut T {
    fn from_arg(a: &Arg) -> Option<Self> {
        match *a {
            Arg::Ptr(p) => Some(p as usize as *mut T),
            _ => None,
        }
    }
}

fn next_arg<'a, T: FromArg>(
    name: &str,
    it: &mut impl Iterator<Item = &'a Arg>,
    param: &str,
) -> Result<T> {
    let a = it
        .next()
        .ok_or_else(|| Error::Device(format!("{name}: missing argument `{param}`")))?;
    T::from_arg(a)
        .ok_or_else(|| Error::Device(format!("{name}: argument `{param}` is {a:?}, wrong kind")))
}

/// `module::kernel(parameter names);` builds [`EMULATED`] and the dispatcher.
macro_rules! emulated {
    ($($m:ident :: $name:ident ( $($a:ident)* );)*) => {
        /// Every kernel the emulator runs (the same set as the PTX module).
        pub const EMULATED: &[&str] = &[$(stringify!($name)),*];

        /// Kernel `name` with `args` converted, ready to run; `None` when no such kernel.
        unsafe fn dispatch(name: &str, grid: [u32; 3], block: u32, args: &[Arg]) -> Result<Option<Op>> {
            match name {
                $(stringify!($name) => {
                    let params: &[&str] = &[$(stringify!($a)),*];
                    if args.len() != params.len() {
                        return Err(Error::Device(format!(
                            "{name}: {} arguments, the kernel takes {}", args.len(), params.len()
                        )));
                    }
                    let mut it = args.iter();
                    $( let $a = next_arg(name, &mut it, stringify!($a))?; )*
                    let name: &'static str = stringify!($name);
                    Ok(Some(Op(Box::new(move || unsafe {
                        run(name, grid, block, || k::$m::$name($($a),*))
                    }))))
                })*
                _ => Ok(None),
            }
        }
    };
}

/// The launch-shape checks `cuLaunchKernel` makes.
fn check_shape(name: &str, grid: [u32; 3], block: u32) -> Result<()> {
    if block == 0 || !block.is_multiple_of(32) || block > 1024 {
        return Err(Error::Device(format!("{name}: block of {block} threads")));
    }
    if grid.contains(&0) || grid[0] >= 1 << 31 || grid[1] > 65535 || grid[2] > 65535 {
        return Err(Error::Device(format!(
            "{name}: grid {grid:?} (CUDA needs 1 <= x < 2^31, 1 <= y, z <= 65535)"
        )));
    }
    Ok(())
}

/// One emulated launch; a kernel panic (a trap) becomes an error.
unsafe fn run(name: &str, grid: [u32; 3], block: u32, f: impl Fn()) -> Result<()> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        k::prims::emu::launch(grid, block, f)
    }))
    .map_err(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into());
        Error::Device(format!(
            "{name} grid {grid:?} block {block}: kernel failed: {msg}"
        ))
    })
}

emulated! {
    reshard::reshard_copy2d(dst dst_offset dst_stride src src_offset src_stride rows cols elem_bytes);
    reshard::reshard_copy2d_batched(descs n);
    gemm::gemm_decode_bf16(y x w bias residual m n k ldx ldy);
    gemm::gemm_decode_bf16_f32out(y x w bias residual m n k ldx ldy);
    gemm::gemm_decode_silu_bf16(y x w_gate w_up m n k ldx ldy);
    gemm::gemm_decode_splitk_bf16(part x w m n k ldx kchunk);
    gemm::gemm_splitk_reduce_bf16(y part bias residual m n ldy splits);
    gemm::gemm_splitk_reduce_bf16_f32out(y part bias residual m n ldy splits);
    gemm::gemm_mma_bf16(y x w bias residual m n k ldx ldy);
    gemm::gemm_mma_bf16_f32out(y x w bias residual m n k ldx ldy);
    gemm::gemm_mma_silu_bf16(y x w_gate w_up m n k ldx ldy);
    attention::attn_decode_bf16(out o_part ml_part q k_cache v_cache block_tables ctx_lens
        q_heads kv_heads head_dim block_size max_blocks q_stride split_tokens scale);
    attention::attn_decode_combine_bf16(out o_part ml_part ctx_lens q_heads head_dim splits split_tokens);
    attention::attn_decode_pipelined_bf16(out o_part ml_part q k_cache v_cache block_tables ctx_lens q_heads kv_heads head_dim block_size max_blocks q_stride split_tokens scale);
    attention::attn_prefill_bf16(out q k_cache v_cache block_tables ctx_lens q_starts q_lens
        q_heads kv_heads head_dim block_size max_blocks q_stride scale);
    attention::kv_cache_write_bf16(k_cache v_cache k v slots kv_heads head_dim k_stride v_stride);
    small::rmsnorm_bf16(out x w cols eps);
    small::rmsnorm_f16(out x w cols eps);
    small::rmsnorm_f32(out x w cols eps);
    small::add_rmsnorm_bf16(out residual x w cols eps);
    small::add_rmsnorm_f16(out residual x w cols eps);
    small::add_rmsnorm_f32(out residual x w cols eps);
    small::rope_bf16(q k pos inv_freq q_heads k_heads head_dim q_stride k_stride);
    small::rope_f16(q k pos inv_freq q_heads k_heads head_dim q_stride k_stride);
    small::rope_f32(q k pos inv_freq q_heads k_heads head_dim q_stride k_stride);
    small::silu_mul_bf16(out gate up rows cols in_stride out_stride);
    small::silu_mul_f16(out gate up rows cols in_stride out_stride);
    small::silu_mul_f32(out gate up rows cols in_stride out_stride);
    small::residual_add_bf16(out a b n);
    small::residual_add_f16(out a b n);
    small::residual_add_f32(out a b n);
    small::embedding_bf16(out table ids dim vocab_start vocab_end);
    small::embedding_f16(out table ids dim vocab_start vocab_end);
    small::embedding_f32(out table ids dim vocab_start vocab_end);
    small::argmax_bf16(out logits vocab);
    small::argmax_f16(out logits vocab);
    small::argmax_f32(out logits vocab);
    small::top_p_sample_f32(out logits vocab temperature top_p uniforms);
}

impl Device for EmuDevice {
    fn describe(&self) -> String {
        "emulated GPU (remp-gpu-kernels host emulator)".into()
    }
    fn alloc(&self, bytes: usize) -> Result<Buf> {
        Ok(Buf::host(bytes))
    }
    fn upload(&self, dst: &Buf, off: usize, src: &[u8]) -> Result<()> {
        check_range(dst, off, src.len(), "upload")?;
        // ordered after this stream's queued work, like a synchronous cuMemcpyHtoD on it
        self.queue.flush()?;
        // SAFETY: inside dst's host allocation (checked); this stream's work is done.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr(),
                (dst.ptr() as usize + off) as *mut u8,
                src.len(),
            )
        };
        Ok(())
    }
    fn download(&self, src: &Buf, off: usize, dst: &mut [u8]) -> Result<()> {
        check_range(src, off, dst.len(), "download")?;
        self.queue.flush()?;
        // SAFETY: as for upload.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (src.ptr() as usize + off) as *const u8,
                dst.as_mut_ptr(),
                dst.len(),
            )
        };
        Ok(())
    }
    fn copy(
        &self,
        dst: &Buf,
        dst_off: usize,
        src: &Buf,
        src_off: usize,
        bytes: usize,
    ) -> Result<()> {
        check_range(dst, dst_off, bytes, "copy destination")?;
        check_range(src, src_off, bytes, "copy source")?;
        let (d, s) = (dst.ptr() as usize + dst_off, src.ptr() as usize + src_off);
        self.enqueue(move || {
            // SAFETY: both ranges were inside their allocations, which stay alive until
            // every stream has drained (freeing emulated memory drains them all).
            unsafe { std::ptr::copy(s as *const u8, d as *mut u8, bytes) };
            Ok(())
        });
        Ok(())
    }
    unsafe fn launch(&self, name: &str, grid: [u32; 3], block: u32, args: &[Arg]) -> Result<()> {
        check_shape(name, grid, block)?;
        match dispatch(name, grid, block, args)? {
            Some(op) => {
                self.queue
                    .0
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(op);
                Ok(())
            }
            None => Err(Error::Device(format!("unknown kernel `{name}`"))),
        }
    }
    fn synchronize(&self) -> Result<()> {
        self.queue.flush()
    }
    fn sm_count(&self) -> u32 {
        // Launch shapes sized to the device stay small, as the emulator runs blocks
        // one after another.
        4
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::device::{download_vec, upload_new};

    #[test]
    fn emulator_offers_exactly_the_ptx_kernels() {
        let mut listed: Vec<&str> = crate::kernels::FAMILIES
            .iter()
            .flat_map(|(_, names)| names.iter().copied())
            .collect();
        let mut emulated = EMULATED.to_vec();
        listed.sort_unstable();
        emulated.sort_unstable();
        assert_eq!(listed, emulated);
    }

    #[test]
    fn launches_check_arguments_and_report_traps() {
        let dev = EmuDevice::new();
        let a: Vec<f32> = (0..100).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..100).map(|i| 3.0 - i as f32).collect();
        let (ba, bb) = (upload_new(&dev, &a).unwrap(), upload_new(&dev, &b).unwrap());
        let out = dev.alloc(400).unwrap();
        let args = [
            Arg::from(&out),
            Arg::from(&ba),
            Arg::from(&bb),
            Arg::U32(100),
        ];
        unsafe { dev.launch("residual_add_f32", [2, 1, 1], 64, &args) }.unwrap();
        let got: Vec<f32> = download_vec(&dev, &out, 100).unwrap();
        let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        assert_eq!(got, want);
        // wrong count, wrong kind, unknown name: errors, no launch
        let e = unsafe { dev.launch("residual_add_f32", [1, 1, 1], 32, &args[..3]) };
        assert!(e.unwrap_err().to_string().contains("3 arguments"));
        let mut bad = args;
        bad[3] = Arg::F32(1.0);
        let e = unsafe { dev.launch("residual_add_f32", [1, 1, 1], 32, &bad) };
        assert!(e.unwrap_err().to_string().contains("wrong kind"));
        assert!(unsafe { dev.launch("nope", [1, 1, 1], 32, &[]) }.is_err());
        // grids CUDA refuses are refused here too
        for grid in [[0, 1, 1], [1, 65536, 1], [1, 1, 70000]] {
            let e = unsafe { dev.launch("residual_add_f32", grid, 32, &args) };
            assert!(e.unwrap_err().to_string().contains("grid"), "{grid:?}");
        }
        // the tensor-core GEMM traps on K % 8 != 0
        let z = dev.alloc(4096).unwrap();
        let p = Arg::from(&z);
        let e = unsafe {
            dev.launch(
                "gemm_mma_bf16",
                [1, 1, 1],
                128,
                &[
                    p,
                    p,
                    p,
                    Arg::Ptr(0),
                    Arg::Ptr(0),
                    Arg::U32(1),
                    Arg::U32(8),
                    Arg::U32(12),
                    Arg::U32(12),
                    Arg::U32(8),
                ],
            )
        };
        // queued like a GPU launch: the fault shows at the next synchronizing call
        assert!(e.is_ok());
        let e = dev.synchronize();
        assert!(
            e.unwrap_err().to_string().contains("kernel failed"),
            "trap not reported"
        );
    }
}

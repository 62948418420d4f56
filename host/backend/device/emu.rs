//! The emulated GPU: device memory is host memory (a pointer is a host address) and a
//! launch runs the host build of the kernel under `remp_gpu_kernels::prims::emu`.
//!
//! Kernels are found by name in one table ([`EMULATED`]) that lists each kernel's
//! parameters; a unit test checks it against the kernel names of the sm_90a PTX module
//! (the portable kernels and the wgmma GEMMs), so the emulator offers what an H100 /
//! H200 does. Arguments are converted to
//! the kernel's parameter types by inference ([`FromArg`]); a wrong count or kind is an
//! error, and a kernel that traps (a panic on the host) fails its launch with
//! [`Error::Device`] instead of taking the worker down.
//!
//! Each [`EmuDevice`] is a stream: work is queued and runs at the owner's next
//! synchronizing call; [`Device::record`] / [`Device::wait`] order streams as CUDA events
//! do (a wait runs the other stream's work up to the event first), and freed memory is
//! released only once every stream has run past the free (CUDA's stream-ordered free).
//!
//! It runs GPU threads as coroutines on the calling thread, one block after another:
//! fine for tests and small demos, far from GPU speed. Launches CUDA would refuse (an
//! empty grid, grid.y or grid.z over 65535) are refused here too, so the emulator does
//! not accept what the GPU rejects.

use super::{check_range, Arg, Buf, Device, Event, EventKind, Graph, GraphKind, Launch};
use crate::{Error, Result};
use remp_gpu_kernels as k;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, TryLockError, Weak};
use std::time::Duration;

/// The emulated device: a stream of its own (launches and device-to-device copies are
/// queued and run at the next synchronizing call, as on a GPU) over host memory.
pub struct EmuDevice {
    queue: Arc<Queue>,
    /// The emulated GPU this handle is on ([`EmuDevice::on_gpu`]): its allocations
    /// belong to that GPU, and a launch or copy that touches another GPU's memory is an
    /// error (on real GPUs it would fault or read another device's addresses).
    gpu: usize,
}

/// One emulated stream: the work queued on it and how far it has run. Ops run in order,
/// one runner at a time (`run`); the runner is the owner at a synchronizing call, or
/// another stream's wait on one of this stream's events, which runs this stream's work
/// up to the event's point first. Nothing else runs it (not even a free), so work that a
/// missing wait leaves unordered reads memory in whatever state it is (poison, 0xFF, if
/// its producer has not run yet).
#[derive(Default)]
struct Queue {
    /// Queued, not yet run; and how many ops were ever queued (the point an event marks).
    state: Mutex<State>,
    /// Ops run (or discarded after a failure), in queue order.
    done: AtomicU64,
    /// Held while running ops: the stream's work never runs twice at once.
    run: Mutex<()>,
    /// Signalled when the runner finishes an op or stops (for threads waiting on a point).
    tick: Mutex<()>,
    ran: Condvar,
    /// The first failure not yet reported to the owner (reported by its next
    /// synchronizing call, whichever thread ran the op).
    err: Mutex<Option<Error>>,
    /// Index of the first op that ever failed (`u64::MAX`: none): waits on a later point
    /// fail too, as a fault poisons a CUDA context.
    fault_at: AtomicU64,
}

#[derive(Default)]
struct State {
    ops: VecDeque<Op>,
    pushed: u64,
}

/// A queued launch, copy or wait: captures device addresses (raw pointers) and events
/// only.
struct Op(Box<dyn FnOnce() -> Result<()>>);
// SAFETY: an Op touches only emulated device memory through the addresses it captured
// (and other streams' queues through their Arcs); which thread runs it does not matter,
// and runs of one stream are serialized by its `run` lock.
unsafe impl Send for Op {}

/// An emulated event: stream `queue` after its first `upto` ops.
#[derive(Clone)]
pub(crate) struct Mark {
    queue: Arc<Queue>,
    upto: u64,
}

/// Every live emulated stream: freeing emulated memory waits for all of them to run past
/// their current point, as freeing on CUDA is ordered after every stream's queued work
/// (`DevBuf`'s drop).
static STREAMS: Mutex<Vec<Weak<Queue>>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Queue {
    fn push(&self, op: Op) {
        let mut st = lock(&self.state);
        st.ops.push_back(op);
        st.pushed += 1;
    }

    /// Runs queued ops until `upto` have run (`u64::MAX`: all queued). When another
    /// thread is running this stream, waits for it to get there instead of for its lock:
    /// that runner may go on past `upto` into work that waits for the caller's own
    /// stream. Events only point back in time, so this never waits in a cycle.
    fn run_until(&self, upto: u64) {
        self.run_until_or(upto, None);
    }

    /// [`Queue::run_until`], giving up at `deadline` when another thread runs this
    /// stream and has not got there by then.
    fn run_until_or(&self, upto: u64, deadline: Option<std::time::Instant>) {
        loop {
            if self.done.load(Ordering::Acquire) >= upto {
                return;
            }
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                return;
            }
            let running = match self.run.try_lock() {
                Ok(g) => Some(g),
                Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
                Err(TryLockError::WouldBlock) => None,
            };
            if let Some(running) = running {
                self.run_locked(upto);
                drop(running);
                self.notify();
                reap();
                return;
            }
            let t = lock(&self.tick);
            if self.done.load(Ordering::Acquire) >= upto {
                return;
            }
            // (Woken at every op the runner finishes and when it stops.)
            let _ = self.ran.wait_timeout(t, Duration::from_millis(5));
        }
    }

    /// [`Queue::run_until`] with the `run` lock held.
    fn run_locked(&self, upto: u64) {
        while self.done.load(Ordering::Acquire) < upto {
            let Some(op) = lock(&self.state).ops.pop_front() else {
                break;
            };
            let at = self.done.load(Ordering::Acquire);
            if let Err(e) = (op.0)() {
                self.fault_at.fetch_min(at, Ordering::AcqRel);
                lock(&self.err).get_or_insert(e);
                // The rest is dropped, as a faulted CUDA stream runs nothing.
                let rest = std::mem::take(&mut lock(&self.state).ops);
                self.done
                    .fetch_add(1 + rest.len() as u64, Ordering::Release);
            } else {
                self.done.fetch_add(1, Ordering::Release);
            }
            self.notify();
            // Memory freed at this very point goes now, before the next op runs: a
            // later op that still reads it (a free ordered too early) reads poison.
            reap();
        }
    }

    fn notify(&self) {
        let _t = lock(&self.tick);
        self.ran.notify_all();
    }

    /// Runs everything queued; the owner's synchronizing call (reports a failure).
    fn flush(&self) -> Result<()> {
        self.run_until(u64::MAX);
        match lock(&self.err).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Mark {
    /// Runs the marked stream up to the mark now, as a GPU would have by itself (the
    /// emulated collectives drive a peer's queued op this way), giving up at `deadline`
    /// when another thread runs that stream and has not got there.
    pub(crate) fn drive(&self, deadline: std::time::Instant) {
        self.queue.run_until_or(self.upto, Some(deadline));
    }

    /// Runs the marked stream up to the mark (from the waiting stream's runner).
    fn reach(&self) -> Result<()> {
        self.queue.run_until(self.upto);
        if self.queue.fault_at.load(Ordering::Acquire) < self.upto {
            return Err(Error::Device(
                "waited on an event after work that failed on another stream".into(),
            ));
        }
        Ok(())
    }
}

/// Which emulated GPU owns each live allocation: start address → (end, GPU).
static OWNERS: Mutex<BTreeMap<u64, (u64, usize)>> = Mutex::new(BTreeMap::new());

/// The emulated GPU owning address `p`, if an allocation holds it.
fn owner_of(p: u64) -> Option<usize> {
    lock(&OWNERS)
        .range(..=p)
        .next_back()
        .filter(|(_, (end, _))| p < *end)
        .map(|(_, (_, g))| *g)
}

impl EmuDevice {
    /// A handle (a stream of its own) on emulated GPU `gpu`.
    pub fn on_gpu(gpu: usize) -> Self {
        let queue = Arc::new(Queue {
            fault_at: AtomicU64::new(u64::MAX),
            ..Default::default()
        });
        let mut all = lock(&STREAMS);
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(&queue));
        EmuDevice { queue, gpu }
    }

    /// Refuses `p` when it points into another emulated GPU's memory.
    pub(crate) fn check_owner(&self, p: u64, what: &str) -> Result<()> {
        match owner_of(p) {
            Some(g) if g != self.gpu => Err(Error::Device(format!(
                "{what} on emulated GPU {} uses memory of emulated GPU {g} (no device \
                 buffer may pass between GPUs)",
                self.gpu
            ))),
            _ => Ok(()),
        }
    }

    /// A handle on emulated GPU 0.
    pub fn new() -> Self {
        Self::on_gpu(0)
    }

    pub(crate) fn enqueue(&self, op: impl FnOnce() -> Result<()> + 'static) {
        self.queue.push(Op(Box::new(op)));
    }

    /// The point after everything queued so far (what an event records).
    pub(crate) fn mark(&self) -> Mark {
        Mark {
            queue: self.queue.clone(),
            upto: lock(&self.queue.state).pushed,
        }
    }
}

impl Default for EmuDevice {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for EmuDevice {
    fn drop(&mut self) {
        self.queue.run_until(u64::MAX);
    }
}

/// Emulated memory freed while some stream still had work queued: released once every
/// such stream has run up to the point it had reached at the free.
type PendingFree = (Box<[u128]>, Vec<(Weak<Queue>, u64)>);
static PENDING: Mutex<Vec<PendingFree>> = Mutex::new(Vec::new());

/// Frees `mem` after the work queued so far on every emulated stream (what CUDA's
/// stream-ordered free does): at once when all of it has run, else when the last of
/// those streams gets there.
pub(crate) fn free_after_all_streams(mut mem: Box<[u128]>) {
    let points: Vec<(Weak<Queue>, u64)> = lock(&STREAMS)
        .iter()
        .filter_map(|w| {
            let q = w.upgrade()?;
            let upto = lock(&q.state).pushed;
            (q.done.load(Ordering::Acquire) < upto).then(|| (w.clone(), upto))
        })
        .collect();
    if points.is_empty() {
        release(mem);
    } else {
        lock(&PENDING).push((std::mem::take(&mut mem), points));
    }
}

/// Freed memory, poisoned, held back from the allocator (most recent last; at most
/// [`QUARANTINE_BYTES`]): a kernel queued after a free that still reads the memory (a
/// free ordered too early) reads NaNs for as long as it stays here, not the old values
/// nor another buffer's.
static QUARANTINE: Mutex<(VecDeque<Box<[u128]>>, usize)> = Mutex::new((VecDeque::new(), 0));
const QUARANTINE_BYTES: usize = 64 << 20;

fn release(mut mem: Box<[u128]>) {
    lock(&OWNERS).remove(&(mem.as_ptr() as u64));
    mem.fill(u128::MAX);
    let bytes = mem.len() * 16;
    let mut q = lock(&QUARANTINE);
    q.0.push_back(mem);
    q.1 += bytes;
    while q.1 > QUARANTINE_BYTES {
        match q.0.pop_front() {
            Some(old) => q.1 -= old.len() * 16,
            None => break,
        }
    }
}

/// Releases the pending frees every stream has run past (after a stream ran work).
fn reap() {
    let released: Vec<PendingFree> = {
        let mut p = lock(&PENDING);
        if p.is_empty() {
            return;
        }
        let (done, keep) = std::mem::take(&mut *p)
            .into_iter()
            .partition(|(_, points)| {
                points.iter().all(|(w, upto)| {
                    w.upgrade()
                        .is_none_or(|q| q.done.load(Ordering::Acquire) >= *upto)
                })
            });
        *p = keep;
        done
    };
    for (mem, _) in released {
        release(mem);
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
        /// Every kernel the emulator runs (the same set as the sm_90a PTX module).
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

/// One emulated launch, with the kernel's dynamic shared memory as CUDA gets it; a
/// kernel panic (a trap) becomes an error.
unsafe fn run(name: &str, grid: [u32; 3], block: u32, f: impl Fn()) -> Result<()> {
    let smem = crate::kernels::dynamic_smem(name);
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        k::prims::emu::launch_dyn(grid, block, smem, f)
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
    gemm::gemm_decode64_bf16(y x w bias residual m n k ldx ldy);
    gemm::gemm_decode_bf16_f32out(y x w bias residual m n k ldx ldy);
    gemm::gemm_decode_qkv_bf16(y0 y1 y2 x w0 w1 w2 b0 b1 b2 norm eps m n0 n1 n2 k ldx);
    gemm::gemm_decode_qkv_rope_bf16(q x wq wk wv bq bk bv norm eps pos inv_freq k_cache v_cache slots m nq nkv k ldx head_dim);
    gemm::gemm_decode_silu_bf16(y x w_gate w_up norm eps m n k ldx ldy);
    gemm::gemm_decode_splitk_bf16(part x w m n k ldx kchunk);
    gemm::gemm_splitk_reduce_bf16(y part bias residual m n ldy splits);
    gemm::gemm_splitk_reduce_bf16_f32out(y part bias residual m n ldy splits);
    gemm::gemm_mma_bf16(y x w bias residual m n k ldx ldy);
    gemm::gemm_mma_bf16_f32out(y x w bias residual m n k ldx ldy);
    gemm::gemm_mma_silu_bf16(y x w_gate w_up m n k ldx ldy);
    gemm::gemm_mma_wide_bf16(y x w bias residual m n k ldx ldy);
    gemm::gemm_mma_wide_bf16_f32out(y x w bias residual m n k ldx ldy);
    gemm::gemm_mma_wide_silu_bf16(y x w_gate w_up m n k ldx ldy);
    gemm_wgmma::gemm_wgmma_bf16(y x w bias residual m n k ldx ldy);
    gemm_wgmma::gemm_wgmma_bf16_f32out(y x w bias residual m n k ldx ldy);
    gemm_wgmma::gemm_wgmma_silu_bf16(y x w_gate w_up m n k ldx ldy);
    attention::attn_decode_bf16(out o_part ml_part q k_cache v_cache block_tables ctx_lens
        q_heads kv_heads head_dim block_size max_blocks q_stride split_tokens scale);
    attention::attn_decode_combine_bf16(out o_part ml_part ctx_lens q_heads head_dim splits split_tokens);
    attention::attn_decode_pipelined_bf16(out o_part ml_part q k_cache v_cache block_tables ctx_lens q_heads kv_heads head_dim block_size max_blocks q_stride split_tokens scale);
    attention::attn_prefill_bf16(out q k_cache v_cache block_tables ctx_lens q_starts q_lens
        q_heads kv_heads head_dim block_size max_blocks q_stride scale);
    attention::attn_prefill_mma_bf16(out q k_cache v_cache block_tables ctx_lens q_starts q_lens q_heads kv_heads head_dim block_size max_blocks q_stride scale);
    attention::kv_cache_write_bf16(k_cache v_cache k v slots kv_heads head_dim k_stride v_stride);
    attention::rope_kv_write_bf16(q k v pos inv_freq k_cache v_cache slots q_heads kv_heads head_dim q_stride k_stride v_stride);
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
    small::argmax_bf16(out values logits vocab);
    small::argmax_f16(out values logits vocab);
    small::argmax_f32(out values logits vocab);
    small::top_p_sample_f32(out logits vocab temperature top_p uniforms);
}

impl Device for EmuDevice {
    fn describe(&self) -> String {
        "emulated GPU (remp-gpu-kernels host emulator)".into()
    }
    /// Accepted, with nothing to change: emulated launches run one after another, an
    /// order programmatic dependent launch allows (the kernels' waits are no-ops).
    fn set_pdl(&self, _on: bool) -> Result<()> {
        Ok(())
    }
    fn alloc(&self, bytes: usize) -> Result<Buf> {
        let b = Buf::host(bytes);
        let end = b.ptr() + (bytes.div_ceil(16).max(1) * 16) as u64;
        lock(&OWNERS).insert(b.ptr(), (end, self.gpu));
        Ok(b)
    }
    fn upload(&self, dst: &Buf, off: usize, src: &[u8]) -> Result<()> {
        check_range(dst, off, src.len(), "upload")?;
        // Queued like cuMemcpyHtoDAsync from pageable memory: the bytes are taken now
        // (staged), written when this stream gets there; another stream reading `dst`
        // without a wait sees what was there before.
        let (d, bytes) = (dst.ptr() as usize + off, src.to_vec());
        self.enqueue(move || {
            // SAFETY: inside dst's allocation (checked), which stays alive until every
            // stream has run past its free.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), d as *mut u8, bytes.len()) };
            Ok(())
        });
        Ok(())
    }
    fn download(&self, src: &Buf, off: usize, dst: &mut [u8]) -> Result<()> {
        check_range(src, off, dst.len(), "download")?;
        self.queue.flush()?;
        // SAFETY: inside src's host allocation (checked); this stream's work is done.
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
        self.check_owner(dst.ptr(), "a copy")?;
        self.check_owner(src.ptr(), "a copy")?;
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
        for a in args {
            if let Arg::Ptr(p) = *a {
                self.check_owner(p, &format!("kernel `{name}`"))?;
            }
        }
        match dispatch(name, grid, block, args)? {
            Some(op) => {
                self.queue.push(op);
                Ok(())
            }
            None => Err(Error::Device(format!("unknown kernel `{name}`"))),
        }
    }
    fn synchronize(&self) -> Result<()> {
        self.queue.flush()
    }
    fn record(&self) -> Result<Event> {
        Ok(Event(EventKind::Emu(self.mark())))
    }
    fn wait(&self, e: &Event) -> Result<()> {
        let EventKind::Emu(m) = &e.0 else {
            return Err(Error::Device(
                "a CUDA event cannot order an emulated stream".into(),
            ));
        };
        if Arc::ptr_eq(&m.queue, &self.queue) {
            return Ok(()); // the stream's own order already
        }
        let m = m.clone();
        self.enqueue(move || m.reach());
        Ok(())
    }
    fn sm_count(&self) -> u32 {
        // Launch shapes sized to the device stay small, as the emulator runs blocks
        // one after another.
        4
    }
    fn has_kernel(&self, name: &str) -> bool {
        // The sm_90a module's kernels, the wgmma GEMMs included: the engine on the
        // emulator takes the paths it takes on an H100 / H200.
        EMULATED.contains(&name)
    }
    unsafe fn build_graph(&self, run: &[Launch]) -> Result<Option<Graph>> {
        // Checked when built, as cuGraphAddKernelNode checks a node: a known kernel and
        // a shape CUDA accepts.
        for l in run {
            check_shape(&l.name, l.grid, l.block)?;
            if !EMULATED.contains(&l.name.as_str()) {
                return Err(Error::Device(format!("unknown kernel `{}`", l.name)));
            }
        }
        Ok(Some(Graph(GraphKind::Emu(run.to_vec()))))
    }
    fn as_emu(&self) -> Option<&EmuDevice> {
        Some(self)
    }
    fn launch_graph(&self, g: &Graph) -> Result<()> {
        let GraphKind::Emu(run) = &g.0 else {
            return Err(Error::Device(
                "a CUDA graph cannot run on an emulated stream".into(),
            ));
        };
        for l in run {
            // SAFETY: build_graph's contract: the run's launches are valid at replay.
            unsafe { self.launch(&l.name, l.grid, l.block, &l.args)? };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::device::{download_vec, mark_ready, upload_new, wait_ready};

    #[test]
    fn emulator_offers_exactly_the_ptx_kernels() {
        let mut listed: Vec<&str> = crate::kernels::names(crate::kernels::Arch::Sm90a).collect();
        let mut emulated = EMULATED.to_vec();
        listed.sort_unstable();
        emulated.sort_unstable();
        assert_eq!(listed, emulated);
    }

    /// Memory belongs to the emulated GPU that allocated it: a launch or copy on
    /// another GPU that touches it is refused (on real GPUs it would fault), the same
    /// GPU's handles share it freely.
    #[test]
    fn another_gpus_memory_is_refused() {
        let (g0, g0b, g1) = (
            EmuDevice::on_gpu(0),
            EmuDevice::on_gpu(0),
            EmuDevice::on_gpu(1),
        );
        let n = 64usize;
        let x0 = g0.alloc(n * 2).unwrap();
        let y1 = g1.alloc(n * 2).unwrap();
        let args =
            |a: &Buf, b: &Buf| [Arg::from(a), Arg::from(a), Arg::from(b), Arg::U32(n as u32)];
        // SAFETY: residual_add_bf16(out, a, b, n) over buffers of n bf16.
        let e = unsafe { g0.launch("residual_add_bf16", [1, 1, 1], 128, &args(&x0, &y1)) }
            .expect_err("GPU 1's buffer in a GPU 0 launch");
        assert!(e.to_string().contains("emulated GPU 1"), "{e}");
        let e = g0.copy(&x0, 0, &y1, 0, n * 2).expect_err("cross-GPU copy");
        assert!(e.to_string().contains("emulated GPU 1"), "{e}");
        let x0b = g0b.alloc(n * 2).unwrap();
        g0b.upload(&x0b, 0, &vec![0u8; n * 2]).unwrap();
        g0.upload(&x0, 0, &vec![0u8; n * 2]).unwrap();
        // SAFETY: as above, both buffers on GPU 0.
        unsafe { g0.launch("residual_add_bf16", [1, 1, 1], 128, &args(&x0, &x0b)) }.unwrap();
        g0b.synchronize().unwrap();
        g0.synchronize().unwrap();
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

    /// A buffer one stream fills and another reads: with the wait on its ready event the
    /// reader sees the data; without it, the reader's work runs first and reads the
    /// poison of a fresh allocation (as a GPU stream may run ahead of the producer).
    #[test]
    fn a_wait_orders_streams_and_a_missing_one_reads_poison() {
        let (a, b) = (EmuDevice::new(), EmuDevice::new());
        let data: Vec<f32> = (0..64).map(|i| i as f32).collect();
        let src = upload_new(&a, &data).unwrap();
        for waited in [true, false] {
            let mut piece = a.alloc(256).unwrap();
            a.copy(&piece, 0, &src, 0, 256).unwrap();
            mark_ready(&a, &mut piece).unwrap();
            let out = b.alloc(256).unwrap();
            if waited {
                wait_ready(&b, &piece).unwrap();
            }
            b.copy(&out, 0, &piece, 0, 256).unwrap();
            // (runs b's queue only: a's copy runs first only if b waits for it)
            let got: Vec<f32> = download_vec(&b, &out, 64).unwrap();
            if waited {
                assert_eq!(got, data);
            } else {
                assert!(got.iter().all(|v| v.is_nan()), "read before written");
            }
            a.synchronize().unwrap();
        }
        // A stream's own event orders nothing more; an unmarked buffer needs no wait.
        let own = a.record().unwrap();
        a.wait(&own).unwrap();
        wait_ready(&a, &src).unwrap();
    }

    /// Work after a wait on a failed stream's work fails too (a fault poisons a CUDA
    /// context); the failing stream's owner gets the kernel's own error.
    #[test]
    fn a_wait_on_failed_work_fails() {
        let (a, b) = (EmuDevice::new(), EmuDevice::new());
        let z = a.alloc(4096).unwrap();
        let p = Arg::from(&z);
        let (n, m) = (Arg::Ptr(0), Arg::U32(1));
        let args = [
            p,
            p,
            p,
            n,
            n,
            m,
            Arg::U32(8),
            Arg::U32(12),
            Arg::U32(12),
            Arg::U32(8),
        ];
        // the tensor-core GEMM traps on K % 8 != 0
        unsafe { a.launch("gemm_mma_bf16", [1, 1, 1], 128, &args) }.unwrap();
        let e = a.record().unwrap();
        b.wait(&e).unwrap();
        let err = b.synchronize().unwrap_err().to_string();
        assert!(err.contains("another stream"), "{err}");
        let err = a.synchronize().unwrap_err().to_string();
        assert!(err.contains("kernel failed"), "{err}");
    }

    /// Two streams on two threads exchanging buffers both ways, several times before
    /// either synchronizes (an all-reduce per layer: each waits for the other's events,
    /// and a runner goes on past the point a waiter needs into work that waits for the
    /// waiter's stream), neither deadlock nor read stale data, while buffers are freed
    /// in between.
    #[test]
    fn cross_waits_between_threads_do_not_deadlock() {
        type Ch = (std::sync::mpsc::Sender<Buf>, std::sync::mpsc::Receiver<Buf>);
        let side = |me: f32, (tx, rx): Ch| {
            move || {
                let dev = EmuDevice::new();
                for round in 0..100 {
                    let v = vec![me + round as f32; 32];
                    let mut acc = upload_new(&dev, &v).unwrap();
                    // acc ← acc + theirs, 4 times: 2^4 · (1 + 2 round) / 2 at the end
                    for _ in 0..4 {
                        let mut out = dev.alloc(128).unwrap();
                        dev.copy(&out, 0, &acc, 0, 128).unwrap();
                        mark_ready(&dev, &mut out).unwrap();
                        tx.send(out).unwrap();
                        let theirs = rx.recv().unwrap();
                        wait_ready(&dev, &theirs).unwrap();
                        let sum = dev.alloc(128).unwrap();
                        let args = [
                            Arg::from(&sum),
                            Arg::from(&acc),
                            Arg::from(&theirs),
                            Arg::U32(32),
                        ];
                        unsafe { dev.launch("residual_add_f32", [1, 1, 1], 32, &args) }.unwrap();
                        acc = sum;
                    }
                    let got: Vec<f32> = download_vec(&dev, &acc, 32).unwrap();
                    let want = 8.0 * (1.0 + 2.0 * round as f32);
                    assert_eq!(got, vec![want; 32], "round {round}");
                }
            }
        };
        let (ab, ba) = (std::sync::mpsc::channel(), std::sync::mpsc::channel());
        let a = std::thread::spawn(side(0.0, (ab.0, ba.1)));
        let b = std::thread::spawn(side(1.0, (ba.0, ab.1)));
        a.join().unwrap();
        b.join().unwrap();
    }
}

//! CUDA driver layer (through `cudarc`, loaded at run time): one binary serves CPU-only
//! and GPU machines. [`CudaDevice::open`] checks that `libcuda` exists before the first
//! driver call (cudarc panics otherwise) and turns every failure — no driver, no device,
//! an unsupported compute capability — into [`Error::Device`].
//!
//! [`CudaDevice`] owns device `ordinal`'s primary context and one stream of its own,
//! loads the embedded PTX module of [`crate::kernels`] (sm_90 for compute capability 9.x
//! and up, sm_80 for 8.x) once per context, when the first handle opens (one JIT for
//! every worker's compute and copy handles), and launches kernels by name with plain
//! argument lists ([`Arg`]). Every driver call is checked; after each launch the launch
//! error and (with [`CudaDevice::set_sync_check`] or `REMP_CUDA_SYNC_CHECK=1`) the
//! kernel's completion are checked too. A kernel fault (a trap, an illegal address)
//! poisons the device's primary context, which every worker on the GPU shares: after
//! one, every later call fails and the engine must be restarted.
//!
//! [`DevBuf`] is a raw device allocation (freed on drop) addressed by its `u64` pointer,
//! which is what the kernels take. Memory is stream-ordered where the device has memory
//! pools (`cuMemAllocAsync` on the allocating handle's stream; another stream uses it
//! after an event from that stream, see [`crate::backend::device::mark_ready`]), and a
//! free never blocks the host: dropped buffers are batched, and a batch records an
//! event on every live stream of the context (the registry `LANES`), makes the
//! context's free stream wait for all of them and frees there (`cuMemFreeAsync`), so no
//! work queued before the free on any stream can see the memory reused. Freed memory
//! stays in the pool between steps (release threshold at its maximum; `mem_info` trims
//! first), and an allocation that finds the pool exhausted waits once for the queued
//! frees before it fails. Without pools (or a pool that cannot be configured):
//! `cuMemAlloc`, and a free waits for the whole context (`cuCtxSynchronize`, then
//! `cuMemFree`).

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use cudarc::driver::{result, sys, CudaContext, CudaEvent, CudaStream, DriverError};

use crate::kernels::{self, Arch};
use crate::{Error, Result};

pub mod nvtx;

fn derr(what: &str, e: DriverError) -> Error {
    Error::Device(format!("{what}: {e:?}"))
}

/// Whether a CUDA driver library can be loaded at all (without it, cudarc's first
/// driver call panics).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe { sys::is_culib_present() }
}

pub use crate::backend::device::Arg;

impl From<&DevBuf> for Arg {
    fn from(b: &DevBuf) -> Arg {
        Arg::Ptr(b.ptr)
    }
}

/// A raw device allocation of `len` bytes (at least 16-byte aligned, checked), freed on
/// drop after the work queued so far on every stream of the context. Its copies and
/// fills are ordered on the allocating device's stream (a non-blocking stream, which the
/// legacy-stream `cuMemcpyHtoD`/`cuMemsetD8` would not be ordered with) and wait for
/// completion before returning.
pub struct DevBuf {
    ptr: u64,
    len: usize,
    /// From `cuMemAllocAsync` (freed by `cuMemFreeAsync`) rather than `cuMemAlloc`.
    pooled: bool,
    ctx: Arc<CudaContext>,
    /// The allocating handle's stream (kept registered while the buffer lives).
    lane: Arc<Lane>,
}

/// One stream of a context and the event a free records on it.
pub(crate) struct Lane {
    stream: Arc<CudaStream>,
    mark: CudaEvent,
}

/// Per context (its `CUcontext` address): the stream frees are queued on, every live
/// stream, which each free orders itself after, and the frees not queued yet.
struct Lanes {
    ctx: usize,
    free_stream: Arc<CudaStream>,
    live: Vec<Weak<Lane>>,
    /// Dropped pool allocations whose free is not queued yet: the fan-in (an event
    /// record and a wait per live stream) is paid once per batch, not per buffer (a
    /// step drops a received partial per peer per all-reduce).
    pending: Vec<u64>,
    pending_bytes: usize,
    /// Whether the context's pool could be configured (decided once per context, so
    /// every handle of it allocates the same way).
    pooled: bool,
}

/// A batch of dropped buffers is freed once it holds this many bytes or buffers (or at
/// the next synchronize of any handle of the context, e.g. each step's end): memory
/// held back is bounded, and large buffers (prefill partials) go at once.
const FREE_BATCH_BYTES: usize = 64 << 20;
const FREE_BATCH_COUNT: usize = 64;

/// Every context's streams, for stream-ordered frees (one lock: frees record on the
/// shared per-stream events one batch at a time).
static LANES: Mutex<Vec<Lanes>> = Mutex::new(Vec::new());

fn lanes() -> std::sync::MutexGuard<'static, Vec<Lanes>> {
    LANES.lock().unwrap_or_else(|e| e.into_inner())
}

/// Frees `ptr` (`len` bytes from `cuMemAllocAsync` in `ctx`, bound to this thread)
/// after all work queued so far on every live stream of `ctx`, without blocking the
/// host: now or with its batch (a later point of every stream: still after that work).
fn free_after_all_streams(
    ctx: &CudaContext,
    ptr: u64,
    len: usize,
) -> std::result::Result<(), DriverError> {
    let mut all = lanes();
    let key = ctx.cu_ctx() as usize;
    let Some(l) = all.iter_mut().find(|l| l.ctx == key) else {
        return Err(DriverError(sys::CUresult::CUDA_ERROR_NOT_FOUND));
    };
    // From here the batch owns the pointer (a failed fan-in, i.e. a faulted context,
    // leaves it pending for the next try rather than freeing it twice).
    l.pending.push(ptr);
    l.pending_bytes += len;
    if l.pending_bytes >= FREE_BATCH_BYTES || l.pending.len() >= FREE_BATCH_COUNT {
        let _ = free_pending(l);
    }
    Ok(())
}

/// Queues the frees of `l`'s pending buffers on its free stream, after the work queued
/// so far on every live stream (the context bound to this thread).
fn free_pending(l: &mut Lanes) -> std::result::Result<(), DriverError> {
    if l.pending.is_empty() {
        return Ok(());
    }
    l.live.retain(|w| w.strong_count() > 0);
    for lane in l.live.iter().filter_map(Weak::upgrade) {
        // Re-recording the shared event is safe: a wait captures the event's state when
        // it is queued, and the lock keeps record and wait together.
        lane.mark.record(&lane.stream)?;
        l.free_stream.wait(&lane.mark)?;
    }
    l.pending_bytes = 0;
    let mut first = Ok(());
    for ptr in l.pending.drain(..) {
        // SAFETY: allocated by cuMemAllocAsync in this context and freed once; every
        // stream that could still use it is ordered before this point of the free
        // stream.
        let r = unsafe { result::free_async(ptr, l.free_stream.cu_stream()) };
        first = first.and(r);
    }
    first
}

/// Queues the pending frees of `ctx` now (at a synchronize: the batch does not wait for
/// the next drop).
fn flush_frees(ctx: &CudaContext) {
    let mut all = lanes();
    let key = ctx.cu_ctx() as usize;
    if let Some(l) = all.iter_mut().find(|l| l.ctx == key) {
        let _ = free_pending(l);
    }
}

impl DevBuf {
    /// Device address of the first byte.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    /// Device address of byte `off`.
    pub fn at(&self, off: usize) -> u64 {
        assert!(off <= self.len, "offset {off} beyond {} bytes", self.len);
        self.ptr + off as u64
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Copy `data` to the start of the buffer (synchronous).
    pub fn upload<T: Copy>(&self, data: &[T]) -> Result<()> {
        self.upload_at(0, data)
    }
    /// Copy `data` to byte offset `off` (synchronous).
    pub fn upload_at<T: Copy>(&self, off: usize, data: &[T]) -> Result<()> {
        let bytes = std::mem::size_of_val(data);
        assert!(
            off + bytes <= self.len,
            "upload of {bytes} B at {off} beyond {} B",
            self.len
        );
        self.ctx
            .bind_to_thread()
            .map_err(|e| derr("bind context", e))?;
        // SAFETY: the range is inside this allocation; T: Copy is plain bytes; `data`
        // outlives the copy (synchronized below).
        unsafe {
            result::memcpy_htod_async(self.ptr + off as u64, data, self.lane.stream.cu_stream())
        }
        .map_err(|e| derr("cuMemcpyHtoDAsync", e))?;
        self.sync("cuMemcpyHtoD")
    }
    fn sync(&self, what: &str) -> Result<()> {
        self.lane
            .stream
            .synchronize()
            .map_err(|e| derr(&format!("{what} (stream synchronize)"), e))
    }
    /// The whole buffer as `len / size_of::<T>()` elements (synchronous).
    pub fn download<T: Copy + Default>(&self) -> Result<Vec<T>> {
        let mut v = vec![T::default(); self.len / std::mem::size_of::<T>().max(1)];
        self.ctx
            .bind_to_thread()
            .map_err(|e| derr("bind context", e))?;
        // SAFETY: v's bytes lie inside the allocation; v outlives the copy.
        unsafe { result::memcpy_dtoh_async(&mut v[..], self.ptr, self.lane.stream.cu_stream()) }
            .map_err(|e| derr("cuMemcpyDtoHAsync", e))?;
        self.sync("cuMemcpyDtoH")?;
        Ok(v)
    }
    /// Set every byte to `byte` (synchronous), e.g. to poison outputs.
    pub fn fill(&self, byte: u8) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| derr("bind context", e))?;
        // SAFETY: the whole allocation.
        unsafe { result::memset_d8_async(self.ptr, byte, self.len, self.lane.stream.cu_stream()) }
            .map_err(|e| derr("cuMemsetD8Async", e))?;
        self.sync("cuMemsetD8")
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        if self.ptr == 0 || !bind_in_drop(&self.ctx) {
            return;
        }
        // Work queued on any stream of the context may still use the buffer (a peer's
        // stream reading a handed-over piece, the compute stream reading what the copy
        // thread allocated): the free is ordered after all of it.
        if self.pooled && free_after_all_streams(&self.ctx, self.ptr, self.len).is_ok() {
            return;
        }
        // No pools (or the ordered free failed: a faulted context): wait for everything.
        let _ = self.ctx.synchronize();
        // SAFETY: allocated here and freed once; nothing queued can still use it. Pool
        // memory goes back through the allocating stream (after the allocation).
        let _ = unsafe {
            if self.pooled {
                result::free_async(self.ptr, self.lane.stream.cu_stream())
            } else {
                result::free_sync(self.ptr)
            }
        };
    }
}

/// Sets up the device's default memory pool for the engine's use of it.
fn configure_pool(ctx: &CudaContext) -> std::result::Result<(), DriverError> {
    // SAFETY: the context's own device; each attribute value has the type the driver
    // documents for it (int, cuuint64_t).
    unsafe {
        let pool = result::device::get_mem_pool(ctx.cu_device())?;
        // Reuse of freed pool memory must not make a stream wait for the free stream
        // (which waits for every stream: a compute stream would then wait for the copy
        // streams' reshard kernels). Completed frees are still reused; the pool grows
        // instead of waiting (an allocation that finds no memory retries once after
        // the pending frees complete, see `CudaDevice::alloc`).
        let mut no: i32 = 0;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_REUSE_ALLOW_INTERNAL_DEPENDENCIES,
            &mut no as *mut i32 as *mut c_void,
        )?;
        // Keep freed memory in the pool: with the default threshold (0) the pool hands
        // it back to the device at every synchronize and the next step's hand-over
        // buffers map it again. `mem_info` trims the pool before reading free memory.
        let mut keep: u64 = u64::MAX;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut keep as *mut u64 as *mut c_void,
        )?;
    }
    Ok(())
}

/// Queues `ctx`'s pending frees and waits until every queued free has completed (the
/// out-of-memory path of an allocation: the host waits only there).
fn settle_frees(ctx: &CudaContext) -> std::result::Result<(), DriverError> {
    let free_stream = {
        let mut all = lanes();
        let key = ctx.cu_ctx() as usize;
        let Some(l) = all.iter_mut().find(|l| l.ctx == key) else {
            return Ok(());
        };
        // (A stale error another handle's drop left in cudarc is reported here too:
        // the wait below still decides.)
        let _ = free_pending(l);
        l.free_stream.clone()
    };
    free_stream.synchronize()
}

/// Binds `ctx` in a destructor. cudarc hands a stored error of an earlier drop back
/// from the first bind (and clears it); a second try then binds, so a stale error
/// does not make a drop skip its drain or leak its memory.
fn bind_in_drop(ctx: &CudaContext) -> bool {
    ctx.bind_to_thread().is_ok() || ctx.bind_to_thread().is_ok()
}

/// Every context's kernel module, loaded once per context: a JIT of the PTX per handle
/// (a compute and a copy stream per worker) would cost seconds at start-up. Each entry
/// keeps its context retained, so the module handle stays valid for the process.
static MODULES: Mutex<Vec<LoadedModule>> = Mutex::new(Vec::new());

/// (context address, arch, the context kept retained, the module or why it did not
/// load: a failure is remembered, not retried by every handle that opens).
type LoadedModule = (
    usize,
    Arch,
    Arc<CudaContext>,
    std::result::Result<Arc<Module>, String>,
);

/// The kernel module of `ctx` for `arch`, loading it on first use.
fn shared_module(ctx: &Arc<CudaContext>, arch: Arch) -> Result<Arc<Module>> {
    let mut all = MODULES.lock().unwrap_or_else(|e| e.into_inner());
    let key = ctx.cu_ctx() as usize;
    if let Some((_, _, _, m)) = all.iter().find(|(k, a, _, _)| *k == key && *a == arch) {
        return m.clone().map_err(Error::Device);
    }
    let m = load_module(ctx, arch).map(Arc::new);
    all.push((key, arch, ctx.clone(), m.clone()));
    m.map_err(Error::Device)
}

/// The sm_90a module's load failure was reported (once per process).
static SM90A_WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn load_module(ctx: &CudaContext, arch: Arch) -> std::result::Result<Module, String> {
    ctx.bind_to_thread()
        .map_err(|e| format!("bind context: {e:?}"))?;
    let src = CString::new(kernels::ptx(arch)).map_err(|e| e.to_string())?;
    const LOG: usize = 16 << 10;
    let mut err_log = vec![0u8; LOG];
    let mut info_log = vec![0u8; LOG];
    let mut opts = [
        sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER,
        sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
        sys::CUjit_option::CU_JIT_INFO_LOG_BUFFER,
        sys::CUjit_option::CU_JIT_INFO_LOG_BUFFER_SIZE_BYTES,
    ];
    let mut vals: [*mut c_void; 4] = [
        err_log.as_mut_ptr() as *mut c_void,
        LOG as *mut c_void,
        info_log.as_mut_ptr() as *mut c_void,
        LOG as *mut c_void,
    ];
    let mut raw = std::ptr::null_mut();
    // SAFETY: NUL-terminated PTX text; option values per the driver API.
    let r = unsafe {
        sys::cuModuleLoadDataEx(
            &mut raw,
            src.as_ptr() as *const c_void,
            opts.len() as u32,
            opts.as_mut_ptr(),
            vals.as_mut_ptr(),
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        let log = String::from_utf8_lossy(&err_log);
        return Err(format!(
            "loading the {} PTX module (cuModuleLoadDataEx): {r:?}\n{}",
            arch.name(),
            log.trim_end_matches('\0')
        ));
    }
    // Every kernel resolved now: with CUDA's lazy loading (the default since 12.2) a
    // kernel's code is loaded onto the device at its first lookup, which could come
    // after the KV cache and the pool (which keeps its memory) took the device's memory.
    let funcs = resolve_kernels(raw, arch).inspect_err(|_| {
        // SAFETY: loaded above, used by nothing yet.
        let _ = unsafe { sys::cuModuleUnload(raw) };
    })?;
    Ok(Module { raw, funcs })
}

/// Every kernel of `arch`'s module `raw` by name, with its dynamic shared memory
/// opt-in set.
fn resolve_kernels(
    raw: sys::CUmodule,
    arch: Arch,
) -> std::result::Result<HashMap<&'static str, sys::CUfunction>, String> {
    let mut funcs = HashMap::new();
    for name in kernels::names(arch) {
        let cname = CString::new(name).map_err(|e| e.to_string())?;
        let mut f = std::ptr::null_mut();
        // SAFETY: a loaded module and a NUL-terminated name.
        let r = unsafe { sys::cuModuleGetFunction(&mut f, raw, cname.as_ptr()) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(format!("cuModuleGetFunction({name}): {r:?}"));
        }
        // dynamic shared memory over the default 48 KiB needs the opt-in attribute
        let smem = kernels::dynamic_smem(name);
        if smem > 0 {
            let attr = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
            // SAFETY: a function of the module loaded above.
            let r = unsafe { sys::cuFuncSetAttribute(f, attr, smem as i32) };
            if r != sys::CUresult::CUDA_SUCCESS {
                return Err(format!(
                    "cuFuncSetAttribute({name}, max dynamic shared memory {smem} B): {r:?}"
                ));
            }
        }
        funcs.insert(name, f);
    }
    Ok(funcs)
}

/// Registers `lane` among its context's streams (setting the context up on first use:
/// its free stream and memory pool). Returns whether allocations may use the pool.
fn register_lane(ctx: &Arc<CudaContext>, lane: &Arc<Lane>) -> Result<bool> {
    let mut all = lanes();
    let key = ctx.cu_ctx() as usize;
    if !all.iter().any(|l| l.ctx == key) {
        // A pool we cannot configure is not used: plain allocations instead.
        let pooled = configure_pool(ctx).is_ok();
        let free_stream = ctx.new_stream().map_err(|e| derr("cuStreamCreate", e))?;
        all.push(Lanes {
            ctx: key,
            free_stream,
            live: Vec::new(),
            pending: Vec::new(),
            pending_bytes: 0,
            pooled,
        });
    }
    let Some(l) = all.iter_mut().find(|l| l.ctx == key) else {
        return Ok(false);
    };
    l.live.retain(|w| w.strong_count() > 0);
    l.live.push(Arc::downgrade(lane));
    Ok(l.pooled)
}

/// A CUDA device: its primary context, one stream, the kernel module (one per context,
/// shared by every handle, loaded when the first handle opens).
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// The stream, registered for stream-ordered frees.
    lane: Arc<Lane>,
    /// Allocations come from the device's memory pool (`cuMemAllocAsync`).
    pooled: bool,
    arch: Arch,
    name: String,
    cc: (i32, i32),
    module: Arc<Module>,
    sync_check: std::sync::atomic::AtomicBool,
    /// Programmatic dependent launch for this handle's launches and graphs (see
    /// [`CudaDevice::set_pdl`]).
    pdl: std::sync::atomic::AtomicBool,
    /// Pinned slots uploads go through: set up when the handle opens (`Some(None)`: no
    /// pinned memory to be had, uploads go from pageable memory).
    staging: Mutex<Option<Option<Staging>>>,
}

/// Pinned host memory for uploads (the pinned staging): from pinned memory
/// `cuMemcpyHtoDAsync` is fully asynchronous, where from pageable memory the driver
/// may wait for the stream before it stages the bytes itself. `STAGING_SLOTS` slots of
/// `STAGING_SLOT` bytes are filled in turn (small uploads share one), each with the
/// event of its last copy: the host waits only when it is that many slots ahead of the
/// stream, and a large upload (a weight shard at load) streams through them, filling
/// one while others copy.
struct Staging {
    base: *mut u8,
    /// The slot being filled and how many of its bytes are taken this round.
    slot: usize,
    used: usize,
    done: Vec<CudaEvent>,
}
// SAFETY: `base` is pinned host memory owned by this struct (freed in CudaDevice's
// drop), used under the staging mutex only.
unsafe impl Send for Staging {}

const STAGING_SLOT: usize = 1 << 20;
const STAGING_SLOTS: usize = 8;

struct Module {
    #[allow(dead_code)] // kept with its functions: the module is never unloaded
    raw: sys::CUmodule,
    /// Every kernel of the module ([`kernels::names`]), resolved at load (read-only
    /// after).
    funcs: HashMap<&'static str, sys::CUfunction>,
}
// SAFETY: CUmodule / CUfunction handles are usable from any thread with the context
// current; the map is never written after the load.
unsafe impl Send for Module {}
unsafe impl Sync for Module {}

impl CudaDevice {
    /// Open device `ordinal`. Fails with [`Error::Device`] (never panics) when there is
    /// no CUDA driver, no device, or the device is older than sm_80.
    pub fn open(ordinal: usize) -> Result<CudaDevice> {
        if !driver_present() {
            return Err(Error::Device(
                "no CUDA driver: libcuda.so could not be loaded (is this a GPU machine?)".into(),
            ));
        }
        result::init().map_err(|e| derr("cuInit", e))?;
        let count = CudaContext::device_count().map_err(|e| derr("cuDeviceGetCount", e))?;
        if count <= 0 || ordinal >= count as usize {
            return Err(Error::Device(format!(
                "no CUDA device {ordinal} ({count} present)"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| derr("cuDevicePrimaryCtxRetain", e))?;
        let cc = ctx
            .compute_capability()
            .map_err(|e| derr("compute capability", e))?;
        let name = ctx.name().map_err(|e| derr("device name", e))?;
        let arch = Arch::for_compute_capability(cc.0 as u32, cc.1 as u32).ok_or_else(|| {
            Error::Device(format!(
                "{name}: compute capability {}.{} is below sm_80 (needs cp.async, ldmatrix, bf16 mma)",
                cc.0, cc.1
            ))
        })?;
        // Buffers here are raw allocations ordered by our own events: cudarc's tracking
        // (for its CudaSlice) would only add a context-wide synchronize per new stream.
        // SAFETY: no CudaSlice is used on this context.
        unsafe { ctx.disable_event_tracking() };
        let (arch, module) = match shared_module(&ctx, arch) {
            // The sm_90a module is the sm_90 one plus the wgmma kernels, which no GPU run
            // has loaded yet: should it fail to load, the device runs the sm_90 module
            // (everything the engine uses) and says so, rather than not opening.
            Err(e) if arch == Arch::Sm90a => {
                if !SM90A_WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    eprintln!("remp: {name}: the sm_90a kernel module did not load, using sm_90 (no wgmma kernels): {e}");
                }
                (Arch::Sm90, shared_module(&ctx, Arch::Sm90)?)
            }
            r => (arch, r?),
        };
        let stream = ctx.new_stream().map_err(|e| derr("cuStreamCreate", e))?;
        let lane = Arc::new(Lane {
            stream: stream.clone(),
            mark: ctx.new_event(None).map_err(|e| derr("cuEventCreate", e))?,
        });
        let pooled = ctx.has_async_alloc() && register_lane(&ctx, &lane)?;
        let dev = CudaDevice {
            ctx,
            stream,
            lane,
            pooled,
            arch,
            name,
            cc,
            module,
            staging: Mutex::new(None),
            // REMP_CUDA_SYNC_CHECK=1: wait for every kernel, so a fault is reported by
            // the launch that caused it (slow; the GPU check's device tests use it).
            sync_check: std::sync::atomic::AtomicBool::new(
                std::env::var("REMP_CUDA_SYNC_CHECK").is_ok_and(|v| v == "1"),
            ),
            pdl: std::sync::atomic::AtomicBool::new(false),
        };
        // The pinned staging now, not at the first upload: pinning host memory is slow
        // and holds the driver up, and a copy thread's first upload comes during a
        // switch (a KV piece's descriptors), where the first job took 13-25 ms and
        // stalled the step beside it to 27 ms (run 6 in docs/gpu-results.md).
        if let Ok(mut st) = dev.staging.lock() {
            *st = Some(dev.new_staging());
        }
        Ok(dev)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn arch(&self) -> Arch {
        self.arch
    }
    pub fn compute_capability(&self) -> (i32, i32) {
        self.cc
    }
    /// The device's ordinal (every handle of one GPU shares it).
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// Raw stream handle (for events, cuBLAS, async copies).
    pub fn cu_stream(&self) -> sys::CUstream {
        self.stream.cu_stream()
    }
    /// A device attribute (e.g. `CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT`).
    pub fn attribute(&self, a: sys::CUdevice_attribute) -> Result<i32> {
        self.ctx
            .attribute(a)
            .map_err(|e| derr("cuDeviceGetAttribute", e))
    }
    pub fn sm_count(&self) -> Result<u32> {
        Ok(
            self.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
                as u32,
        )
    }
    /// `(free, total)` bytes of the device's memory now (`cuMemGetInfo`, with this
    /// device's context current: other processes' and this one's allocations are out of
    /// `free`).
    pub fn mem_info(&self) -> Result<(u64, u64)> {
        self.bind()?;
        if self.pooled {
            // Idle pool memory (kept across steps, see `configure_pool`) is free memory.
            // SAFETY: the device's default pool; trimming keeps memory in use.
            unsafe {
                let pool = result::device::get_mem_pool(self.ctx.cu_device())
                    .map_err(|e| derr("cuDeviceGetMemPool", e))?;
                result::mem_pool::trim_to(pool, 0).map_err(|e| derr("cuMemPoolTrimTo", e))?;
            }
        }
        let (free, total) = result::mem_get_info().map_err(|e| derr("cuMemGetInfo", e))?;
        Ok((free as u64, total as u64))
    }
    /// After every launch also synchronize and check the kernel ran to completion
    /// (tests: a trap or fault is reported at the launch that caused it).
    pub fn set_sync_check(&self, on: bool) {
        self.sync_check
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Programmatic dependent launch (PDL) for this handle's later launches and graphs:
    /// each kernel may be scheduled while the one before it on the stream finishes
    /// (`CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`; in a graph, programmatic
    /// edges), runs its `prefetch` block (decode GEMMs: their weight slices into L2), and
    /// waits in `griddepcontrol.wait` for the previous kernel to complete before it
    /// touches memory (`kernels!` puts the wait at the top of every remp kernel). Needs
    /// compute capability 9.0 or later: the sm_80 module has no wait, so it is refused
    /// there.
    pub fn set_pdl(&self, on: bool) -> Result<()> {
        if on && self.cc.0 < 9 {
            return Err(Error::Device(format!(
                "programmatic dependent launch needs compute capability 9.0 or later ({} is {}.{})",
                self.name, self.cc.0, self.cc.1
            )));
        }
        self.pdl.store(on, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
    pub fn pdl(&self) -> bool {
        self.pdl.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| derr("bind context", e))
    }

    /// Allocate `bytes` bytes (contents undefined). From the memory pool, ordered on this
    /// handle's stream: another stream may use it only after an event recorded here
    /// after the allocation (which the hand-over's ready event is).
    pub fn alloc(&self, bytes: usize) -> Result<DevBuf> {
        self.bind()?;
        let ptr = if bytes == 0 {
            0
        } else if self.pooled {
            // SAFETY: a stream-ordered allocation on this live stream, freed by
            // DevBuf's drop with cuMemFreeAsync.
            let try_alloc = || unsafe { result::malloc_async(self.cu_stream(), bytes) };
            match try_alloc() {
                // Freed memory still queued behind other streams' work (frees wait for
                // every stream) is not reused without waiting: wait for it, once.
                Err(DriverError(sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY)) => {
                    settle_frees(&self.ctx).map_err(|e| derr("waiting for queued frees", e))?;
                    try_alloc()
                }
                r => r,
            }
            .map_err(|e| derr(&format!("cuMemAllocAsync({bytes} B)"), e))?
        } else {
            // SAFETY: plain allocation, freed by DevBuf's drop.
            unsafe { result::malloc_sync(bytes) }
                .map_err(|e| derr(&format!("cuMemAlloc({bytes} B)"), e))?
        };
        let b = DevBuf {
            ptr,
            len: bytes,
            pooled: self.pooled,
            ctx: self.ctx.clone(),
            lane: self.lane.clone(),
        };
        // The kernels use 128-bit accesses (pools align to far more in practice).
        if ptr % 16 != 0 {
            return Err(Error::Device(format!(
                "allocation of {bytes} B at {ptr:#x} is not 16-byte aligned"
            )));
        }
        Ok(b)
    }
    /// Allocate and upload `data`.
    pub fn upload<T: Copy>(&self, data: &[T]) -> Result<DevBuf> {
        let b = self.alloc(std::mem::size_of_val(data).max(1))?;
        if !data.is_empty() {
            b.upload(data)?;
        }
        Ok(b)
    }
    /// Allocate `bytes` bytes, every byte set to `poison`.
    pub fn alloc_poisoned(&self, bytes: usize, poison: u8) -> Result<DevBuf> {
        let b = self.alloc(bytes.max(1))?;
        b.fill(poison)?;
        Ok(b)
    }

    /// Wait for the stream and report any asynchronous error (trap, fault). Queues the
    /// context's batched frees first.
    pub fn synchronize(&self) -> Result<()> {
        self.bind()?;
        if self.pooled {
            flush_frees(&self.ctx);
        }
        self.stream
            .synchronize()
            .map_err(|e| derr("kernel execution (cuStreamSynchronize)", e))
    }

    /// Copies `src` to device address `dst`, ordered on this stream, through the pinned
    /// staging slots (the host returns once the bytes are in pinned memory; it waits
    /// only for a slot still being copied from). Without pinned memory: from `src`
    /// itself, which the driver copies or stages before returning.
    fn upload_staged(&self, dst: u64, src: &[u8]) -> Result<()> {
        let mut guard = self
            .staging
            .lock()
            .map_err(|_| Error::Device("staging lock poisoned".into()))?;
        // Set up once; if pinned memory cannot be had, every upload goes pageable.
        let st = match guard.get_or_insert_with(|| self.new_staging()) {
            Some(st) => st,
            None => {
                // SAFETY: `dst..dst + len` is inside a live allocation (checked by the
                // caller); `src` is copied or staged before this returns.
                return unsafe { result::memcpy_htod_async(dst, src, self.cu_stream()) }
                    .map_err(|e| derr("cuMemcpyHtoDAsync", e));
            }
        };
        // Small uploads (a step's inputs) share a slot; the current slot is filled
        // before the next is taken, and a slot is taken only once its last copy has
        // read it (an event never recorded is complete).
        let mut at = 0;
        while at < src.len() {
            if st.used == STAGING_SLOT {
                st.slot = (st.slot + 1) % STAGING_SLOTS;
                st.used = 0;
                st.done[st.slot]
                    .synchronize()
                    .map_err(|e| derr("cuEventSynchronize (staging slot)", e))?;
            }
            let n = (src.len() - at).min(STAGING_SLOT - st.used);
            // SAFETY: bytes `used..used + n` of the current slot are pinned memory no
            // queued copy reads (the slot's earlier copies of this round read other
            // bytes); the destination range is inside the allocation (checked by the
            // caller).
            unsafe {
                let pinned = st.base.add(st.slot * STAGING_SLOT + st.used);
                std::ptr::copy_nonoverlapping(src.as_ptr().add(at), pinned, n);
                let staged = std::slice::from_raw_parts(pinned as *const u8, n);
                result::memcpy_htod_async(dst + at as u64, staged, self.cu_stream())
            }
            .map_err(|e| derr("cuMemcpyHtoDAsync", e))?;
            st.used += n;
            at += n;
            if let Err(e) = st.done[st.slot].record(&self.stream) {
                // Without the event the slot would look free while the copy reads it.
                let _ = self.stream.synchronize();
                return Err(derr("cuEventRecord (staging slot)", e));
            }
        }
        Ok(())
    }

    /// Pinned staging slots and their events; `None` (pageable uploads) if pinned memory
    /// or an event cannot be had.
    fn new_staging(&self) -> Option<Staging> {
        let done: Vec<CudaEvent> = (0..STAGING_SLOTS)
            .map(|_| self.ctx.new_event(None))
            .collect::<std::result::Result<_, _>>()
            .ok()?;
        // SAFETY: a plain pinned allocation, freed in CudaDevice's drop.
        let base = unsafe { result::malloc_host(STAGING_SLOT * STAGING_SLOTS, 0) }.ok()?;
        Some(Staging {
            base: base as *mut u8,
            slot: 0,
            used: 0,
            done,
        })
    }

    /// Asynchronous device-to-device copy on the device's stream.
    pub fn copy_dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: caller passes ranges inside live allocations.
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.cu_stream()) }
            .map_err(|e| derr("cuMemcpyDtoDAsync", e))
    }

    fn module(&self) -> Result<&Module> {
        Ok(&self.module)
    }

    /// Checks the kernel module is loaded (it is, since `open`: kept for callers that
    /// say so explicitly before timing).
    pub fn load_kernels(&self) -> Result<()> {
        self.module().map(|_| ())
    }

    fn function(&self, name: &str) -> Result<sys::CUfunction> {
        self.module()?.funcs.get(name).copied().ok_or_else(|| {
            Error::Device(format!(
                "unknown kernel `{name}` (in the {} module)",
                self.arch.name()
            ))
        })
    }

    /// Launch kernel `name` on the device's stream with `grid` blocks of `block` threads
    /// (1-D blocks, as all remp kernels use) and the given arguments, in the kernel's
    /// parameter order. Checks the launch; with sync-check on, also its completion.
    ///
    /// # Safety
    /// The arguments must match the kernel's parameters in number and type, and every
    /// pointer must be valid for the accesses the kernel makes.
    pub unsafe fn launch(
        &self,
        name: &str,
        grid: [u32; 3],
        block: u32,
        args: &[Arg],
    ) -> Result<()> {
        self.bind()?;
        let f = self.function(name)?;
        let mut vals = arg_slots(args);
        let mut ptrs = slot_ptrs(&mut vals);
        let r = if self.pdl() {
            let mut attr = pdl_attribute();
            let cfg = sys::CUlaunchConfig {
                gridDimX: grid[0],
                gridDimY: grid[1],
                gridDimZ: grid[2],
                blockDimX: block,
                blockDimY: 1,
                blockDimZ: 1,
                sharedMemBytes: kernels::dynamic_smem(name),
                hStream: self.cu_stream(),
                attrs: &mut attr,
                numAttrs: 1,
            };
            sys::cuLaunchKernelEx(&cfg, f, ptrs.as_mut_ptr(), std::ptr::null_mut())
        } else {
            sys::cuLaunchKernel(
                f,
                grid[0],
                grid[1],
                grid[2],
                block,
                1,
                1,
                kernels::dynamic_smem(name),
                self.cu_stream(),
                ptrs.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(Error::Device(format!(
                "launch {name} grid {grid:?} block {block}: {r:?}"
            )));
        }
        if self.sync_check.load(std::sync::atomic::Ordering::Relaxed) {
            self.stream
                .synchronize()
                .map_err(|e| derr(&format!("kernel {name} grid {grid:?} block {block}"), e))?;
        }
        Ok(())
    }
}

/// The launch attribute of programmatic dependent launch (see [`CudaDevice::set_pdl`]).
fn pdl_attribute() -> sys::CUlaunchAttribute {
    // SAFETY: a plain C struct and union, valid when zeroed; the id says which member.
    let mut a: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    a.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    a.value.programmaticStreamSerializationAllowed = 1;
    a
}

/// Kernel arguments as 8-byte slots: each parameter points at its own slot; u32/f32
/// are read from the low 4 bytes (x86_64 is little-endian).
fn arg_slots(args: &[Arg]) -> Vec<u64> {
    args.iter().map(|a| a.bits()).collect()
}

fn slot_ptrs(vals: &mut [u64]) -> Vec<*mut c_void> {
    vals.iter_mut()
        .map(|v| v as *mut u64 as *mut c_void)
        .collect()
}

/// An instantiated CUDA graph: a chain of kernel nodes (see
/// [`crate::backend::device::graph`]). Destroyed on drop; a replay still in flight
/// completes first (the driver frees an executing graph when it finishes).
pub struct CudaGraph {
    exec: sys::CUgraphExec,
    ctx: Arc<CudaContext>,
    nodes: usize,
    /// Its kernels, for the sync-check error (which cannot name one kernel of a graph).
    names: Vec<String>,
}

// SAFETY: a graph exec handle may be launched and destroyed from any thread with its
// context bound; the owner (one worker) does both behind `&self` / drop.
unsafe impl Send for CudaGraph {}
unsafe impl Sync for CudaGraph {}

impl CudaGraph {
    pub fn nodes(&self) -> usize {
        self.nodes
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        if bind_in_drop(&self.ctx) {
            // SAFETY: instantiated by build_graph, destroyed once.
            let _ = unsafe { sys::cuGraphExecDestroy(self.exec) };
        }
    }
}

fn check(r: sys::CUresult, what: impl FnOnce() -> String) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(Error::Device(format!("{}: {r:?}", what())))
    }
}

impl CudaDevice {
    /// Builds `run` into a chain of kernel nodes (each after the previous one, as on a
    /// stream) and instantiates it.
    ///
    /// # Safety
    /// As [`CudaDevice::launch`] for every launch, at every replay.
    pub unsafe fn build_graph(
        &self,
        run: &[crate::backend::device::Launch],
    ) -> Result<Option<CudaGraph>> {
        // cudarc resolves a driver function at its first call and panics where the
        // driver lacks it (cuGraphAddKernelNode_v2 came with CUDA 12.0): an error here,
        // so that the caller launches kernel by kernel; remembered, so that the panic
        // (and its message) happens once, not at every run.
        static GRAPHS_MISSING: AtomicBool = AtomicBool::new(false);
        const MISSING: &str =
            "the CUDA driver lacks the graph functions remp uses (CUDA 12.0 or later)";
        if GRAPHS_MISSING.load(Ordering::Relaxed) {
            return Err(Error::Device(MISSING.into()));
        }
        let missing = |panic: Box<dyn std::any::Any + Send>| {
            // cudarc's loader panics with "Missing symbol …"; any other panic is a bug of
            // this build, reported as such and not remembered.
            let msg = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("");
            if msg.contains("Missing symbol") {
                GRAPHS_MISSING.store(true, Ordering::Relaxed);
                Error::Device(MISSING.into())
            } else {
                Error::Device(format!("building a CUDA graph panicked: {msg}"))
            }
        };
        self.bind()?;
        let mut graph: sys::CUgraph = std::ptr::null_mut();
        catch_unwind(AssertUnwindSafe(|| {
            check(sys::cuGraphCreate(&mut graph, 0), || "cuGraphCreate".into())
        }))
        .unwrap_or_else(|p| Err(missing(p)))?;
        let pdl = self.pdl();
        let built = catch_unwind(AssertUnwindSafe(|| {
            let mut prev: Option<sys::CUgraphNode> = None;
            for l in run {
                let mut vals = arg_slots(&l.args);
                let mut ptrs = slot_ptrs(&mut vals);
                // The parameter values are copied into the node when it is added.
                let p = sys::CUDA_KERNEL_NODE_PARAMS {
                    func: self.function(&l.name)?,
                    gridDimX: l.grid[0],
                    gridDimY: l.grid[1],
                    gridDimZ: l.grid[2],
                    blockDimX: l.block,
                    blockDimY: 1,
                    blockDimZ: 1,
                    sharedMemBytes: kernels::dynamic_smem(&l.name),
                    kernelParams: ptrs.as_mut_ptr(),
                    extra: std::ptr::null_mut(),
                    kern: std::ptr::null_mut(),
                    ctx: std::ptr::null_mut(),
                };
                let mut node: sys::CUgraphNode = std::ptr::null_mut();
                // With PDL the edge from the previous kernel is programmatic (added
                // below): the node goes in without dependencies first.
                let deps: &[sys::CUgraphNode] = if pdl { &[] } else { prev.as_slice() };
                check(
                    sys::cuGraphAddKernelNode_v2(&mut node, graph, deps.as_ptr(), deps.len(), &p),
                    || format!("graph node {} grid {:?} block {}", l.name, l.grid, l.block),
                )?;
                if let (true, Some(from)) = (pdl, prev) {
                    // The graph form of the PDL launch attribute: `node` may start once
                    // every block of `from` has run griddepcontrol.launch_dependents
                    // (or exited), and waits for `from` in griddepcontrol.wait.
                    let edge = sys::CUgraphEdgeData {
                        from_port: sys::CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC as u8,
                        to_port: 0,
                        type_: sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC
                            as u8,
                        reserved: [0; 5],
                    };
                    check(
                        sys::cuGraphAddDependencies_v2(graph, &from, &node, &edge, 1),
                        || format!("programmatic graph edge to {}", l.name),
                    )?;
                }
                prev = Some(node);
            }
            let mut exec: sys::CUgraphExec = std::ptr::null_mut();
            check(
                sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0),
                || format!("cuGraphInstantiate ({} kernels)", run.len()),
            )?;
            Ok(exec)
        }))
        .unwrap_or_else(|p| Err(missing(p)));
        // The executable graph does not need its template (nor does a failed build).
        let _ = sys::cuGraphDestroy(graph);
        Ok(Some(CudaGraph {
            exec: built?,
            ctx: self.ctx.clone(),
            nodes: run.len(),
            names: run.iter().map(|l| l.name.clone()).collect(),
        }))
    }

    /// Queues `g` on this handle's stream; with sync-check on, also waits for it (a
    /// fault then names the graph's kernels, not one of them).
    pub fn launch_graph(&self, g: &CudaGraph) -> Result<()> {
        self.bind()?;
        // SAFETY: a live exec of this context; its launches' contract held when built.
        check(
            unsafe { sys::cuGraphLaunch(g.exec, self.cu_stream()) },
            || format!("cuGraphLaunch ({} kernels)", g.nodes),
        )?;
        if self.sync_check.load(std::sync::atomic::Ordering::Relaxed) {
            self.stream
                .synchronize()
                .map_err(|e| derr(&format!("graph of {}", g.names.join(", ")), e))?;
        }
        Ok(())
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        if !bind_in_drop(&self.ctx) {
            return;
        }
        // Always: once its handle is gone a stream may be destroyed (with the last
        // buffer allocated on it) and leave the registry, and frees order themselves
        // only after live streams, so it must have no work left.
        let _ = self.stream.synchronize();
        let staging = self
            .staging
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(Some(st)) = staging {
            // SAFETY: allocated by cuMemHostAlloc; the stream that read it is drained.
            let _ = unsafe { result::free_host(st.base as *mut c_void) };
        }
    }
}

/// Timing with CUDA events on the device's stream.
pub struct EventTimer {
    start: sys::CUevent,
    stop: sys::CUevent,
    stream: sys::CUstream,
    /// Bound before every call: the raw event calls need the device's context current
    /// on the calling thread (another device's buffer dropped there may have left its
    /// own).
    ctx: Arc<CudaContext>,
}

impl EventTimer {
    pub fn new(dev: &CudaDevice) -> Result<EventTimer> {
        dev.bind()?;
        let flags = sys::CUevent_flags::CU_EVENT_DEFAULT;
        let start = result::event::create(flags).map_err(|e| derr("cuEventCreate", e))?;
        let stop = result::event::create(flags).map_err(|e| derr("cuEventCreate", e))?;
        Ok(EventTimer {
            start,
            stop,
            stream: dev.cu_stream(),
            ctx: dev.ctx.clone(),
        })
    }
    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| derr("cuCtxSetCurrent", e))
    }
    pub fn start(&self) -> Result<()> {
        self.bind()?;
        // SAFETY: live event and stream.
        unsafe { result::event::record(self.start, self.stream) }
            .map_err(|e| derr("cuEventRecord", e))
    }
    /// Record the stop event, wait for it, and return the elapsed milliseconds.
    pub fn stop_ms(&self) -> Result<f32> {
        self.bind()?;
        // SAFETY: live events and stream.
        unsafe {
            result::event::record(self.stop, self.stream).map_err(|e| derr("cuEventRecord", e))?;
            result::event::synchronize(self.stop).map_err(|e| derr("cuEventSynchronize", e))?;
            event_elapsed_ms(self.start, self.stop)
        }
    }
}

/// `cuEventElapsedTime` between two completed events. cudarc (built for CUDA 13) calls
/// `cuEventElapsedTime_v2`, which drivers before CUDA 12.8 lack (cudarc panics on a
/// missing symbol): there the original function, same signature, is looked up in the
/// loaded driver library instead (once).
///
/// # Safety
/// Both events recorded and complete, their context current.
unsafe fn event_elapsed_ms(start: sys::CUevent, stop: sys::CUevent) -> Result<f32> {
    type Elapsed = unsafe extern "C" fn(*mut f32, sys::CUevent, sys::CUevent) -> sys::CUresult;
    static V1: std::sync::OnceLock<Option<Elapsed>> = std::sync::OnceLock::new();
    static V2_MISSING: AtomicBool = AtomicBool::new(false);
    if !V2_MISSING.load(Ordering::Relaxed) {
        match catch_unwind(|| result::event::elapsed(start, stop)) {
            Ok(r) => return r.map_err(|e| derr("cuEventElapsedTime", e)),
            Err(_) => V2_MISSING.store(true, Ordering::Relaxed),
        }
    }
    let v1 = V1.get_or_init(|| {
        ["libcuda.so.1", "libcuda.so"].iter().find_map(|name| {
            let name = CString::new(*name).ok()?;
            // SAFETY: RTLD_NOLOAD only finds the library cudarc already loaded; the
            // handle is kept (never closed) as the library stays loaded anyway.
            let lib = libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
            if lib.is_null() {
                return None;
            }
            let f = libc::dlsym(lib, c"cuEventElapsedTime".as_ptr());
            // SAFETY: the driver API's signature of cuEventElapsedTime.
            (!f.is_null()).then(|| std::mem::transmute::<*mut c_void, Elapsed>(f))
        })
    });
    let f = v1.ok_or_else(|| {
        Error::Device(
            "the CUDA driver has neither cuEventElapsedTime_v2 nor cuEventElapsedTime".into(),
        )
    })?;
    let mut ms = 0.0f32;
    check(f(&mut ms, start, stop), || "cuEventElapsedTime".into())?;
    Ok(ms)
}

impl Drop for EventTimer {
    fn drop(&mut self) {
        if bind_in_drop(&self.ctx) {
            // SAFETY: created by new, destroyed once, their context current.
            unsafe {
                let _ = result::event::destroy(self.start);
                let _ = result::event::destroy(self.stop);
            }
        }
    }
}

impl crate::backend::device::Device for CudaDevice {
    fn as_cuda(&self) -> Option<&CudaDevice> {
        Some(self)
    }
    fn describe(&self) -> String {
        format!("{} ({})", self.name(), self.arch().name())
    }
    fn alloc(&self, bytes: usize) -> Result<crate::backend::device::Buf> {
        let b = CudaDevice::alloc(self, bytes.max(1))?;
        Ok(crate::backend::device::Buf::cuda(b, bytes))
    }
    fn upload(&self, dst: &crate::backend::device::Buf, off: usize, src: &[u8]) -> Result<()> {
        crate::backend::device::check_range(dst, off, src.len(), "upload")?;
        if src.is_empty() {
            return Ok(());
        }
        self.bind()?;
        self.upload_staged(dst.ptr() + off as u64, src)
    }
    fn download(
        &self,
        src: &crate::backend::device::Buf,
        off: usize,
        dst: &mut [u8],
    ) -> Result<()> {
        crate::backend::device::check_range(src, off, dst.len(), "download")?;
        if dst.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: inside src's allocation (checked); `dst` outlives the synchronous copy.
        unsafe { result::memcpy_dtoh_async(dst, src.ptr() + off as u64, self.cu_stream()) }
            .map_err(|e| derr("cuMemcpyDtoHAsync", e))?;
        self.synchronize()
    }
    fn copy(
        &self,
        dst: &crate::backend::device::Buf,
        dst_off: usize,
        src: &crate::backend::device::Buf,
        src_off: usize,
        bytes: usize,
    ) -> Result<()> {
        crate::backend::device::check_range(dst, dst_off, bytes, "copy destination")?;
        crate::backend::device::check_range(src, src_off, bytes, "copy source")?;
        if bytes == 0 {
            return Ok(());
        }
        self.copy_dtod(
            dst.ptr() + dst_off as u64,
            src.ptr() + src_off as u64,
            bytes,
        )
    }
    unsafe fn launch(&self, name: &str, grid: [u32; 3], block: u32, args: &[Arg]) -> Result<()> {
        CudaDevice::launch(self, name, grid, block, args)
    }
    fn synchronize(&self) -> Result<()> {
        CudaDevice::synchronize(self)
    }
    fn record(&self) -> Result<crate::backend::device::Event> {
        let e = self
            .stream
            .record_event(None)
            .map_err(|e| derr("cuEventRecord", e))?;
        Ok(crate::backend::device::Event(
            crate::backend::device::EventKind::Cuda(Arc::new(e)),
        ))
    }
    fn wait(&self, e: &crate::backend::device::Event) -> Result<()> {
        let crate::backend::device::EventKind::Cuda(e) = &e.0 else {
            return Err(Error::Device(
                "an emulated event cannot order a CUDA stream".into(),
            ));
        };
        self.stream
            .wait(e)
            .map_err(|e| derr("cuStreamWaitEvent", e))
    }
    fn sm_count(&self) -> u32 {
        CudaDevice::sm_count(self).unwrap_or(1)
    }
    fn set_pdl(&self, on: bool) -> Result<()> {
        CudaDevice::set_pdl(self, on)
    }
    fn has_kernel(&self, name: &str) -> bool {
        self.module.funcs.contains_key(name)
    }
    unsafe fn build_graph(
        &self,
        run: &[crate::backend::device::Launch],
    ) -> Result<Option<crate::backend::device::Graph>> {
        Ok(CudaDevice::build_graph(self, run)?
            .map(|g| crate::backend::device::Graph(crate::backend::device::GraphKind::Cuda(g))))
    }
    fn launch_graph(&self, g: &crate::backend::device::Graph) -> Result<()> {
        let crate::backend::device::GraphKind::Cuda(g) = &g.0 else {
            return Err(Error::Device(
                "an emulated graph cannot run on a CUDA stream".into(),
            ));
        };
        CudaDevice::launch_graph(self, g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine without a GPU (CI), opening a device is an error, not a panic; on a
    /// GPU machine it opens and picks a PTX arch.
    #[test]
    fn open_without_gpu_is_an_error_not_a_panic() {
        match CudaDevice::open(0) {
            Ok(d) => assert!(matches!(d.arch(), Arch::Sm80 | Arch::Sm90 | Arch::Sm90a)),
            Err(e) => {
                assert!(matches!(e, Error::Device(_)), "{e}");
                assert!(e.to_string().starts_with("device: "), "{e}");
            }
        }
        // an absurd ordinal is always an error
        assert!(matches!(CudaDevice::open(1 << 20), Err(Error::Device(_))));
    }
}

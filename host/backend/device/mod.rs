//! What the kernel path of a worker needs from a device: memory addressed by `u64`
//! pointers (what the kernels take), host↔device copies, and kernel launches by name
//! with plain argument lists. Two devices implement it:
//! - [`crate::backend::cuda::CudaDevice`]: a GPU through the CUDA driver (PTX embedded by
//!   `build.rs`, see [`crate::kernels`]);
//! - [`emu::EmuDevice`]: the same kernel source compiled for the host and run by the
//!   `remp-gpu-kernels` emulator (real barriers, shared memory, warp shuffles, the mma
//!   fragment layout), so the whole GPU code path — buffer layouts, launch shapes,
//!   argument lists, the order of kernels in a step — runs in CI without a GPU.
//!
//! A [`Buf`] owns its memory (freed on drop) and is 16-byte aligned (the kernels use
//! 128-bit accesses). Downloads are synchronous; uploads (through pinned staging on
//! CUDA), launches and device-to-device copies are queued on the device handle's stream
//! (the host does not wait for an upload to land). Every handle has a
//! stream of its own: each rank's compute thread and each worker's copy thread. Streams
//! are ordered by [`Event`]s, not by the host: a handle that hands a buffer to another
//! marks it ready ([`mark_ready`]: an event after the work it queued so far, carried in
//! the buffer) and the receiver's stream waits for it ([`wait_ready`]) before its first
//! use, so the sender never blocks. Freeing is ordered after all work queued so far on
//! every stream (on CUDA a stream-ordered free, on the emulator a release deferred
//! until every stream has run that far), so a buffer is never freed under a kernel that
//! reads it and nobody needs to synchronize before dropping one. Asynchronous faults surface at the next synchronizing
//! call of the stream (a worker synchronizes at the end of each step, a copy thread at
//! the end of each job).

pub mod emu;
pub mod graph;
pub mod llama;
pub mod mailbox;

use crate::backend::cuda::DevBuf;
use crate::{Error, Result};
use std::sync::Arc;

/// One kernel argument, passed by value as the kernel's parameter type.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    /// A device pointer (`*const T` / `*mut T` parameters); `Ptr(0)` is null.
    Ptr(u64),
    U32(u32),
    U64(u64),
    F32(f32),
}

impl Arg {
    /// The value's bits, as the launch passes them (an f32 by its bit pattern, so that
    /// two recorded launches compare equal exactly when they pass the same bytes).
    pub fn bits(self) -> u64 {
        match self {
            Arg::Ptr(p) | Arg::U64(p) => p,
            Arg::U32(v) => v as u64,
            Arg::F32(v) => v.to_bits() as u64,
        }
    }
    fn kind(self) -> u8 {
        match self {
            Arg::Ptr(_) => 0,
            Arg::U32(_) => 1,
            Arg::U64(_) => 2,
            Arg::F32(_) => 3,
        }
    }
}

impl PartialEq for Arg {
    fn eq(&self, o: &Arg) -> bool {
        self.kind() == o.kind() && self.bits() == o.bits()
    }
}
impl Eq for Arg {}

impl std::hash::Hash for Arg {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.kind().hash(h);
        self.bits().hash(h);
    }
}

/// One kernel launch as a value: what a [`Graph`] is built from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Launch {
    pub name: String,
    pub grid: [u32; 3],
    pub block: u32,
    pub args: Vec<Arg>,
}

/// A run of kernel launches built once into one executable unit and replayed with
/// [`Device::launch_graph`]: on CUDA an instantiated CUDA graph (one launch call
/// instead of one per kernel), on the emulator the recorded launches. The launches'
/// arguments are fixed when it is built, so it is only replayed where the same run,
/// arguments and all, is wanted again (see [`graph::Recorder`]).
pub struct Graph(pub(crate) GraphKind);

pub(crate) enum GraphKind {
    Emu(Vec<Launch>),
    Cuda(crate::backend::cuda::CudaGraph),
}

impl Graph {
    /// Kernels in the graph.
    pub fn len(&self) -> usize {
        match &self.0 {
            GraphKind::Emu(v) => v.len(),
            GraphKind::Cuda(g) => g.nodes(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl From<&Buf> for Arg {
    fn from(b: &Buf) -> Arg {
        Arg::Ptr(b.ptr())
    }
}

impl From<&Arc<Buf>> for Arg {
    fn from(b: &Arc<Buf>) -> Arg {
        Arg::Ptr(b.ptr())
    }
}

/// Device memory of one allocation.
pub struct Buf {
    ptr: u64,
    len: usize,
    /// Set by the handle that filled it before handing it over: where the work writing
    /// it ends on that handle's stream ([`mark_ready`] / [`wait_ready`]).
    ready: Option<Event>,
    _mem: Mem,
}

/// A point in one handle's stream: the work queued there before it was recorded.
/// Another handle's [`Device::wait`] orders its later work after that point without
/// blocking the host. Cheap to clone (one recording shared by several buffers).
#[derive(Clone)]
pub struct Event(pub(crate) EventKind);

#[derive(Clone)]
pub(crate) enum EventKind {
    Emu(emu::Mark),
    Cuda(Arc<cudarc::driver::CudaEvent>),
}

enum Mem {
    /// Emulator memory: host bytes, 16-byte aligned.
    Host(#[allow(dead_code)] Box<[u128]>),
    Cuda(#[allow(dead_code)] DevBuf),
}

impl Drop for Buf {
    fn drop(&mut self) {
        // Like freeing on CUDA (ordered after the work queued so far on every stream of
        // the context, without waiting for it): the memory is released once every
        // emulated stream has run past its current point. Nothing is run here, so a
        // stream's work still runs only when its owner (or a wait) asks for it.
        if let Mem::Host(m) = &mut self._mem {
            emu::free_after_all_streams(std::mem::take(m));
        }
    }
}

impl Buf {
    /// Emulator memory, every byte 0xFF (NaN as f32/bf16): like `cuMemAlloc`, whose
    /// memory holds whatever was there, a buffer read before it is written is garbage,
    /// not a convenient zero.
    pub(crate) fn host(bytes: usize) -> Buf {
        let mem: Box<[u128]> = vec![u128::MAX; bytes.div_ceil(16).max(1)].into_boxed_slice();
        Buf {
            ptr: mem.as_ptr() as u64,
            len: bytes,
            ready: None,
            _mem: Mem::Host(mem),
        }
    }
    /// A CUDA allocation seen as `len` bytes (a zero-byte request still allocates one
    /// byte, but its length stays 0, as on the emulator).
    pub(crate) fn cuda(b: DevBuf, len: usize) -> Buf {
        debug_assert!(len <= b.len());
        Buf {
            ptr: b.ptr(),
            len: len.min(b.len()),
            ready: None,
            _mem: Mem::Cuda(b),
        }
    }
    /// Device address of the first byte.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    /// The event [`mark_ready`] left on it, if any.
    pub fn ready(&self) -> Option<&Event> {
        self.ready.as_ref()
    }
    /// Sets the event a receiver waits for (one recording shared by several buffers).
    pub fn set_ready(&mut self, e: Event) {
        self.ready = Some(e);
    }
    /// Device address of byte `off` (checked against the length).
    pub fn at(&self, off: usize) -> Result<u64> {
        if off > self.len {
            return Err(Error::Device(format!(
                "offset {off} beyond a {}-byte buffer",
                self.len
            )));
        }
        Ok(self.ptr + off as u64)
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A device the worker's kernel path runs on.
pub trait Device: Send + Sync {
    /// What it is, for logs and JSON (e.g. "NVIDIA H200 (sm_90)", "emulated GPU").
    fn describe(&self) -> String;
    /// `bytes` bytes of device memory (contents undefined).
    fn alloc(&self, bytes: usize) -> Result<Buf>;
    /// Host → device, `src` to byte `off` of `dst`, queued after the work already queued
    /// (the host does not wait for the device). `src` may be reused as soon as it
    /// returns: on CUDA it is copied into the handle's pinned staging slots first (or,
    /// without pinned memory, the driver stages it before returning). Like any write,
    /// another handle sees it only after an event or a synchronize.
    fn upload(&self, dst: &Buf, off: usize, src: &[u8]) -> Result<()>;
    /// Device → host, from byte `off` of `src` (synchronous, after queued work).
    fn download(&self, src: &Buf, off: usize, dst: &mut [u8]) -> Result<()>;
    /// Device → device, `bytes` bytes, queued after the work already queued.
    fn copy(
        &self,
        dst: &Buf,
        dst_off: usize,
        src: &Buf,
        src_off: usize,
        bytes: usize,
    ) -> Result<()>;
    /// Launch kernel `name` over `grid` blocks of `block` threads.
    ///
    /// # Safety
    /// `args` must match the kernel's parameters in number and type and every pointer
    /// must be valid for the accesses the kernel makes.
    unsafe fn launch(&self, name: &str, grid: [u32; 3], block: u32, args: &[Arg]) -> Result<()>;
    /// Wait for queued work; reports asynchronous faults.
    fn synchronize(&self) -> Result<()>;
    /// An event after the work queued so far on this handle's stream (no host wait).
    fn record(&self) -> Result<Event>;
    /// This handle's later work runs after `e`'s point on its stream (no host wait; a
    /// no-op for an event of this very stream).
    fn wait(&self, e: &Event) -> Result<()>;
    /// Multiprocessors, for launch shapes that size the grid to the device.
    fn sm_count(&self) -> u32;
    /// Whether kernel `name` can be launched here. By default the kernels every module
    /// has ([`crate::kernels::FAMILIES`]); a CUDA device answers for the module it
    /// loaded (the sm_90a one adds the wgmma GEMMs), the emulator for all of them.
    fn has_kernel(&self, name: &str) -> bool {
        crate::kernels::names(crate::kernels::Arch::Sm90).any(|n| n == name)
    }
    /// Programmatic dependent launch for this handle's later launches and graphs (see
    /// `CudaDevice::set_pdl`): a kernel may start while the one before it finishes and
    /// waits for it inside. An error where the handle cannot (a CUDA GPU older than
    /// compute capability 9.0); the emulator accepts it (its launches run one after
    /// another, which PDL's ordering allows).
    fn set_pdl(&self, on: bool) -> Result<()> {
        if on {
            Err(Error::Device(
                "this device has no programmatic dependent launch".into(),
            ))
        } else {
            Ok(())
        }
    }
    /// Builds `run` into one replayable [`Graph`], each launch after the previous one;
    /// `Ok(None)` where this handle does not build graphs (the caller then launches
    /// the run kernel by kernel).
    ///
    /// # Safety
    /// As [`Device::launch`], for every launch of the run, at every replay.
    unsafe fn build_graph(&self, run: &[Launch]) -> Result<Option<Graph>> {
        let _ = run;
        Ok(None)
    }
    /// Queues `g` on this handle's stream, after the work already queued.
    fn launch_graph(&self, g: &Graph) -> Result<()> {
        let _ = g;
        Err(Error::Device("this device does not run graphs".into()))
    }
    /// This handle as the emulator (for the emulated collectives), if it is one.
    fn as_emu(&self) -> Option<&emu::EmuDevice> {
        None
    }
    /// This handle as a CUDA device (for NCCL), if it is one.
    fn as_cuda(&self) -> Option<&crate::backend::cuda::CudaDevice> {
        None
    }
}

/// How device workers exchange partial sums and hidden states with their group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Exchange {
    /// Device-to-device: partials and hidden states move as device buffers through the
    /// Comm layer and the group's partials are summed on the device by the split-K
    /// reduce kernel (with the bias and residual add fused). For ranks that share one
    /// device: the emulator, or several workers on GPU 0. With workers on GPUs of their
    /// own (`EngineConfig::gpus` > 1) the partials are all-gathered and hand-offs sent
    /// through NCCL instead (same sums, same bits; see [`crate::backend::collective`]).
    #[default]
    SameDevice,
    /// Through host memory: download, host messages, upload. Portable; the reference
    /// the same-device path must match bit for bit.
    HostStaged,
}

/// Checks that `off + len` bytes fit in `b` (for the copies' implementations).
pub(crate) fn check_range(b: &Buf, off: usize, len: usize, what: &str) -> Result<()> {
    if off.checked_add(len).is_none_or(|e| e > b.len()) {
        return Err(Error::Device(format!(
            "{what} of {len} B at {off} beyond a {}-byte buffer",
            b.len()
        )));
    }
    Ok(())
}

/// Marks `b` ready for another handle after the work `dev` (its producer) queued so far:
/// the buffer carries the event to whichever handle receives it.
pub fn mark_ready(dev: &dyn Device, b: &mut Buf) -> Result<()> {
    b.ready = Some(dev.record()?);
    Ok(())
}

/// Orders `dev`'s later work after the producer of `b` (when it was marked ready): call
/// before the first use of a buffer received from another handle.
pub fn wait_ready(dev: &dyn Device, b: &Buf) -> Result<()> {
    match &b.ready {
        Some(e) => dev.wait(e),
        None => Ok(()),
    }
}

/// Allocates a buffer and uploads `data`.
pub fn upload_new<T: pod::Pod>(dev: &dyn Device, data: &[T]) -> Result<Buf> {
    let bytes = pod::bytes_of(data);
    let b = dev.alloc(bytes.len())?;
    dev.upload(&b, 0, bytes)?;
    Ok(b)
}

/// Downloads `n` elements of `T` from the start of `b`.
pub fn download_vec<T: pod::Pod>(dev: &dyn Device, b: &Buf, n: usize) -> Result<Vec<T>> {
    let mut v = vec![T::ZERO; n];
    dev.download(b, 0, pod::bytes_of_mut(&mut v))?;
    Ok(v)
}

/// Plain-old-data views without a dependency: the element types the kernel path moves.
pub mod pod {
    /// Types whose every bit pattern is valid and which have no padding.
    ///
    /// # Safety
    /// Implement only for such types.
    pub unsafe trait Pod: Copy + 'static {
        const ZERO: Self;
    }
    unsafe impl Pod for u8 {
        const ZERO: Self = 0;
    }
    unsafe impl Pod for u16 {
        const ZERO: Self = 0;
    }
    unsafe impl Pod for u32 {
        const ZERO: Self = 0;
    }
    unsafe impl Pod for u64 {
        const ZERO: Self = 0;
    }
    unsafe impl Pod for f32 {
        const ZERO: Self = 0.0;
    }
    unsafe impl Pod for half::bf16 {
        const ZERO: Self = half::bf16::ZERO;
    }
    pub fn bytes_of<T: Pod>(v: &[T]) -> &[u8] {
        // SAFETY: Pod has no padding; the length is the slice's size in bytes.
        unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
    }
    pub fn bytes_of_mut<T: Pod>(v: &mut [T]) -> &mut [u8] {
        // SAFETY: every bit pattern is a valid T.
        unsafe {
            std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of_val(v))
        }
    }
}

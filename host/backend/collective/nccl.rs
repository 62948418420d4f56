//! NCCL, loaded at run time like the CUDA driver: one binary serves GPU and CPU-only
//! machines, and a machine without NCCL fails with an error naming the library, never a
//! panic or a link error.
//!
//! - The library is opened once (`lib`: `libnccl.so.2`, which pip's nvidia-nccl-cu1x
//!   installs, then `libnccl.so`) and the entry points used here are resolved into a
//!   table of function pointers; the C types are declared here (a handful: the 128-byte
//!   unique id, opaque communicator pointers, `int` results). NCCL 2.18 or later is
//!   required (`ncclCommSplit`). cudarc's NCCL binding is not used: its loader does not
//!   look for `libnccl.so.2` and its split is gated off for CUDA 13.
//! - Every call's result is checked; an error names the call, NCCL's string for the
//!   code, and NCCL's last error message when it has one.
//! - One thread makes every rank's communicator (`world`, `split`): the ranks'
//!   calls are queued in one NCCL group, each with its GPU's context current (NCCL takes
//!   the rank's device from the current context), and run together at `ncclGroupEnd`.
//! - Buffers are moved as bytes (`ncclUint8`): the engine's collectives are copies (an
//!   all-gather, sends, receives), never reductions, so the element type does not matter.
//! - A handle (`NcclComm`) keeps its GPU's context alive (NCCL's resources live in the
//!   primary context) and is destroyed on drop.

use super::{split_members, CollOp, Communicator, Kind};
use crate::backend::cuda::CudaDevice;
use crate::{Error, Result};
use cudarc::driver::{sys::CUstream, CudaContext};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::ptr::null_mut;
use std::sync::{Arc, OnceLock};

/// `ncclResult_t`: 0 is success.
type NcclResult = c_int;
/// `ncclComm_t`: an opaque pointer.
type RawComm = *mut c_void;

/// `ncclUniqueId`: `NCCL_UNIQUE_ID_BYTES` opaque bytes, passed by value to init.
#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; 128],
}

/// `ncclUint8` of `ncclDataType_t`.
const NCCL_UINT8: c_int = 1;
/// `NCCL_SPLIT_NOCOLOR`: the rank joins no communicator of the split.
const NCCL_SPLIT_NOCOLOR: c_int = -1;
/// `NCCL_VERSION(2, 18, 0)`: the first release with `ncclCommSplit`.
const MIN_VERSION: c_int = 21800;
/// Where the library is looked for, in order (the dynamic loader's search path).
const LIB_NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

/// The loaded library and the entry points used here.
struct Nccl {
    /// Kept open for the process (the table lives in a static): the pointers below stay
    /// valid.
    _lib: libloading::Library,
    /// The file that was opened (for messages).
    file: &'static str,
    /// `ncclGetVersion`'s code, e.g. 23203 for 2.32.3.
    version: c_int,
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> NcclResult,
    comm_init_rank: unsafe extern "C" fn(*mut RawComm, c_int, UniqueId, c_int) -> NcclResult,
    comm_split:
        unsafe extern "C" fn(RawComm, c_int, c_int, *mut RawComm, *mut c_void) -> NcclResult,
    comm_destroy: unsafe extern "C" fn(RawComm) -> NcclResult,
    comm_abort: unsafe extern "C" fn(RawComm) -> NcclResult,
    comm_user_rank: unsafe extern "C" fn(RawComm, *mut c_int) -> NcclResult,
    comm_count: unsafe extern "C" fn(RawComm, *mut c_int) -> NcclResult,
    get_error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
    /// Since 2.13; the message is optional in errors.
    get_last_error: Option<unsafe extern "C" fn(RawComm) -> *const c_char>,
    group_start: unsafe extern "C" fn() -> NcclResult,
    group_end: unsafe extern "C" fn() -> NcclResult,
    all_gather: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        RawComm,
        CUstream,
    ) -> NcclResult,
    send: unsafe extern "C" fn(*const c_void, usize, c_int, c_int, RawComm, CUstream) -> NcclResult,
    recv: unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, RawComm, CUstream) -> NcclResult,
}

/// Resolves `name` in `lib` (a missing symbol is an error naming it and the file).
///
/// # Safety
/// `T` must be the symbol's C signature.
unsafe fn sym<T: Copy>(
    lib: &libloading::Library,
    file: &str,
    name: &str,
) -> std::result::Result<T, String> {
    // SAFETY: the caller's signature; the pointer is copied out and used only while the
    // library stays open (it is kept with the table).
    unsafe { lib.get::<T>(name) }.map(|s| *s).map_err(|e| {
        format!("NCCL: {name} not found in {file} ({e}): NCCL 2.18 or later is needed")
    })
}

/// `major.minor.patch` of a version code (NCCL >= 2.9 encodes it as
/// `major * 10000 + minor * 100 + patch`).
fn version_string(code: c_int) -> String {
    format!("{}.{}.{}", code / 10000, code % 10000 / 100, code % 100)
}

fn load() -> std::result::Result<Nccl, String> {
    let mut first_err = None;
    let mut opened = None;
    for name in LIB_NAMES {
        // SAFETY: loading NCCL runs its initializers, which only set up its own state.
        match unsafe { libloading::Library::new(name) } {
            Ok(l) => {
                opened = Some((l, name));
                break;
            }
            Err(e) => {
                // libloading's own text is "dlopen failed"; dlerror's (which names the
                // file) is its source
                let why = std::error::Error::source(&e).map_or(e.to_string(), |s| s.to_string());
                first_err.get_or_insert(why);
            }
        }
    }
    let Some((lib, file)) = opened else {
        return Err(format!(
            "NCCL library not found (tried {}): install NCCL or add its lib folder to \
             LD_LIBRARY_PATH ({})",
            LIB_NAMES.join(", "),
            first_err.unwrap_or_default()
        ));
    };
    // SAFETY (every `sym` below): the signatures are nccl.h's.
    let get_version: unsafe extern "C" fn(*mut c_int) -> NcclResult =
        unsafe { sym(&lib, file, "ncclGetVersion")? };
    let mut version: c_int = 0;
    // SAFETY: writes one int.
    let r = unsafe { get_version(&mut version) };
    if r != 0 {
        return Err(format!("NCCL: ncclGetVersion in {file} failed ({r})"));
    }
    // Checked before the other symbols: an older library fails here with its version
    // rather than with the first missing symbol.
    if version < MIN_VERSION {
        return Err(format!(
            "NCCL {} ({file}) is too old: ncclCommSplit needs NCCL 2.18 or later",
            version_string(version)
        ));
    }
    Ok(Nccl {
        get_unique_id: unsafe { sym(&lib, file, "ncclGetUniqueId")? },
        comm_init_rank: unsafe { sym(&lib, file, "ncclCommInitRank")? },
        comm_split: unsafe { sym(&lib, file, "ncclCommSplit")? },
        comm_destroy: unsafe { sym(&lib, file, "ncclCommDestroy")? },
        comm_abort: unsafe { sym(&lib, file, "ncclCommAbort")? },
        comm_user_rank: unsafe { sym(&lib, file, "ncclCommUserRank")? },
        comm_count: unsafe { sym(&lib, file, "ncclCommCount")? },
        get_error_string: unsafe { sym(&lib, file, "ncclGetErrorString")? },
        get_last_error: unsafe { sym(&lib, file, "ncclGetLastError") }.ok(),
        group_start: unsafe { sym(&lib, file, "ncclGroupStart")? },
        group_end: unsafe { sym(&lib, file, "ncclGroupEnd")? },
        all_gather: unsafe { sym(&lib, file, "ncclAllGather")? },
        send: unsafe { sym(&lib, file, "ncclSend")? },
        recv: unsafe { sym(&lib, file, "ncclRecv")? },
        version,
        file,
        _lib: lib,
    })
}

/// The library, loaded on first use (a failure is remembered, not retried).
fn lib() -> Result<&'static Nccl> {
    static NCCL: OnceLock<std::result::Result<Nccl, String>> = OnceLock::new();
    NCCL.get_or_init(load)
        .as_ref()
        .map_err(|e| Error::Device(e.clone()))
}

/// Whether NCCL (2.18 or later) can be loaded.
pub fn nccl_present() -> bool {
    lib().is_ok()
}

/// The loaded NCCL's version and file, e.g. `2.32.3 (libnccl.so.2)`, or why it cannot
/// be loaded.
pub fn nccl_version() -> Result<String> {
    lib().map(|n| format!("{} ({})", version_string(n.version), n.file))
}

/// A C string from NCCL (static or thread-local storage), lossily.
///
/// # Safety
/// `p` is null or a NUL-terminated string that stays valid for the call.
unsafe fn c_str(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: the caller's.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

impl Nccl {
    /// `Ok` for `ncclSuccess`, else an error naming the call (`call` is only built on
    /// failure: queueing is on the step's path).
    fn check(&self, r: NcclResult, call: impl FnOnce() -> String) -> Result<()> {
        if r == 0 {
            return Ok(());
        }
        // SAFETY: NCCL returns a static string for any code.
        let what = unsafe { c_str((self.get_error_string)(r)) };
        // The generic strings say "run with NCCL_DEBUG=WARN for details"; the last error
        // often has them (it may be stale: NCCL does not clear it).
        let last = self
            .get_last_error
            // SAFETY: a null communicator is accepted (the argument is unused).
            .map(|f| unsafe { c_str(f(null_mut())) })
            .filter(|s| !s.trim().is_empty())
            .map(|s| format!("; NCCL's last error: {}", s.trim()))
            .unwrap_or_default();
        Err(Error::Device(format!("{}: {what} ({r}){last}", call())))
    }

    /// Ends a group that is being abandoned for an earlier error (NCCL's group state is
    /// per thread and must be closed; it cancels the group's queued work).
    fn end_group_after_error(&self) {
        // SAFETY: a group is open on this thread.
        let _ = unsafe { (self.group_end)() };
    }
}

/// One rank's NCCL communicator.
pub(crate) struct NcclComm {
    nccl: &'static Nccl,
    raw: RawComm,
    /// The rank's GPU: kept alive while the communicator lives, and made current for
    /// its calls.
    ctx: Arc<CudaContext>,
    /// Rank in this communicator (the all-gather's slot).
    rank: usize,
    /// Aborted ([`NcclComm::abort`]): NCCL freed it; nothing may use or destroy it.
    dead: std::sync::atomic::AtomicBool,
    /// Held (shared) across a queue's NCCL calls and (exclusive) by the abort, so the
    /// abort never frees the communicator under a call on another thread.
    in_use: std::sync::RwLock<()>,
}

// SAFETY: an NCCL communicator may be used from any thread with its device current, but
// not from two at once; a handle is used by one thread at a time (the engine hands each
// rank's handle to one worker, and `world`/`split` use every rank's from one thread).
unsafe impl Send for NcclComm {}
unsafe impl Sync for NcclComm {}

fn bind(ctx: &CudaContext) -> Result<()> {
    ctx.bind_to_thread()
        .map_err(|e| Error::Device(format!("NCCL: bind context: {e:?}")))
}

fn to_c_int(v: usize, what: &str) -> Result<c_int> {
    c_int::try_from(v).map_err(|_| Error::Device(format!("NCCL: {what} {v} beyond int")))
}

fn dev_ptr(p: u64) -> *mut c_void {
    p as usize as *mut c_void
}

impl NcclComm {
    /// `ncclCommAbort`: stops this rank's operations still on the device (a peer that
    /// will never post its side would otherwise hold its stream forever) and frees the
    /// communicator. Once; later calls and queues are refused, the drop does nothing.
    /// Meant for a failure while other threads may be blocked waiting on the device; a
    /// queue in progress on this handle on another thread is waited for (`in_use`).
    pub(crate) fn abort(&self) {
        let _excl = self.in_use.write().unwrap_or_else(|e| e.into_inner());
        if self.dead.swap(true, std::sync::atomic::Ordering::AcqRel) || self.raw.is_null() {
            return;
        }
        if self.ctx.bind_to_thread().is_err() {
            let _ = self.ctx.bind_to_thread();
        }
        // SAFETY: created by NCCL, freed once (the flag above).
        let _ = unsafe { (self.nccl.comm_abort)(self.raw) };
    }

    /// NCCL's rank and size of this communicator.
    fn rank_and_size(&self) -> Result<(usize, usize)> {
        let n = self.nccl;
        let (mut rank, mut count): (c_int, c_int) = (-1, -1);
        // SAFETY: a live communicator; each writes one int.
        n.check(unsafe { (n.comm_user_rank)(self.raw, &mut rank) }, || {
            "ncclCommUserRank".into()
        })?;
        n.check(unsafe { (n.comm_count)(self.raw, &mut count) }, || {
            "ncclCommCount".into()
        })?;
        Ok((rank.max(0) as usize, count.max(0) as usize))
    }

    /// Queues `ops` (checked by [`Communicator::queue`]) as one group on `dev`'s stream.
    pub(crate) fn queue(&self, dev: &CudaDevice, ops: &[CollOp]) -> Result<()> {
        let _shared = self.in_use.read().unwrap_or_else(|e| e.into_inner());
        if self.dead.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::Device("NCCL: the communicator was aborted".into()));
        }
        if dev.ordinal() != self.ctx.ordinal() {
            return Err(Error::Device(format!(
                "NCCL: a communicator of GPU {} used on GPU {}",
                self.ctx.ordinal(),
                dev.ordinal()
            )));
        }
        dev.bind()?;
        let n = self.nccl;
        let stream = dev.cu_stream();
        // SAFETY: opens a group on this thread; closed below on every path.
        n.check(unsafe { (n.group_start)() }, || "ncclGroupStart".into())?;
        let queued = ops.iter().try_for_each(|op| self.queue_one(op, stream));
        if let Err(e) = queued {
            n.end_group_after_error();
            return Err(e);
        }
        // SAFETY: closes the group opened above; launches its work on the stream.
        n.check(unsafe { (n.group_end)() }, || {
            format!("ncclGroupEnd ({} ops, rank {})", ops.len(), self.rank)
        })
    }

    fn queue_one(&self, op: &CollOp, stream: CUstream) -> Result<()> {
        let n = self.nccl;
        // SAFETY (each call): the ranges lie inside their buffers (Communicator::check)
        // and the buffers are device memory of this GPU; the stream is this GPU's.
        match *op {
            CollOp::AllGather { bytes: 0, .. }
            | CollOp::Send { bytes: 0, .. }
            | CollOp::Recv { bytes: 0, .. } => Ok(()),
            CollOp::AllGather { buf, bytes } => {
                // In place: this rank's slot of the receive buffer is the send buffer.
                let send = buf.ptr() + (self.rank * bytes) as u64;
                let r = unsafe {
                    (n.all_gather)(
                        dev_ptr(send),
                        dev_ptr(buf.ptr()),
                        bytes,
                        NCCL_UINT8,
                        self.raw,
                        stream,
                    )
                };
                n.check(r, || {
                    format!("ncclAllGather({bytes} B, rank {})", self.rank)
                })
            }
            CollOp::Send {
                buf,
                off,
                bytes,
                peer,
            }
            | CollOp::Recv {
                buf,
                off,
                bytes,
                peer,
            } => {
                let send = matches!(op, CollOp::Send { .. });
                let (p, at) = (to_c_int(peer, "peer")?, dev_ptr(buf.ptr() + off as u64));
                // SAFETY: `at..at + bytes` is in the buffer (checked by the caller), a
                // device address of this rank's GPU; the stream is this rank's.
                let r = unsafe {
                    if send {
                        (n.send)(at, bytes, NCCL_UINT8, p, self.raw, stream)
                    } else {
                        (n.recv)(at, bytes, NCCL_UINT8, p, self.raw, stream)
                    }
                };
                n.check(r, || match send {
                    true => format!("ncclSend({bytes} B, rank {} to {peer})", self.rank),
                    false => format!("ncclRecv({bytes} B, rank {} from {peer})", self.rank),
                })
            }
        }
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if self.raw.is_null() || *self.dead.get_mut() {
            return;
        }
        // cudarc hands a stored error of an earlier call back from the first bind (and
        // clears it): a second try binds. NCCL selects the rank's device itself, so the
        // destroy goes ahead either way; the context is alive (held here).
        if self.ctx.bind_to_thread().is_err() {
            let _ = self.ctx.bind_to_thread();
        }
        // SAFETY: created by NCCL, destroyed once. Safe from one thread for every rank:
        // the last rank's destroy of a process's ranks does the ranks' shared teardown.
        let _ = unsafe { (self.nccl.comm_destroy)(self.raw) };
    }
}

/// NCCL refuses two ranks of one communicator on one GPU (they would hang): same-device
/// ranks use the same-device transport instead.
fn one_rank_per_gpu(ordinals: &[usize]) -> Result<()> {
    for (i, o) in ordinals.iter().enumerate() {
        if let Some(j) = ordinals[..i].iter().position(|p| p == o) {
            return Err(Error::Device(format!(
                "NCCL needs one rank per GPU: ranks {j} and {i} are both on GPU {o} \
                 (ranks on one GPU use the same-device transport)"
            )));
        }
    }
    Ok(())
}

/// Aborts the communicators a failed group left behind (NCCL may have nulled them).
fn abort_all(n: &Nccl, raw: &[RawComm], ctxs: &[&CudaContext]) {
    for (&c, ctx) in raw.iter().zip(ctxs) {
        if !c.is_null() {
            let _ = ctx.bind_to_thread();
            // SAFETY: a communicator NCCL returned and nothing else holds.
            let _ = unsafe { (n.comm_abort)(c) };
        }
    }
}

/// Runs `init(i)` for every rank inside one NCCL group, rank `i`'s context current for
/// its call, and returns the communicators (all or none).
fn grouped_init(
    n: &'static Nccl,
    ctxs: &[&CudaContext],
    what: &str,
    mut init: impl FnMut(usize, &mut RawComm) -> Result<()>,
) -> Result<Vec<RawComm>> {
    // Every context is bound once before the group: a bind that fails inside it would
    // leave the other ranks' inits queued, waiting for a rank that never comes.
    for ctx in ctxs {
        bind(ctx)?;
    }
    let mut raw: Vec<RawComm> = vec![null_mut(); ctxs.len()];
    // SAFETY: opens a group on this thread; closed below on every path.
    n.check(unsafe { (n.group_start)() }, || "ncclGroupStart".into())?;
    let queued = raw
        .iter_mut()
        .enumerate()
        .try_for_each(|(i, c)| bind(ctxs[i]).and_then(|()| init(i, c)));
    if let Err(e) = queued {
        // An NCCL error inside the group makes its end cancel the queued inits.
        n.end_group_after_error();
        abort_all(n, &raw, ctxs);
        return Err(e);
    }
    // SAFETY: closes the group: every rank's init runs here, together.
    let r = unsafe { (n.group_end)() };
    if let Err(e) = n.check(r, || {
        format!("ncclGroupEnd ({what} of {} ranks)", ctxs.len())
    }) {
        abort_all(n, &raw, ctxs);
        return Err(e);
    }
    Ok(raw)
}

/// World communicators over `devs` (rank `i` on `devs[i]`, one GPU each).
pub(crate) fn world(devs: &[&CudaDevice]) -> Result<Vec<Communicator>> {
    let ordinals: Vec<usize> = devs.iter().map(|d| d.ordinal()).collect();
    // (NCCL 2.31 and later run several ranks on one GPU when told to, through host
    // memory: what lets a one-GPU machine check the multi-GPU path.)
    if std::env::var("NCCL_MULTI_RANK_GPU_ENABLE").as_deref() != Ok("1") {
        one_rank_per_gpu(&ordinals)?;
    }
    let n = lib()?;
    let size = devs.len();
    let nranks = to_c_int(size, "rank count")?;
    let mut id = UniqueId { internal: [0; 128] };
    // SAFETY: writes the id.
    n.check(unsafe { (n.get_unique_id)(&mut id) }, || {
        "ncclGetUniqueId".into()
    })?;
    let ctxs: Vec<&CudaContext> = devs.iter().map(|d| &**d.context()).collect();
    let raw = grouped_init(n, &ctxs, "ncclCommInitRank", |i, c| {
        let rank = to_c_int(i, "rank")?;
        // SAFETY: `c` receives the communicator; the id is passed by value.
        let r = unsafe { (n.comm_init_rank)(c, nranks, id, rank) };
        n.check(r, || format!("ncclCommInitRank(rank {i} of {size})"))
    })?;
    Ok(raw
        .into_iter()
        .zip(devs)
        .enumerate()
        .map(|(rank, (raw, d))| {
            let comm = NcclComm {
                nccl: n,
                raw,
                ctx: d.context().clone(),
                rank,
                dead: Default::default(),
                in_use: Default::default(),
            };
            Communicator::new(Kind::Nccl(comm), rank, size)
        })
        .collect())
}

/// Splits `parents` (every rank of one communicator, in rank order; arguments checked by
/// [`super::split`]): `ncclCommSplit` with `args[i]`'s color and key, or
/// `NCCL_SPLIT_NOCOLOR`.
pub(crate) fn split(
    parents: &[&NcclComm],
    args: &[Option<(u32, u32)>],
) -> Result<Vec<Option<Communicator>>> {
    let Some(first) = parents.first() else {
        return Ok(Vec::new());
    };
    let n = first.nccl;
    let ctxs: Vec<&CudaContext> = parents.iter().map(|p| &*p.ctx).collect();
    let raw = grouped_init(n, &ctxs, "ncclCommSplit", |i, c| {
        let (color, key) = match args[i] {
            Some((color, key)) => (
                to_c_int(color as usize, "color")?,
                to_c_int(key as usize, "key")?,
            ),
            None => (NCCL_SPLIT_NOCOLOR, 0),
        };
        // SAFETY: the parent is live; `c` receives the child (null for no color); a
        // null config inherits the parent's.
        let r = unsafe { (n.comm_split)(parents[i].raw, color, key, c, null_mut()) };
        n.check(r, || {
            format!("ncclCommSplit(rank {i}, color {color}, key {key})")
        })
    })?;
    let members = split_members(args);
    let mut out = Vec::with_capacity(parents.len());
    // Every child is wrapped first (so each is destroyed if a later check fails).
    let mut mismatch = None;
    for (i, raw) in raw.into_iter().enumerate() {
        let place = args[i].and_then(|(color, _)| {
            let (_, m) = members.iter().find(|(c, _)| *c == color)?;
            Some((m.iter().position(|&p| p == i)?, m.len()))
        });
        let comm = (!raw.is_null()).then(|| NcclComm {
            nccl: n,
            raw,
            ctx: parents[i].ctx.clone(),
            rank: place.map_or(0, |(r, _)| r),
            dead: Default::default(),
            in_use: Default::default(),
        });
        match (comm, place) {
            // NCCL's own rank and size of the child must be the ones the engine
            // computed (key order, then parent rank): the all-gather's slots rely on it.
            (Some(c), Some((rank, size))) if c.rank_and_size().ok() == Some((rank, size)) => {
                out.push(Some(Communicator::new(Kind::Nccl(c), rank, size)))
            }
            (None, None) => out.push(None),
            (c, _) => {
                mismatch.get_or_insert(i);
                drop(c);
                out.push(None);
            }
        }
    }
    match mismatch {
        Some(i) => Err(Error::Device(format!(
            "ncclCommSplit: rank {i}'s child disagrees with its arguments {:?} (a child \
             where none was asked, none where one was, or another rank or size)",
            args[i]
        ))),
        None => Ok(out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CI has no NCCL: the loader's error names the library and the fix. Where NCCL is
    /// installed (the GPU machine), it loads and is new enough for `ncclCommSplit`, and
    /// its error strings come through `check`.
    #[test]
    fn loader_names_the_library_or_loads_a_split_capable_nccl() {
        match lib() {
            Ok(n) => {
                assert!(nccl_present());
                assert!(n.version >= MIN_VERSION, "NCCL {}", n.version);
                assert!(LIB_NAMES.contains(&n.file));
                let v = nccl_version().expect("version");
                eprintln!("loaded NCCL {v}");
                assert_eq!(v, format!("{} ({})", version_string(n.version), n.file));
                // 4 = ncclInvalidArgument
                let e = n.check(4, || "ncclTest".into()).expect_err("an error");
                let s = e.to_string();
                eprintln!("{s}");
                assert!(s.contains("ncclTest: ") && s.contains("(4)"), "{s}");
                assert!(n.check(0, || unreachable!()).is_ok());
            }
            Err(e) => {
                assert!(!nccl_present());
                let s = e.to_string();
                eprintln!("no NCCL here: {s}");
                assert!(matches!(e, Error::Device(_)), "{s}");
                assert!(
                    s.contains("libnccl.so.2") && s.contains("libnccl.so"),
                    "{s}"
                );
                assert!(s.contains("LD_LIBRARY_PATH"), "{s}");
                assert!(nccl_version().is_err());
            }
        }
    }

    #[test]
    fn version_codes_read_as_major_minor_patch() {
        assert_eq!(version_string(23203), "2.32.3");
        assert_eq!(version_string(21800), "2.18.0");
    }

    /// Two ranks on one GPU are refused before NCCL is called (it would hang).
    #[test]
    fn two_ranks_on_one_gpu_are_refused() {
        assert!(one_rank_per_gpu(&[0, 1, 2]).is_ok());
        assert!(one_rank_per_gpu(&[]).is_ok());
        let e = one_rank_per_gpu(&[0, 1, 0]).expect_err("same GPU twice");
        let s = e.to_string();
        assert!(
            s.contains("one rank per GPU") && s.contains("ranks 0 and 2"),
            "{s}"
        );
    }

    /// One rank on GPU 0 (the GPU machine has one GPU): world, a split, an all-gather
    /// over one slot, and a send to itself received within the same group (which NCCL
    /// allows), bytes checked against a poisoned destination.
    #[test]
    #[ignore = "needs a CUDA device and NCCL"]
    fn gpu_nccl_single_rank_world_split_gather_send_recv() {
        use crate::backend::device::{download_vec, upload_new, Device};
        use crate::runtime::sampling::Rng;
        use std::time::{Duration, SystemTime, UNIX_EPOCH};

        let dev = CudaDevice::open(0).expect("CUDA device 0");
        eprintln!("NCCL {}", nccl_version().expect("NCCL"));
        let d: &dyn Device = &dev;
        let world = super::super::world(&[d], Duration::from_secs(60)).expect("world");
        assert_eq!((world[0].rank(), world[0].size()), (0, 1));
        let split = super::super::split(&[&world[0]], &[Some((0, 0))]).expect("split");
        let c = split[0].as_ref().expect("rank 0 in the split");
        assert_eq!((c.rank(), c.size()), (0, 1));
        let none = super::super::split(&[&world[0]], &[None]).expect("split, no color");
        assert!(none[0].is_none());

        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |t| t.as_nanos() as u64);
        let mut rng = Rng::new(seed);
        let mut fresh = |n: usize| -> Vec<u8> { (0..n).map(|_| rng.next_u64() as u8).collect() };
        let bytes = 12_345;

        // all-gather over one rank: in place, the slot is left as it was
        let data = fresh(bytes);
        let buf = upload_new(d, &data).expect("upload");
        c.queue(d, &[CollOp::AllGather { buf: &buf, bytes }])
            .expect("all-gather");
        dev.synchronize().expect("all-gather runs");
        assert_eq!(download_vec::<u8>(d, &buf, bytes).expect("download"), data);

        // send to self + receive from self, one group, into the middle of a poisoned
        // buffer; a zero-byte op is skipped
        let off = 64;
        let data = fresh(bytes);
        let src = upload_new(d, &data).expect("upload");
        let dst = upload_new(d, &vec![0xA5u8; bytes + 2 * off]).expect("upload");
        c.queue(
            d,
            &[
                CollOp::Send {
                    buf: &src,
                    off: 0,
                    bytes,
                    peer: 0,
                },
                CollOp::Recv {
                    buf: &dst,
                    off,
                    bytes,
                    peer: 0,
                },
                CollOp::Send {
                    buf: &src,
                    off: 0,
                    bytes: 0,
                    peer: 0,
                },
            ],
        )
        .expect("send/recv");
        dev.synchronize().expect("send/recv runs");
        let got = download_vec::<u8>(d, &dst, bytes + 2 * off).expect("download");
        assert!(
            got[..off].iter().all(|&b| b == 0xA5),
            "bytes before the range"
        );
        assert!(got[off + bytes..].iter().all(|&b| b == 0xA5), "bytes after");
        assert!(got[off..off + bytes] == data[..], "received bytes differ");

        // the world communicator still works after the split
        world[0]
            .queue(d, &[CollOp::AllGather { buf: &buf, bytes }])
            .expect("world all-gather");
        dev.synchronize().expect("world all-gather runs");

        // two ranks on one GPU: refused, not a hang
        let dev2 = CudaDevice::open(0).expect("second handle");
        let e = super::super::world(&[d, &dev2], Duration::from_secs(60))
            .expect_err("two ranks on one GPU");
        assert!(e.to_string().contains("one rank per GPU"), "{e}");
    }
}

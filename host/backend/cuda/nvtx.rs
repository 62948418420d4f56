//! NVTX ranges for Nsight Systems (and Nsight Compute's `--nvtx` filters).
//!
//! The NVTX library is loaded at run time with `dlopen`, once, on first use; without it
//! (or with `REMP_NVTX=0`) every call here is a no-op and names are never built, so
//! the CPU path pays one atomic load per call site. Libraries tried, first hit wins:
//! the file named by `REMP_NVTX` when its value contains a `/`; `libnvToolsExt.so.1`,
//! `libnvToolsExt.so` and `libnvtx3interop.so.1` through the loader's search path
//! (`LD_LIBRARY_PATH`, `ldconfig`); then the pip packages' copies under python3's
//! site-packages (`nvidia/nvtx/lib/libnvToolsExt.so.1` from `nvidia-nvtx-cu12`,
//! `nvidia/cu13/lib/libnvtx3interop.so.1` from `nvidia-nvtx` for CUDA 13) and
//! `/usr/local/cuda/lib64`. Each exports the classic `nvtxRangePushA` / `nvtxRangePop` /
//! `nvtxMarkA` / `nvtxNameOsThreadA`, which forward to the tool that `nsys` / `ncu`
//! inject (NVTX v3's injection) and do nothing when no tool is attached.
//!
//! NVTX ranges are per OS thread, as remp's work is: the driver's steps on the
//! engine's thread, each worker (`remp-worker-N`) and copy thread (`remp-copy-N`) on
//! its own, named in the trace by [`name_current_thread`]. A [`RangeGuard`] pushes on
//! creation and pops on drop, on the same thread (it is not `Send`).

use std::ffi::{c_char, c_int, c_void, CString};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

type PushFn = unsafe extern "C" fn(*const c_char) -> c_int;
type PopFn = unsafe extern "C" fn() -> c_int;
type MarkFn = unsafe extern "C" fn(*const c_char);
type NameThreadFn = unsafe extern "C" fn(u32, *const c_char);

/// The entry points of a loaded NVTX library (kept loaded for the process's life).
struct Api {
    push: PushFn,
    pop: PopFn,
    mark: MarkFn,
    name_thread: Option<NameThreadFn>,
    path: String,
}

static API: OnceLock<Option<Api>> = OnceLock::new();

/// Library names for the loader's search path, in order.
const NAMES: [&str; 3] = [
    "libnvToolsExt.so.1",
    "libnvToolsExt.so",
    "libnvtx3interop.so.1",
];

fn api() -> Option<&'static Api> {
    API.get_or_init(|| {
        let env = std::env::var("REMP_NVTX").ok();
        if env.as_deref() == Some("0") {
            return None;
        }
        let explicit = env.filter(|v| v.contains('/')).map(PathBuf::from);
        candidates(explicit).iter().find_map(|p| load(p))
    })
    .as_ref()
}

/// Whether NVTX calls reach a library: it loaded and `REMP_NVTX` is not `0`.
pub fn enabled() -> bool {
    api().is_some()
}

/// The NVTX library in use, if any.
pub fn library() -> Option<&'static str> {
    api().map(|a| a.path.as_str())
}

/// Everything tried, in order: `explicit`, the bare names, then files found on disk.
fn candidates(explicit: Option<PathBuf>) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = explicit.into_iter().collect();
    v.extend(NAMES.iter().map(PathBuf::from));
    for sp in site_packages() {
        for pkg in ["nvtx", "cu13", "cu12"] {
            for name in NAMES {
                let p = sp.join("nvidia").join(pkg).join("lib").join(name);
                if p.is_file() {
                    v.push(p);
                }
            }
        }
    }
    for name in NAMES {
        let p = Path::new("/usr/local/cuda/lib64").join(name);
        if p.is_file() {
            v.push(p);
        }
    }
    v
}

/// python3 site-packages / dist-packages folders in the usual places (system, user,
/// virtualenv, conda, pyenv), without running python.
fn site_packages() -> Vec<PathBuf> {
    let env = |k: &str| std::env::var_os(k).map(PathBuf::from);
    let home = env("HOME");
    let mut libs: Vec<PathBuf> = vec!["/usr/local/lib".into(), "/usr/lib".into()];
    libs.extend(home.as_ref().map(|h| h.join(".local/lib")));
    libs.extend(env("VIRTUAL_ENV").map(|p| p.join("lib")));
    libs.extend(env("CONDA_PREFIX").map(|p| p.join("lib")));
    let pyenv = env("PYENV_ROOT").or_else(|| home.map(|h| h.join(".pyenv")));
    if let Some(Ok(rd)) = pyenv.map(|p| std::fs::read_dir(p.join("versions"))) {
        libs.extend(rd.flatten().map(|e| e.path().join("lib")));
    }
    let mut out = Vec::new();
    for lib in libs {
        let Ok(rd) = std::fs::read_dir(&lib) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with("python3") {
                for sub in ["site-packages", "dist-packages"] {
                    let p = e.path().join(sub);
                    if p.is_dir() {
                        out.push(p);
                    }
                }
            }
        }
    }
    out
}

/// `dlopen`s `path` and resolves the entry points; `None` if either fails.
fn load(path: &Path) -> Option<Api> {
    let c = CString::new(path.to_str()?).ok()?;
    // SAFETY: a NUL-terminated path; the handle is never closed, so the symbols stay valid.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if h.is_null() {
        return None;
    }
    let sym = |name: &[u8]| -> *mut c_void {
        // SAFETY: `h` is a live handle and `name` is NUL-terminated.
        unsafe { libc::dlsym(h, name.as_ptr().cast()) }
    };
    let (push, pop, mark) = (
        sym(b"nvtxRangePushA\0"),
        sym(b"nvtxRangePop\0"),
        sym(b"nvtxMarkA\0"),
    );
    if push.is_null() || pop.is_null() || mark.is_null() {
        return None;
    }
    let name_thread = sym(b"nvtxNameOsThreadA\0");
    // SAFETY: non-null symbols of the NVTX C API, whose signatures these types copy.
    unsafe {
        Some(Api {
            push: std::mem::transmute::<*mut c_void, PushFn>(push),
            pop: std::mem::transmute::<*mut c_void, PopFn>(pop),
            mark: std::mem::transmute::<*mut c_void, MarkFn>(mark),
            name_thread: (!name_thread.is_null())
                .then(|| std::mem::transmute::<*mut c_void, NameThreadFn>(name_thread)),
            path: path.display().to_string(),
        })
    }
}

/// `s` as a C string (interior NULs dropped).
fn c_string(s: impl Into<Vec<u8>>) -> CString {
    CString::new(s).unwrap_or_else(|e| {
        let mut v = e.into_vec();
        v.retain(|&b| b != 0);
        CString::new(v).unwrap_or_default()
    })
}

/// An open NVTX range of the current thread; dropping it ends the range.
#[must_use = "the range ends when this guard is dropped"]
pub struct RangeGuard {
    pushed: bool,
    /// Push and pop must happen on the same OS thread.
    _not_send: PhantomData<*const ()>,
}

impl RangeGuard {
    /// Whether this guard opened a range (false when NVTX is off).
    pub fn is_active(&self) -> bool {
        self.pushed
    }
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        if let (true, Some(a)) = (self.pushed, api()) {
            // SAFETY: resolved NVTX entry point; pops the range this guard pushed.
            unsafe { (a.pop)() };
        }
    }
}

fn push(a: &Api, name: impl Into<Vec<u8>>) -> RangeGuard {
    let c = c_string(name);
    // SAFETY: resolved NVTX entry point; `c` is NUL-terminated and NVTX copies it.
    unsafe { (a.push)(c.as_ptr()) };
    RangeGuard {
        pushed: true,
        _not_send: PhantomData,
    }
}

/// Opens a range named `name` on this thread until the guard drops.
pub fn range(name: &str) -> RangeGuard {
    match api() {
        Some(a) => push(a, name),
        None => RangeGuard {
            pushed: false,
            _not_send: PhantomData,
        },
    }
}

/// [`range`] with a name built only when NVTX is on:
/// `nvtx::range_with(|| format!("layer {l}"))`.
pub fn range_with(name: impl FnOnce() -> String) -> RangeGuard {
    match api() {
        Some(a) => push(a, name()),
        None => RangeGuard {
            pushed: false,
            _not_send: PhantomData,
        },
    }
}

/// An instant event named `name` on this thread's timeline.
pub fn mark(name: &str) {
    if let Some(a) = api() {
        let c = c_string(name);
        // SAFETY: resolved NVTX entry point; `c` is NUL-terminated and NVTX copies it.
        unsafe { (a.mark)(c.as_ptr()) };
    }
}

/// Names the calling OS thread in the trace after its Rust thread name (e.g.
/// `remp-worker-3`); call it first thing in a spawned thread.
pub fn name_current_thread() {
    let Some(f) = api().and_then(|a| a.name_thread) else {
        return;
    };
    let Some(name) = std::thread::current().name().map(c_string) else {
        return;
    };
    // SAFETY: gettid has no preconditions and returns this thread's kernel id.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as u32;
    // SAFETY: resolved NVTX entry point; `name` is NUL-terminated and NVTX copies it.
    unsafe { f(tid, name.as_ptr()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether any candidate library loads here, found independently of `REMP_NVTX`.
    fn library_present() -> bool {
        let explicit = std::env::var("REMP_NVTX")
            .ok()
            .filter(|v| v.contains('/'))
            .map(PathBuf::from);
        candidates(explicit).iter().any(|p| load(p).is_some())
    }

    #[test]
    fn no_op_without_library() {
        if library_present() {
            // With a library, `enabled()` follows the switch, and calls go through
            // (they do nothing without an attached tool).
            let off = std::env::var("REMP_NVTX").is_ok_and(|v| v == "0");
            assert_eq!(enabled(), !off);
            let g = range("nvtx test");
            assert_eq!(g.is_active(), !off);
            drop(g);
            mark("nvtx test mark");
            name_current_thread();
            return;
        }
        assert!(!enabled());
        assert_eq!(library(), None);
        let g = range("not recorded");
        assert!(!g.is_active());
        drop(g);
        let g = range_with(|| panic!("a name built while NVTX is off"));
        assert!(!g.is_active());
        mark("not recorded");
        name_current_thread();
    }

    #[test]
    fn interior_nul_is_dropped() {
        assert_eq!(c_string("a\0b").as_bytes(), b"ab");
        assert_eq!(c_string(String::from("layer 3")).as_bytes(), b"layer 3");
    }
}

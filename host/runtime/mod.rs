//! The serving runtime: the [`engine::Engine`] API (requests, steps, streaming events),
//! its [`scheduler`] (continuous batching), the paged KV cache, sampling and
//! the workers that hold the model.

pub mod decode_bench;
pub mod engine;
pub mod kv_cache;
pub mod live_placement;
pub mod sampling;
pub mod scheduler;
pub mod trace;
pub mod worker;

pub use engine::{
    DeviceKind, Engine, EngineConfig, Event, FinishReason, Request, RequestId, RequestOutput,
};
pub use sampling::Sampling;

/// Tunes glibc's allocator for resharding: freed weight buffers stay in one heap (no
/// per-thread arenas, no return to the OS) so the buffers of the next layers reuse them
/// instead of faulting in fresh zeroed pages (which on the CPU backend costs more than
/// the copy itself: measured about 2x on a layer of the 111M bench model). A
/// process-wide setting, so it is the embedding program's call: the `remp` binary makes
/// it at startup. No-op off glibc.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before heavy allocation.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

//! The serving runtime: the [`engine::Engine`] API (requests, steps, streaming events),
//! its scheduler (continuous batching, in `engine`), the paged KV cache, sampling and
//! the workers that hold the model.

pub mod engine;
pub mod kv_cache;
pub mod live_placement;
pub mod sampling;
pub mod worker;

pub use engine::{Engine, EngineConfig, Event, FinishReason, Request, RequestId, RequestOutput};
pub use sampling::Sampling;

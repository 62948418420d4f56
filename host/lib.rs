//! remp: a serving backend for Llama-family models with tensor and pipeline parallelism
//! whose TP×PP topology can change while it serves.
//!
//! - [`model`]: Hugging Face config, safetensors weights (read shard by shard), tokenizer;
//! - [`parallel`]: topologies, shard specs and the per-layer [`parallel::Placement`];
//! - [`reshard`]: the reconfiguration planner and executor;
//! - [`runtime`]: the [`runtime::Engine`] API, scheduler, paged KV cache, workers;
//! - [`backend`]: the communication layer and device kernels.

pub mod backend;
pub mod error;
pub mod kernels;
pub mod model;
pub mod parallel;
pub mod reshard;
pub mod runtime;

pub use error::{Error, Result};

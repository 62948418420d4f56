//! The model: its config, its weights (a [`TensorSource`] that hands out shards) and its
//! tokenizer. Loading never reads a whole split tensor; ranks read their own regions.

pub mod config;
pub mod random;
pub mod tokenizer;
pub mod weights;

pub use config::{Arch, CheckpointDType, ModelConfig, RopeScaling};
pub use tokenizer::Tokenizer;
pub use weights::{SafetensorsSource, TensorSource};

use crate::error::Result;
use std::path::Path;
use std::sync::Arc;

pub struct Model {
    pub name: String,
    pub config: ModelConfig,
    pub source: Arc<dyn TensorSource>,
    pub tokenizer: Arc<Tokenizer>,
}

impl Model {
    /// Opens a Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json).
    pub fn load(dir: &Path) -> Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        let source = SafetensorsSource::open(dir, &config)?;
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = if tok_path.exists() {
            Tokenizer::from_file(&tok_path)?
        } else {
            Tokenizer::None
        };
        Ok(Model {
            name: dir.display().to_string(),
            config,
            source: Arc::new(source),
            tokenizer: Arc::new(tokenizer),
        })
    }

    /// A deterministic random model of the given shape with a byte tokenizer.
    pub fn random(name: &str, config: ModelConfig, seed: u64) -> Self {
        Model {
            name: name.into(),
            source: Arc::new(random::RandomSource::new(config.clone(), seed)),
            config,
            tokenizer: Arc::new(Tokenizer::Bytes),
        }
    }

    /// The CLI's default: remp-tiny's shape, random weights.
    pub fn random_tiny() -> Self {
        Self::random("builtin:random-tiny", random::tiny_config(), 0x5eed)
    }

    /// The reconfiguration bench's default (about 111M parameters).
    pub fn random_bench() -> Self {
        Self::random("builtin:random-111m", random::bench_config(), 0x5eed)
    }

    /// The GPU bench's default (about 1.1B parameters).
    pub fn random_gpu_bench() -> Self {
        Self::random("builtin:random-1.1b", random::gpu_bench_config(), 0x5eed)
    }
}

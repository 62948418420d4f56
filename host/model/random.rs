//! Built-in deterministic random models, generated on demand: every element is a hash of
//! (seed, tensor, index), so any rank can produce exactly its own shard without anything
//! on disk and every topology sees the same model. Used by the CLI's default run (a tiny
//! model) and by the reconfiguration bench (a model large enough that moving weights
//! costs real time).

use crate::error::Result;
use crate::model::config::{Arch, CheckpointDType, RopeScaling};
use crate::model::weights::TensorSource;
use crate::model::ModelConfig;
use crate::parallel::{Region, TensorKind};

/// The shape of `remp-tiny`: 6 layers, hidden 256, 8 heads (4 KV heads), vocab 512.
pub fn tiny_config() -> ModelConfig {
    ModelConfig {
        arch: Arch::Llama,
        vocab_size: 512,
        hidden_size: 256,
        intermediate_size: 768,
        num_layers: 6,
        num_heads: 8,
        num_kv_heads: 4,
        head_dim: 32,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: RopeScaling::None,
        dtype: CheckpointDType::BF16,
        max_position_embeddings: 1024,
        tie_word_embeddings: false,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        sliding_window: None,
        bos_token_id: Some(0),
        eos_token_ids: vec![1],
    }
}

/// About 111M parameters: big enough that resharding weights costs real time on a CPU.
pub fn bench_config() -> ModelConfig {
    ModelConfig {
        vocab_size: 8192,
        hidden_size: 1024,
        intermediate_size: 2816,
        num_layers: 8,
        num_heads: 16,
        num_kv_heads: 8,
        head_dim: 64,
        max_position_embeddings: 4096,
        ..tiny_config()
    }
}

/// About 1.1B parameters (TinyLlama's shape: 22 layers, hidden 2048, 32 query / 4 KV
/// heads, vocab 32000): the GPU bench's model, large enough that a switch moves
/// gigabytes.
pub fn gpu_bench_config() -> ModelConfig {
    ModelConfig {
        vocab_size: 32000,
        hidden_size: 2048,
        intermediate_size: 5632,
        num_layers: 22,
        num_heads: 32,
        num_kv_heads: 4,
        head_dim: 64,
        max_position_embeddings: 4096,
        ..tiny_config()
    }
}

pub struct RandomSource {
    cfg: ModelConfig,
    seed: u64,
}

impl RandomSource {
    pub fn new(cfg: ModelConfig, seed: u64) -> Self {
        RandomSource { cfg, seed }
    }
}

/// splitmix64 finaliser: a good 64-bit mix of its input.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn name_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

impl TensorSource for RandomSource {
    fn read(&self, kind: TensorKind, region: &Region) -> Result<Vec<f32>> {
        let [_, cols] = kind.shape(&self.cfg);
        let key = mix64(self.seed ^ name_hash(&kind.hf_name(&self.cfg)));
        // Uniform(-a, a) has variance a²/3: a = sqrt(3 / fan_in) keeps activations O(1).
        let (offset, amp) = match kind {
            TensorKind::Embed | TensorKind::LmHead => (0.0, 1.0),
            TensorKind::FinalNorm | TensorKind::InputNorm(_) | TensorKind::PostNorm(_) => {
                (1.0, 0.1)
            }
            k if k.is_1d(&self.cfg) => (0.0, 0.02),
            _ => (0.0, (3.0 / cols as f32).sqrt()),
        };
        let mut out = Vec::with_capacity(region.len());
        for r in region.rows.clone() {
            for c in region.cols.clone() {
                let h = mix64(key ^ (r * cols + c) as u64);
                // 24 random bits -> [-1, 1); rounded to bf16 like a real checkpoint.
                let u = (h >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
                let x = offset + amp * u;
                out.push(f32::from_bits(x.to_bits() & 0xffff_0000));
            }
        }
        Ok(out)
    }
}

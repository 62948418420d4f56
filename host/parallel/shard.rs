//! Shard specs: which rectangle of each weight tensor a member of a tensor-parallel group
//! holds. This module is the single source of truth for the split; the loader reads
//! exactly these regions and the reshard planner diffs them.
//!
//! Weights keep the Hugging Face `nn.Linear` layout `W[out, in]` (y = x · Wᵀ):
//! - ColumnParallel (q/k/v, gate/up): split the output dimension = rows of `W`;
//! - RowParallel (o, down): split the input dimension = columns of `W`; partial outputs
//!   are summed by an all-reduce;
//! - VocabParallel (embedding, LM head): split vocabulary rows, unevenly if needed;
//! - Replicated: norms and row-parallel biases (added once, after the all-reduce).
//!
//! Attention is split by query heads; a member holds the KV heads its query heads read,
//! so KV heads are split when `tp <= kv_heads` and replicated when `tp > kv_heads`.

use super::LayerId;
use crate::model::ModelConfig;
use std::ops::Range;

/// Balanced split of `0..n` into `parts`: part `i` of it (the first `n % parts` parts
/// get one extra element).
pub fn split_range(n: usize, parts: usize, i: usize) -> Range<usize> {
    let base = n / parts;
    let extra = n % parts;
    let start = i * base + i.min(extra);
    let len = base + usize::from(i < extra);
    start..start + len
}

/// Every weight tensor of the model, by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TensorKind {
    Embed,
    InputNorm(LayerId),
    Q(LayerId),
    K(LayerId),
    V(LayerId),
    QBias(LayerId),
    KBias(LayerId),
    VBias(LayerId),
    O(LayerId),
    OBias(LayerId),
    PostNorm(LayerId),
    Gate(LayerId),
    Up(LayerId),
    Down(LayerId),
    GateBias(LayerId),
    UpBias(LayerId),
    DownBias(LayerId),
    FinalNorm,
    LmHead,
}

/// How a tensor is split inside a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardSpec {
    Replicated,
    /// Split by output rows (ColumnParallel; also VocabParallel and biases of split outputs).
    Rows,
    /// Split by input columns (RowParallel).
    Cols,
}

/// A rectangle of a tensor in its global coordinates; 1-D tensors use `cols = 0..1`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Region {
    pub rows: Range<usize>,
    pub cols: Range<usize>,
}

impl Region {
    pub fn new(rows: Range<usize>, cols: Range<usize>) -> Self {
        Region { rows, cols }
    }

    pub fn len(&self) -> usize {
        self.rows.len() * self.cols.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Overlap of two regions, if any.
    pub fn intersect(&self, other: &Region) -> Option<Region> {
        let rows = self.rows.start.max(other.rows.start)..self.rows.end.min(other.rows.end);
        let cols = self.cols.start.max(other.cols.start)..self.cols.end.min(other.cols.end);
        (!rows.is_empty() && !cols.is_empty()).then_some(Region { rows, cols })
    }
}

/// The slice of attention heads one member of a tensor-parallel group runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadShard {
    pub q_heads: Range<usize>,
    pub kv_heads: Range<usize>,
}

impl HeadShard {
    pub fn new(cfg: &ModelConfig, tp: usize, r: usize) -> Self {
        let q_heads = split_range(cfg.num_heads, tp, r);
        let g = cfg.gqa_group();
        // KV heads read by these query heads: contiguous because query heads are.
        let kv_heads = q_heads.start / g..(q_heads.end - 1) / g + 1;
        HeadShard { q_heads, kv_heads }
    }
}

impl TensorKind {
    pub fn layer(self) -> Option<LayerId> {
        use TensorKind::*;
        match self {
            Embed | FinalNorm | LmHead => None,
            InputNorm(l) | Q(l) | K(l) | V(l) | QBias(l) | KBias(l) | VBias(l) | O(l)
            | OBias(l) | PostNorm(l) | Gate(l) | Up(l) | Down(l) | GateBias(l) | UpBias(l)
            | DownBias(l) => Some(l),
        }
    }

    /// The checkpoint name (tied embeddings read the LM head from the embedding).
    pub fn hf_name(self, cfg: &ModelConfig) -> String {
        use TensorKind::*;
        let l = |l: LayerId, s: &str| format!("model.layers.{}.{s}", l.0);
        match self {
            Embed => "model.embed_tokens.weight".into(),
            FinalNorm => "model.norm.weight".into(),
            LmHead if cfg.tie_word_embeddings => "model.embed_tokens.weight".into(),
            LmHead => "lm_head.weight".into(),
            InputNorm(x) => l(x, "input_layernorm.weight"),
            PostNorm(x) => l(x, "post_attention_layernorm.weight"),
            Q(x) => l(x, "self_attn.q_proj.weight"),
            K(x) => l(x, "self_attn.k_proj.weight"),
            V(x) => l(x, "self_attn.v_proj.weight"),
            O(x) => l(x, "self_attn.o_proj.weight"),
            QBias(x) => l(x, "self_attn.q_proj.bias"),
            KBias(x) => l(x, "self_attn.k_proj.bias"),
            VBias(x) => l(x, "self_attn.v_proj.bias"),
            OBias(x) => l(x, "self_attn.o_proj.bias"),
            Gate(x) => l(x, "mlp.gate_proj.weight"),
            Up(x) => l(x, "mlp.up_proj.weight"),
            Down(x) => l(x, "mlp.down_proj.weight"),
            GateBias(x) => l(x, "mlp.gate_proj.bias"),
            UpBias(x) => l(x, "mlp.up_proj.bias"),
            DownBias(x) => l(x, "mlp.down_proj.bias"),
        }
    }

    /// Global shape `[rows, cols]` (1-D tensors: `[n, 1]`).
    pub fn shape(self, cfg: &ModelConfig) -> [usize; 2] {
        use TensorKind::*;
        let (h, q, kv, i, v) = (
            cfg.hidden_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
            cfg.vocab_size,
        );
        match self {
            Embed | LmHead => [v, h],
            FinalNorm | InputNorm(_) | PostNorm(_) | OBias(_) | DownBias(_) => [h, 1],
            Q(_) => [q, h],
            K(_) | V(_) => [kv, h],
            O(_) => [h, q],
            QBias(_) => [q, 1],
            KBias(_) | VBias(_) => [kv, 1],
            Gate(_) | Up(_) => [i, h],
            Down(_) => [h, i],
            GateBias(_) | UpBias(_) => [i, 1],
        }
    }

    pub fn is_1d(self, cfg: &ModelConfig) -> bool {
        use TensorKind::*;
        let _ = cfg;
        matches!(
            self,
            FinalNorm
                | InputNorm(_)
                | PostNorm(_)
                | OBias(_)
                | DownBias(_)
                | QBias(_)
                | KBias(_)
                | VBias(_)
                | GateBias(_)
                | UpBias(_)
        )
    }

    pub fn spec(self) -> ShardSpec {
        use TensorKind::*;
        match self {
            FinalNorm | InputNorm(_) | PostNorm(_) | OBias(_) | DownBias(_) => {
                ShardSpec::Replicated
            }
            Embed | LmHead | Q(_) | K(_) | V(_) | QBias(_) | KBias(_) | VBias(_) | Gate(_)
            | Up(_) | GateBias(_) | UpBias(_) => ShardSpec::Rows,
            O(_) | Down(_) => ShardSpec::Cols,
        }
    }

    /// The region of this tensor held by member `r` of a group of `tp`.
    pub fn region(self, cfg: &ModelConfig, tp: usize, r: usize) -> Region {
        use TensorKind::*;
        let [rows, cols] = self.shape(cfg);
        let hd = cfg.head_dim;
        let heads = HeadShard::new(cfg, tp, r);
        let scaled = |x: Range<usize>| x.start * hd..x.end * hd;
        let split = match self {
            Q(_) | QBias(_) | O(_) => scaled(heads.q_heads),
            K(_) | V(_) | KBias(_) | VBias(_) => scaled(heads.kv_heads),
            Gate(_) | Up(_) | GateBias(_) | UpBias(_) | Down(_) => {
                split_range(cfg.intermediate_size, tp, r)
            }
            Embed | LmHead => split_range(cfg.vocab_size, tp, r),
            _ => 0..0,
        };
        match self.spec() {
            ShardSpec::Replicated => Region::new(0..rows, 0..cols),
            ShardSpec::Rows => Region::new(split, 0..cols),
            ShardSpec::Cols => Region::new(0..rows, split),
        }
    }

    /// The tensors of one decoder layer that this model has.
    pub fn layer_tensors(cfg: &ModelConfig, l: LayerId) -> Vec<TensorKind> {
        use TensorKind::*;
        let mut v = vec![
            InputNorm(l),
            Q(l),
            K(l),
            V(l),
            O(l),
            PostNorm(l),
            Gate(l),
            Up(l),
            Down(l),
        ];
        if cfg.qkv_bias {
            v.extend([QBias(l), KBias(l), VBias(l)]);
        }
        if cfg.o_bias {
            v.push(OBias(l));
        }
        if cfg.mlp_bias {
            v.extend([GateBias(l), UpBias(l), DownBias(l)]);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_a_partition() {
        for n in 1..40 {
            for parts in 1..=n.min(9) {
                let mut next = 0;
                for i in 0..parts {
                    let r = split_range(n, parts, i);
                    assert_eq!(r.start, next);
                    assert!(r.len() == n / parts || r.len() == n / parts + 1);
                    next = r.end;
                }
                assert_eq!(next, n);
            }
        }
    }

    #[test]
    fn region_intersection() {
        let a = Region::new(0..4, 0..4);
        let b = Region::new(2..6, 3..9);
        assert_eq!(a.intersect(&b), Some(Region::new(2..4, 3..4)));
        assert_eq!(a.intersect(&Region::new(4..5, 0..4)), None);
    }
}

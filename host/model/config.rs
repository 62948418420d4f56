//! The model's shape, parsed from a Hugging Face `config.json` (Llama, Mistral, Qwen2).
//!
//! Everything downstream (shard specs, kernels, KV cache) reads this struct, never the
//! JSON, so the quirks of the three architectures are resolved here once.

use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
}

impl Arch {
    pub fn hf_name(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

/// How rotary frequencies are scaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// `rope_type: linear`: positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// `rope_type: llama3` (Llama 3.1+): low frequencies scaled, high kept, smooth between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// The dtype the checkpoint is meant to run in (`dtype` / `torch_dtype` in config.json).
///
/// transformers loads a model in this dtype, which also rounds the rotary `inv_freq`
/// buffer to it; a float32 forward afterwards keeps the rounded frequencies. remp rounds
/// them the same way so its logits match transformers' to f32 rounding (without it, a
/// bf16 checkpoint's logits drift by ~1e-3 relative over ~30 positions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointDType {
    F32,
    BF16,
    F16,
}

impl CheckpointDType {
    /// Rounds `x` to this dtype (round to nearest even) and back to f32.
    pub fn round(self, x: f32) -> f32 {
        match self {
            CheckpointDType::F32 => x,
            CheckpointDType::BF16 => half::bf16::from_f32(x).to_f32(),
            CheckpointDType::F16 => half::f16::from_f32(x).to_f32(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// Dtype the rotary frequencies are rounded to (see [`CheckpointDType`]).
    pub dtype: CheckpointDType,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v projections (Qwen2 always; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama `attention_bias` only).
    pub o_bias: bool,
    /// Biases on gate/up/down (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// Attention window (Mistral `sliding_window`); `None` attends to the whole prefix.
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Reads and validates `dir/config.json` (and `generation_config.json` for EOS ids).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let mut cfg = Self::from_json_str(&text, &path)?;
        // generation_config.json is optional, but one that is there must be valid: a
        // corrupt file silently ignored left the model without an EOS id.
        let gen = dir.join("generation_config.json");
        match std::fs::read_to_string(&gen) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&gen, e)),
            Ok(text) => {
                let err = |msg: String| Error::Config {
                    path: gen.clone(),
                    msg,
                };
                let v: Value =
                    serde_json::from_str(&text).map_err(|e| err(format!("not valid JSON: {e}")))?;
                if !v.is_object() {
                    return Err(err("expected a JSON object".into()));
                }
                let eos = token_ids(&v, "eos_token_id", cfg.vocab_size, &gen)?;
                token_ids(&v, "bos_token_id", cfg.vocab_size, &gen)?;
                if cfg.eos_token_ids.is_empty() {
                    cfg.eos_token_ids = eos;
                }
            }
        }
        Ok(cfg)
    }

    /// Parses a config.json body; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let err = |msg: String| Error::Config {
            path: path.to_path_buf(),
            msg,
        };
        let v: Value =
            serde_json::from_str(text).map_err(|e| err(format!("not valid JSON: {e}")))?;
        if !v.is_object() {
            return Err(err("expected a JSON object".into()));
        }
        let arch_name = v
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .or_else(|| {
                v.get("model_type")
                    .and_then(Value::as_str)
                    .map(|m| match m {
                        "llama" => "LlamaForCausalLM".to_owned(),
                        "mistral" => "MistralForCausalLM".to_owned(),
                        "qwen2" => "Qwen2ForCausalLM".to_owned(),
                        other => other.to_owned(),
                    })
            })
            .ok_or_else(|| err("missing `architectures` (and `model_type`)".into()))?;
        let arch = match arch_name.as_str() {
            "LlamaForCausalLM" => Arch::Llama,
            "MistralForCausalLM" => Arch::Mistral,
            "Qwen2ForCausalLM" => Arch::Qwen2,
            other => {
                return Err(Error::Unsupported(format!(
                    "{}: architecture `{other}` (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)",
                    path.display()
                )))
            }
        };
        let req = |key: &str| -> Result<usize> {
            match v.get(key) {
                Some(x) => x
                    .as_u64()
                    .filter(|&n| n > 0)
                    .map(|n| n as usize)
                    .ok_or_else(|| err(format!("`{key}` must be a positive integer, got {x}"))),
                None => Err(err(format!("missing `{key}`"))),
            }
        };
        let opt_usize = |key: &str| -> Result<Option<usize>> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .filter(|&n| n > 0)
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| err(format!("`{key}` must be a positive integer, got {x}"))),
            }
        };
        let opt_bool = |key: &str, default: bool| -> Result<bool> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x
                    .as_bool()
                    .ok_or_else(|| err(format!("`{key}` must be true or false, got {x}"))),
            }
        };
        let opt_f64 = |obj: &Value, key: &str| -> Result<Option<f64>> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_f64()
                    .filter(|f| f.is_finite() && *f > 0.0)
                    .map(Some)
                    .ok_or_else(|| err(format!("`{key}` must be a positive number, got {x}"))),
            }
        };

        let vocab_size = req("vocab_size")?;
        let hidden_size = req("hidden_size")?;
        let intermediate_size = req("intermediate_size")?;
        let num_layers = req("num_hidden_layers")?;
        let num_heads = req("num_attention_heads")?;
        let num_kv_heads = opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = match opt_usize("head_dim")? {
            Some(d) => d,
            None if hidden_size % num_heads != 0 => {
                return Err(err(format!(
                    "hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads} \
                     (head_dim would be {}) and `head_dim` is not given",
                    hidden_size / num_heads
                )))
            }
            None => hidden_size / num_heads,
        };
        if num_heads % num_kv_heads != 0 {
            return Err(err(format!(
                "num_attention_heads ({num_heads}) is not a multiple of num_key_value_heads ({num_kv_heads})"
            )));
        }
        if head_dim % 2 != 0 {
            return Err(err(format!(
                "head_dim ({head_dim}) must be even for rotary embeddings"
            )));
        }
        // Every weight's element count (and its bytes as f32) must be a number: sizes a
        // checkpoint can never have would otherwise wrap in the shape arithmetic.
        let q_dim = num_heads.checked_mul(head_dim);
        let kv_dim = num_kv_heads.checked_mul(head_dim);
        for (what, rows, cols) in [
            ("vocab_size x hidden_size", Some(vocab_size), hidden_size),
            (
                "intermediate_size x hidden_size",
                Some(intermediate_size),
                hidden_size,
            ),
            (
                "num_attention_heads x head_dim x hidden_size",
                q_dim,
                hidden_size,
            ),
            (
                "num_key_value_heads x head_dim x hidden_size",
                kv_dim,
                hidden_size,
            ),
        ] {
            let fits = rows
                .and_then(|r| r.checked_mul(cols))
                .and_then(|n| n.checked_mul(4))
                .is_some_and(|b| b <= isize::MAX as usize);
            if !fits {
                return Err(err(format!(
                    "{what} is too large for a tensor (vocab_size {vocab_size}, hidden_size {hidden_size}, intermediate_size {intermediate_size}, num_attention_heads {num_heads}, num_key_value_heads {num_kv_heads}, head_dim {head_dim})"
                )));
            }
        }
        let rms_norm_eps = match opt_f64(&v, "rms_norm_eps")? {
            None => 1e-6,
            Some(e) => {
                let e32 = e as f32;
                if !(e32.is_finite() && e32 > 0.0) {
                    return Err(err(format!(
                        "`rms_norm_eps` {e:e} is {e32} in f32 (must be a finite number > 0)"
                    )));
                }
                e32
            }
        };
        let max_position_embeddings = opt_usize("max_position_embeddings")?.unwrap_or(4096);

        // Rotary: transformers >= 5 writes `rope_parameters`, older files `rope_theta` +
        // `rope_scaling`.
        for key in ["rope_parameters", "rope_scaling"] {
            match v.get(key) {
                None | Some(Value::Null) | Some(Value::Object(_)) => {}
                Some(x) => {
                    return Err(err(format!("`{key}` must be an object (or null), got {x}")))
                }
            }
        }
        let rope_obj = v
            .get("rope_parameters")
            .filter(|x| x.is_object())
            .or_else(|| v.get("rope_scaling").filter(|x| x.is_object()));
        let rope_theta = match rope_obj
            .map(|o| opt_f64(o, "rope_theta"))
            .transpose()?
            .flatten()
        {
            Some(t) => t,
            None => opt_f64(&v, "rope_theta")?.unwrap_or(10000.0),
        };
        let rope_scaling = match rope_obj {
            None => RopeScaling::None,
            Some(o) => {
                let ty_key = if o.get("rope_type").is_some_and(|x| !x.is_null()) {
                    "rope_type"
                } else {
                    "type"
                };
                let ty = match o.get(ty_key) {
                    None | Some(Value::Null) => "default",
                    Some(Value::String(s)) => s.as_str(),
                    Some(x) => return Err(err(format!("`{ty_key}` must be a string, got {x}"))),
                };
                let need = |key: &str| -> Result<f64> {
                    opt_f64(o, key)?
                        .ok_or_else(|| err(format!("rope scaling `{ty}` needs `{key}`")))
                };
                match ty {
                    "default" => RopeScaling::None,
                    "linear" => RopeScaling::Linear {
                        factor: need("factor")?,
                    },
                    "llama3" => RopeScaling::Llama3 {
                        factor: need("factor")?,
                        low_freq_factor: need("low_freq_factor")?,
                        high_freq_factor: need("high_freq_factor")?,
                        original_max_position_embeddings: need("original_max_position_embeddings")?,
                    },
                    other => {
                        return Err(Error::Unsupported(format!(
                            "{}: rope scaling type `{other}` (supported: default, linear, llama3)",
                            path.display()
                        )))
                    }
                }
            }
        };

        let attention_bias = opt_bool("attention_bias", false)?;
        let (qkv_bias, o_bias) = match arch {
            Arch::Qwen2 => (true, false),
            _ => (attention_bias, attention_bias),
        };
        let mlp_bias = opt_bool("mlp_bias", false)?;
        let sliding_window = match arch {
            Arch::Mistral => opt_usize("sliding_window")?,
            Arch::Qwen2 if opt_bool("use_sliding_window", false)? => {
                return Err(Error::Unsupported(format!(
                    "{}: Qwen2 `use_sliding_window: true`",
                    path.display()
                )))
            }
            _ => None,
        };
        let act = match v.get("hidden_act") {
            None | Some(Value::Null) => "silu",
            Some(Value::String(s)) => s.as_str(),
            Some(x) => return Err(err(format!("`hidden_act` must be a string, got {x}"))),
        };
        if act != "silu" {
            return Err(Error::Unsupported(format!(
                "{}: hidden_act `{act}` (only silu)",
                path.display()
            )));
        }
        // `dtype` (transformers >= 5) or `torch_dtype`; absent means float32, as in
        // transformers. An unknown value is an error, not float32.
        let dtype_key = if v.get("dtype").is_some_and(|x| !x.is_null()) {
            "dtype"
        } else {
            "torch_dtype"
        };
        let dtype = match v.get(dtype_key) {
            None | Some(Value::Null) => CheckpointDType::F32,
            Some(x) => match x.as_str().map(|s| s.strip_prefix("torch.").unwrap_or(s)) {
                Some("float32" | "float") => CheckpointDType::F32,
                Some("bfloat16") => CheckpointDType::BF16,
                Some("float16" | "half") => CheckpointDType::F16,
                _ => {
                    return Err(err(format!(
                        "`{dtype_key}` {x} is not supported (float32, bfloat16, float16)"
                    )))
                }
            },
        };
        let tie_word_embeddings = opt_bool("tie_word_embeddings", false)?;
        let cfg = ModelConfig {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            dtype,
            max_position_embeddings,
            tie_word_embeddings,
            qkv_bias,
            o_bias,
            mlp_bias,
            sliding_window,
            bos_token_id: token_ids(&v, "bos_token_id", vocab_size, path)?
                .first()
                .copied(),
            eos_token_ids: token_ids(&v, "eos_token_id", vocab_size, path)?,
        };
        Ok(cfg)
    }

    /// Query heads per KV head (the GQA group size).
    pub fn gqa_group(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Number of parameters (embedding and head counted once each unless tied).
    pub fn num_params(&self) -> usize {
        let h = self.hidden_size;
        let per_layer = 2 * h
            + h * self.q_dim()
            + 2 * h * self.kv_dim()
            + self.q_dim() * h
            + 3 * h * self.intermediate_size;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.num_layers * per_layer + self.vocab_size * h + h + head
    }
}

/// `obj[key]`: a token id or a list of them (absent or null: none), each an integer
/// below `vocab_size`. An id that is not one is an error naming `key` and the file (a
/// 64-bit id was once truncated to 32 bits, stopping at an unrelated token).
fn token_ids(obj: &Value, key: &str, vocab_size: usize, path: &Path) -> Result<Vec<u32>> {
    let one = |x: &Value| -> Result<u32> {
        x.as_u64()
            .filter(|&id| id < vocab_size as u64)
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| Error::Config {
                path: path.to_path_buf(),
                msg: format!(
                    "`{key}` {x} is not a token id (an integer below vocab_size {vocab_size})"
                ),
            })
    };
    match obj.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a.iter().map(one).collect(),
        Some(x) => Ok(vec![one(x)?]),
    }
}

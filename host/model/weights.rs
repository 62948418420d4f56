//! Weight sources. A rank never materialises a full copy of a split tensor: it asks its
//! source for exactly the [`Region`] its shard spec names, converted to f32.
//!
//! [`SafetensorsSource`] memory-maps a Hugging Face checkpoint (`model.safetensors` or a
//! sharded `model.safetensors.index.json`), validates every expected tensor's presence,
//! dtype and shape up front, and reads regions straight from the mapping.

use crate::error::{Error, Result};
use crate::model::ModelConfig;
use crate::parallel::{LayerId, Region, TensorKind};
use memmap2::Mmap;
use serde_json::Value;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Something that can hand out regions of the model's tensors.
pub trait TensorSource: Send + Sync {
    /// Reads `region` (global coordinates) of tensor `kind` as row-major f32.
    fn read(&self, kind: TensorKind, region: &Region) -> Result<Vec<f32>>;
}

/// Every tensor the model needs, in a stable order.
pub fn all_tensors(cfg: &ModelConfig) -> Vec<TensorKind> {
    let mut v = vec![TensorKind::Embed];
    for l in 0..cfg.num_layers {
        v.extend(TensorKind::layer_tensors(cfg, LayerId(l)));
    }
    v.push(TensorKind::FinalNorm);
    v.push(TensorKind::LmHead);
    v
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DType {
    BF16,
    F16,
    F32,
}

impl DType {
    fn size(self) -> usize {
        match self {
            DType::BF16 | DType::F16 => 2,
            DType::F32 => 4,
        }
    }
}

struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Byte offset of the tensor's data in the file.
    start: usize,
}

pub struct SafetensorsSource {
    files: Vec<(PathBuf, Mmap)>,
    entries: HashMap<String, Entry>,
    cfg: ModelConfig,
    /// What names the tensors: model.safetensors or model.safetensors.index.json (the
    /// file a missing tensor's error names).
    listing: PathBuf,
}

impl SafetensorsSource {
    /// Opens the checkpoint in `dir` and checks every tensor `cfg` needs.
    pub fn open(dir: &Path, cfg: &ModelConfig) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        // The shard each tensor of a sharded checkpoint's index is said to be in.
        let mut index_map: Vec<(String, usize)> = Vec::new();
        let (listing, file_names): (PathBuf, Vec<PathBuf>) = if single.exists() {
            (single.clone(), vec![single])
        } else if index.exists() {
            let bad = |msg: String| Error::Checkpoint {
                file: index.clone(),
                msg,
            };
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let v: Value =
                serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| bad("missing `weight_map` object".into()))?;
            if map.is_empty() {
                return Err(bad("`weight_map` is empty: it names no tensor".into()));
            }
            let mut names: Vec<PathBuf> = Vec::new();
            for (tensor, f) in map {
                let f = f.as_str().ok_or_else(|| {
                    bad(format!(
                        "`weight_map` value for `{tensor}` must be a file name, got {f}"
                    ))
                })?;
                let why = if f.is_empty() {
                    Some("is empty")
                } else if f == "." || f.contains("..") {
                    Some("is not a file name")
                } else if f.contains('/') || f.contains('\\') {
                    Some("must be a plain file name in the model directory")
                } else {
                    None
                };
                if let Some(why) = why {
                    return Err(bad(format!(
                        "shard file name `{f}` (for tensor `{tensor}`) {why}"
                    )));
                }
                let p = dir.join(f);
                let i = match names.iter().position(|n| *n == p) {
                    Some(i) => i,
                    None => {
                        names.push(p);
                        names.len() - 1
                    }
                };
                index_map.push((tensor.clone(), i));
            }
            (index, names)
        } else {
            return Err(Error::Checkpoint {
                file: dir.to_path_buf(),
                msg: "no model.safetensors or model.safetensors.index.json".into(),
            });
        };

        let mut files = Vec::new();
        let mut entries = HashMap::new();
        for (fi, path) in file_names.into_iter().enumerate() {
            let f = File::open(&path).map_err(|e| Error::io(&path, e))?;
            let meta = f.metadata().map_err(|e| Error::io(&path, e))?;
            if !meta.is_file() {
                return Err(Error::Checkpoint {
                    file: path,
                    msg: format!(
                        "not a regular file (named as a shard by {})",
                        listing.display()
                    ),
                });
            }
            // SAFETY: the checkpoint is treated as read-only for the life of the source;
            // mutating it underneath a running engine is outside what remp supports.
            let mmap = unsafe { Mmap::map(&f) }.map_err(|e| Error::io(&path, e))?;
            parse_header(&path, &mmap, fi, &files, &mut entries)?;
            files.push((path, mmap));
        }
        // A sharded index must agree with its shards: a tensor it places in one shard
        // but that is in another (or in none) is a broken checkpoint.
        for (tensor, fi) in &index_map {
            match entries.get(tensor) {
                Some(e) if e.file == *fi => {}
                Some(e) => {
                    return Err(Error::Tensor {
                        file: listing.clone(),
                        tensor: tensor.clone(),
                        msg: format!(
                            "the index places it in {}, but it is in {}",
                            files[*fi].0.display(),
                            files[e.file].0.display()
                        ),
                    })
                }
                None => {
                    return Err(Error::Tensor {
                        file: files[*fi].0.clone(),
                        tensor: tensor.clone(),
                        msg: format!(
                            "missing from this shard (where {} places it)",
                            listing.display()
                        ),
                    })
                }
            }
        }
        // A layer the config does not have: the checkpoint is for another config (a
        // config with fewer layers than the weights once ran on the first few silently).
        if let Some((layer, name)) = entries
            .keys()
            .filter_map(|n| layer_index(n).map(|l| (l, n)))
            .filter(|&(l, _)| l >= cfg.num_layers)
            .min()
        {
            return Err(Error::Tensor {
                file: files[entries[name].file].0.clone(),
                tensor: name.clone(),
                msg: format!(
                    "layer {layer}, but config.json has num_hidden_layers {} \
                     (the checkpoint does not match its config)",
                    cfg.num_layers
                ),
            });
        }
        let src = SafetensorsSource {
            files,
            entries,
            cfg: cfg.clone(),
            listing,
        };
        // Checked lazily, layer by layer (not via `all_tensors`): a config.json claiming
        // absurdly many layers then fails fast on the first missing layer instead of
        // building a list of billions of tensors first (which hung the CLI).
        src.check(TensorKind::Embed)?;
        for l in 0..cfg.num_layers {
            for kind in TensorKind::layer_tensors(cfg, LayerId(l)) {
                src.check(kind)?;
            }
        }
        src.check(TensorKind::FinalNorm)?;
        src.check(TensorKind::LmHead)?;
        src.check_no_extra()?;
        // Norm weights and biases are small: read them whole now, so a non-finite value
        // fails the load instead of the first forward pass. (Matrices are checked as
        // ranks read their regions, see `read`.)
        let mut small = vec![TensorKind::FinalNorm];
        for l in 0..cfg.num_layers {
            small.extend(
                TensorKind::layer_tensors(cfg, LayerId(l))
                    .into_iter()
                    .filter(|k| k.is_1d(cfg)),
            );
        }
        for kind in small {
            let [rows, cols] = kind.shape(cfg);
            src.read(kind, &Region::new(0..rows, 0..cols))?;
        }
        Ok(src)
    }

    /// Every tensor of the checkpoint is one the config uses: biases the config does not
    /// enable (or any other stray tensor) would otherwise be ignored silently and the
    /// model run without them. Tolerated: the rotary `inv_freq` buffers older exports
    /// saved (recomputed here), and `lm_head.weight` beside tied embeddings (transformers
    /// ties it away too).
    fn check_no_extra(&self) -> Result<()> {
        let cfg = &self.cfg;
        let expected: std::collections::HashSet<String> = all_tensors(cfg)
            .into_iter()
            .map(|k| k.hf_name(cfg))
            .collect();
        let extra = self
            .entries
            .keys()
            .filter(|n| !expected.contains(*n))
            .filter(|n| !n.ends_with("rotary_emb.inv_freq"))
            .filter(|n| !(cfg.tie_word_embeddings && *n == "lm_head.weight"))
            .min();
        let Some(name) = extra else {
            return Ok(());
        };
        let hint = if !name.ends_with("_proj.bias") {
            ""
        } else if name.contains(".mlp.") {
            " (config.json has no `mlp_bias: true`)"
        } else if cfg.arch == crate::model::config::Arch::Qwen2 {
            // (Qwen2's q/k/v biases are implied by the architecture; it has no others)
            " (Qwen2 has biases on q/k/v only)"
        } else {
            " (config.json has no `attention_bias: true`)"
        };
        Err(Error::Tensor {
            file: self.files[self.entries[name].file].0.clone(),
            tensor: name.clone(),
            msg: format!(
                "not a tensor this model's config uses{hint}: the checkpoint does not match \
                 its config"
            ),
        })
    }

    fn check(&self, kind: TensorKind) -> Result<()> {
        let name = kind.hf_name(&self.cfg);
        let [rows, cols] = kind.shape(&self.cfg);
        let e = self.entries.get(&name).ok_or_else(|| Error::Tensor {
            file: self.listing.clone(),
            tensor: name.clone(),
            msg: "missing from the checkpoint".into(),
        })?;
        let shape = &e.shape;
        let want: Vec<usize> = if kind.is_1d(&self.cfg) {
            vec![rows]
        } else {
            vec![rows, cols]
        };
        if *shape != want {
            return Err(Error::Tensor {
                file: self.files[e.file].0.clone(),
                tensor: name,
                msg: format!("shape {shape:?}, expected {want:?} from config.json"),
            });
        }
        Ok(())
    }
}

fn parse_header(
    path: &Path,
    buf: &[u8],
    file: usize,
    earlier: &[(PathBuf, Mmap)],
    entries: &mut HashMap<String, Entry>,
) -> Result<()> {
    let bad = |msg: String| Error::Checkpoint {
        file: path.to_path_buf(),
        msg,
    };
    if buf.len() < 8 {
        return Err(bad(format!(
            "truncated: {} bytes, no safetensors header",
            buf.len()
        )));
    }
    let n = usize::try_from(u64::from_le_bytes(buf[..8].try_into().unwrap_or([0; 8])))
        .unwrap_or(usize::MAX);
    if n > buf.len() - 8 {
        return Err(bad(format!(
            "truncated or corrupt: header claims {n} bytes, file has {}",
            buf.len()
        )));
    }
    // Parsed as a list of (name, value), not a map: a map keeps the last of two entries
    // with one name, which accepted a header naming a tensor twice.
    let header: Header = serde_json::from_slice(&buf[8..8 + n])
        .map_err(|e| bad(format!("corrupt safetensors header: {e}")))?;
    let data_len = buf.len() - 8 - n;
    let mut seen: HashMap<&str, ()> = HashMap::new();
    // (start, end, name) of each tensor's bytes in the data buffer.
    let mut ranges: Vec<(usize, usize, &str)> = Vec::new();
    for (name, v) in &header.0 {
        if seen.insert(name.as_str(), ()).is_some() {
            return Err(Error::Tensor {
                file: path.to_path_buf(),
                tensor: name.clone(),
                msg: "named twice in the safetensors header".into(),
            });
        }
        if name == "__metadata__" {
            continue;
        }
        let tbad = |msg: String| Error::Tensor {
            file: path.to_path_buf(),
            tensor: name.clone(),
            msg,
        };
        let dtype = match v.get("dtype").and_then(Value::as_str) {
            Some("BF16") => DType::BF16,
            Some("F16") => DType::F16,
            Some("F32") => DType::F32,
            Some(other) => return Err(tbad(format!("dtype {other} (supported: BF16, F16, F32)"))),
            None => return Err(tbad("missing dtype".into())),
        };
        let shape: Vec<usize> = v
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|a| {
                a.iter()
                    // (a value usize cannot hold is malformed, not truncated)
                    .map(|x| x.as_u64().and_then(|x| usize::try_from(x).ok()))
                    .collect::<Option<_>>()
            })
            .ok_or_else(|| tbad("missing or malformed shape".into()))?;
        let offs: Vec<usize> = v
            .get("data_offsets")
            .and_then(Value::as_array)
            .and_then(|a| {
                a.iter()
                    // (a value usize cannot hold is malformed, not truncated)
                    .map(|x| x.as_u64().and_then(|x| usize::try_from(x).ok()))
                    .collect::<Option<_>>()
            })
            .filter(|o: &Vec<usize>| o.len() == 2 && o[0] <= o[1])
            .ok_or_else(|| tbad("missing or malformed data_offsets".into()))?;
        // Checked arithmetic: a corrupt header's shape can overflow usize (a panic in
        // builds with overflow checks, a wrong size check without).
        let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let nbytes = numel.and_then(|n| n.checked_mul(dtype.size()));
        let numel = numel.unwrap_or(usize::MAX);
        if nbytes != Some(offs[1] - offs[0]) {
            return Err(tbad(format!(
                "data_offsets {offs:?} do not match shape {shape:?} ({numel} x {} bytes)",
                dtype.size()
            )));
        }
        if offs[1] > data_len {
            return Err(tbad(format!(
                "truncated file: data ends at byte {}, file has {data_len} data bytes",
                offs[1]
            )));
        }
        if entries.contains_key(name) {
            return Err(tbad(format!(
                "also in {}: a tensor must be in one shard",
                earlier[entries[name].file].0.display()
            )));
        }
        ranges.push((offs[0], offs[1], name));
        entries.insert(
            name.clone(),
            Entry {
                file,
                dtype,
                shape,
                start: 8 + n + offs[0],
            },
        );
    }
    // The format lays the tensors out back to back, in order, covering the data buffer:
    // two ranges that overlap (one tensor read as another's bytes), a gap or trailing
    // bytes mean a corrupt header.
    ranges.sort_unstable();
    // Overlaps first (the sharper diagnosis: a range moved onto another tensor's bytes
    // also leaves a gap where it was).
    let mut end = 0usize;
    let mut prev = "";
    for &(s, e, name) in &ranges {
        if s < end {
            return Err(Error::Tensor {
                file: path.to_path_buf(),
                tensor: name.to_owned(),
                msg: format!(
                    "data_offsets [{s}, {e}] overlap tensor `{prev}`'s bytes (which end at {end})"
                ),
            });
        }
        end = e;
        prev = name;
    }
    let mut end = 0usize;
    for &(s, e, name) in &ranges {
        if s > end {
            return Err(Error::Tensor {
                file: path.to_path_buf(),
                tensor: name.to_owned(),
                msg: format!(
                    "data_offsets [{s}, {e}] leave bytes {end}..{s} unused: tensors must be \
                     contiguous"
                ),
            });
        }
        end = e;
    }
    if end != data_len {
        return Err(bad(format!(
            "tensors cover {end} of the {data_len} data bytes (the rest is not any tensor's)"
        )));
    }
    Ok(())
}

/// `N` of a tensor named `model.layers.N.…`.
fn layer_index(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// A safetensors header's entries in file order, duplicates kept (to be reported).
struct Header(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for Header {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Header;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Header, A::Error> {
                let mut v = Vec::new();
                while let Some(e) = map.next_entry::<String, Value>()? {
                    v.push(e);
                }
                Ok(Header(v))
            }
        }
        d.deserialize_map(V)
    }
}

impl TensorSource for SafetensorsSource {
    fn read(&self, kind: TensorKind, region: &Region) -> Result<Vec<f32>> {
        let name = kind.hf_name(&self.cfg);
        let e = self.entries.get(&name).ok_or_else(|| Error::Tensor {
            file: self.listing.clone(),
            tensor: name.clone(),
            msg: "missing from the checkpoint".into(),
        })?;
        let cols = if e.shape.len() == 2 { e.shape[1] } else { 1 };
        let rows = e.shape.first().copied().unwrap_or(1);
        if region.rows.end > rows || region.cols.end > cols {
            return Err(Error::Tensor {
                file: self.files[e.file].0.clone(),
                tensor: name,
                msg: format!("region {region:?} outside shape {:?}", e.shape),
            });
        }
        let data = &self.files[e.file].1[e.start..];
        let sz = e.dtype.size();
        let mut out = Vec::with_capacity(region.len());
        for r in region.rows.clone() {
            let row = &data[(r * cols + region.cols.start) * sz..(r * cols + region.cols.end) * sz];
            match e.dtype {
                DType::BF16 => out.extend(
                    row.chunks_exact(2)
                        .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)),
                ),
                DType::F16 => out.extend(
                    row.chunks_exact(2)
                        .map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()),
                ),
                DType::F32 => out.extend(
                    row.chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                ),
            }
        }
        // A NaN or infinite weight would run on as garbage (a NaN norm weight gave token
        // 0 with exit status 0). Chunked so the scan vectorizes: about as cheap as the
        // conversion above.
        if !out
            .chunks(1024)
            .all(|c| c.iter().fold(true, |ok, x| ok & x.is_finite()))
        {
            let i = out.iter().position(|x| !x.is_finite()).unwrap_or(0);
            let w = region.cols.len();
            let (r, c) = (region.rows.start + i / w, region.cols.start + i % w);
            return Err(Error::Tensor {
                file: self.files[e.file].0.clone(),
                tensor: name,
                msg: format!("non-finite value {} at [{r}, {c}]", out[i]),
            });
        }
        Ok(out)
    }
}

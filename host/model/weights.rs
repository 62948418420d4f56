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
}

impl SafetensorsSource {
    /// Opens the checkpoint in `dir` and checks every tensor `cfg` needs.
    pub fn open(dir: &Path, cfg: &ModelConfig) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let file_names: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let v: Value = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
                file: index.clone(),
                msg: format!("not valid JSON: {e}"),
            })?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| Error::Checkpoint {
                    file: index.clone(),
                    msg: "missing `weight_map` object".into(),
                })?;
            let mut names: Vec<PathBuf> = Vec::new();
            for f in map.values() {
                let f = f.as_str().ok_or_else(|| Error::Checkpoint {
                    file: index.clone(),
                    msg: "`weight_map` values must be file names".into(),
                })?;
                if f.contains('/') || f.contains("..") {
                    return Err(Error::Checkpoint {
                        file: index.clone(),
                        msg: format!("shard file name `{f}` must be a plain file name"),
                    });
                }
                let p = dir.join(f);
                if !names.contains(&p) {
                    names.push(p);
                }
            }
            names
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
            // SAFETY: the checkpoint is treated as read-only for the life of the source;
            // mutating it underneath a running engine is outside what remp supports.
            let mmap = unsafe { Mmap::map(&f) }.map_err(|e| Error::io(&path, e))?;
            parse_header(&path, &mmap, fi, &mut entries)?;
            files.push((path, mmap));
        }
        let src = SafetensorsSource {
            files,
            entries,
            cfg: cfg.clone(),
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
        Ok(src)
    }

    fn check(&self, kind: TensorKind) -> Result<()> {
        let name = kind.hf_name(&self.cfg);
        let [rows, cols] = kind.shape(&self.cfg);
        let e = self.entries.get(&name).ok_or_else(|| Error::Tensor {
            file: self.files.first().map(|f| f.0.clone()).unwrap_or_default(),
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
    let n = u64::from_le_bytes(buf[..8].try_into().unwrap_or([0; 8])) as usize;
    if n > buf.len() - 8 {
        return Err(bad(format!(
            "truncated or corrupt: header claims {n} bytes, file has {}",
            buf.len()
        )));
    }
    let header: Value = serde_json::from_slice(&buf[8..8 + n])
        .map_err(|e| bad(format!("corrupt safetensors header: {e}")))?;
    let obj = header
        .as_object()
        .ok_or_else(|| bad("corrupt safetensors header: not an object".into()))?;
    let data_len = buf.len() - 8 - n;
    for (name, v) in obj {
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
                    .map(|x| x.as_u64().map(|x| x as usize))
                    .collect::<Option<_>>()
            })
            .ok_or_else(|| tbad("missing or malformed shape".into()))?;
        let offs: Vec<usize> = v
            .get("data_offsets")
            .and_then(Value::as_array)
            .and_then(|a| {
                a.iter()
                    .map(|x| x.as_u64().map(|x| x as usize))
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
    Ok(())
}

impl TensorSource for SafetensorsSource {
    fn read(&self, kind: TensorKind, region: &Region) -> Result<Vec<f32>> {
        let name = kind.hf_name(&self.cfg);
        let e = self.entries.get(&name).ok_or_else(|| Error::Tensor {
            file: PathBuf::new(),
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
        Ok(out)
    }
}

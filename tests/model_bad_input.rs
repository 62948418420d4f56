//! A broken model directory fails `Model::load` (or the first read of the broken tensor)
//! with an error naming the file and the field or tensor at fault: each test corrupts a
//! copy of remp-tiny one way and checks the message.

mod common;

use common::{tiny_dir, TempDir};
use remp::model::Model;
use remp::parallel::{LayerId, Region, TensorKind};
use serde_json::{json, Map, Value};
use std::path::Path;

/// A writable copy of remp-tiny without its tokenizer (not needed here; keeps it fast).
fn tiny_copy(tag: &str) -> TempDir {
    let d = TempDir::new(&format!("model-{tag}"));
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        let bytes = std::fs::read(common::tiny_dir().join(f)).unwrap();
        std::fs::write(d.0.join(f), bytes).unwrap();
    }
    d
}

/// The error `Model::load` gives for `dir` (panics if it loads).
fn load_err(dir: &Path) -> String {
    match Model::load(dir) {
        Ok(_) => panic!("{} loaded, expected an error", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// Asserts the load error names every one of `parts`.
fn expect_err(dir: &Path, parts: &[&str]) -> String {
    // The temp dir's own name (which says what a test breaks) must not satisfy a check.
    let msg = load_err(dir).replace(&dir.display().to_string(), "<dir>");
    for p in parts {
        assert!(msg.contains(p), "error does not name `{p}`: {msg}");
    }
    msg
}

fn edit_json(path: &Path, f: impl FnOnce(&mut Map<String, Value>)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut Map<String, Value>)) {
    edit_json(&dir.join("config.json"), f)
}

/// model.safetensors as (header entries in file order, data buffer).
fn read_raw(dir: &Path) -> (Vec<(String, Value)>, Vec<u8>) {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    // __metadata__ is optional: left out, so every entry is a tensor.
    let mut entries: Vec<(String, Value)> = header
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .collect();
    entries.sort_by_key(|(_, v)| v["data_offsets"][0].as_u64().unwrap_or(0));
    (entries, bytes[8 + n..].to_vec())
}

/// Writes model.safetensors from header entries (duplicates allowed) and a data buffer.
fn write_raw(dir: &Path, entries: &[(String, Value)], data: &[u8]) {
    let body: Vec<String> = entries
        .iter()
        .map(|(k, v)| format!("{}:{}", Value::from(k.as_str()), v))
        .collect();
    let header = format!("{{{}}}", body.join(","));
    let mut f = (header.len() as u64).to_le_bytes().to_vec();
    f.extend(header.as_bytes());
    f.extend(data);
    std::fs::write(dir.join("model.safetensors"), f).unwrap();
}

fn entry<'a>(entries: &'a mut [(String, Value)], name: &str) -> &'a mut Value {
    &mut entries.iter_mut().find(|e| e.0 == name).unwrap().1
}

fn offsets(v: &Value) -> [u64; 2] {
    let o = &v["data_offsets"];
    [o[0].as_u64().unwrap(), o[1].as_u64().unwrap()]
}

#[test]
fn the_unmodified_copy_loads() {
    let d = tiny_copy("ok");
    let m = Model::load(&d.0).unwrap();
    assert_eq!(m.config.num_layers, 6);
    assert_eq!(m.config.eos_token_ids, vec![1]);
    // Rewritten by the raw writer, unchanged: still loads (the writer itself is sound).
    let (e, data) = read_raw(&d.0);
    write_raw(&d.0, &e, &data);
    Model::load(&d.0).unwrap();
}

// ---------------------------------------------------------------------------------------
// Safetensors header

#[test]
fn overlapping_data_offsets() {
    // lm_head pointed at the embedding's bytes: once ran with the wrong head.
    let d = tiny_copy("overlap");
    let (mut e, data) = read_raw(&d.0);
    let embed = offsets(entry(&mut e, "model.embed_tokens.weight"));
    entry(&mut e, "lm_head.weight")["data_offsets"] = json!(embed);
    write_raw(&d.0, &e, &data);
    expect_err(
        &d.0,
        &[
            "model.safetensors",
            "lm_head.weight",
            "model.embed_tokens.weight",
            "overlap",
        ],
    );
}

/// Offsets shifted off their place (the format needs none aligned, only contiguous and
/// in bounds; safetensors' own reader checks the same): caught as running past the data
/// or overlapping a neighbour.
#[test]
fn shifted_data_offsets() {
    // model.norm.weight one byte later: once ran with zeros from the shifted bytes.
    let d = tiny_copy("shifted");
    let (mut e, data) = read_raw(&d.0);
    let orig = e.clone();
    let v = entry(&mut e, "model.norm.weight");
    let [s, t] = offsets(v);
    v["data_offsets"] = json!([s + 1, t + 1]);
    write_raw(&d.0, &e, &data);
    expect_err(
        &d.0,
        &[
            "model.safetensors",
            "model.norm.weight",
            "data ends at byte",
        ],
    );
    // The tester's [1, 513]: inside lm_head's bytes.
    let mut e = orig;
    entry(&mut e, "model.norm.weight")["data_offsets"] = json!([1, 513]);
    write_raw(&d.0, &e, &data);
    expect_err(&d.0, &["model.norm.weight", "overlap", "lm_head.weight"]);
}

#[test]
fn duplicate_tensor_name() {
    let d = tiny_copy("dup");
    let (mut e, data) = read_raw(&d.0);
    // A second model.norm.weight over the first layer's input norm (same shape): the
    // last one won before.
    let other = entry(&mut e, "model.layers.0.input_layernorm.weight").clone();
    e.push(("model.norm.weight".into(), other));
    write_raw(&d.0, &e, &data);
    expect_err(&d.0, &["model.safetensors", "model.norm.weight", "twice"]);
}

#[test]
fn gap_or_trailing_bytes() {
    let d = tiny_copy("trailing");
    let (e, mut data) = read_raw(&d.0);
    data.extend([0u8; 16]);
    write_raw(&d.0, &e, &data);
    expect_err(&d.0, &["model.safetensors", "data bytes"]);

    // A hole: every tensor after the first moved 4 bytes on (aligned, no overlap).
    let (mut e, mut data) = read_raw(&tiny_copy("gap0").0);
    let first = e[1].0.clone();
    for (_, v) in e.iter_mut().skip(1) {
        let [s, t] = offsets(v);
        v["data_offsets"] = json!([s + 4, t + 4]);
    }
    data.extend([0u8; 4]);
    write_raw(&d.0, &e, &data);
    expect_err(&d.0, &[first.as_str(), "contiguous"]);
}

// ---------------------------------------------------------------------------------------
// Checkpoint vs config

#[test]
fn checkpoint_with_more_layers_than_the_config() {
    let d = tiny_copy("layers");
    edit_config(&d.0, |c| {
        c.insert("num_hidden_layers".into(), 3.into());
    });
    expect_err(
        &d.0,
        &[
            "model.layers.3.",
            "num_hidden_layers 3",
            "model.safetensors",
        ],
    );
}

#[test]
fn tensors_the_config_does_not_use() {
    // A q_proj bias with `attention_bias: false`: once ignored (run without it).
    let d = tiny_copy("extra-bias");
    let (mut e, mut data) = read_raw(&d.0);
    let name = "model.layers.2.self_attn.q_proj.bias";
    let end = data.len() as u64;
    e.push((
        name.into(),
        json!({"dtype": "BF16", "shape": [256], "data_offsets": [end, end + 512]}),
    ));
    data.extend([0u8; 512]);
    write_raw(&d.0, &e, &data);
    expect_err(&d.0, &[name, "attention_bias", "model.safetensors"]);
    // With the config asking for the biases, the checkpoint must hold all of them.
    edit_config(&d.0, |c| {
        c.insert("attention_bias".into(), true.into());
    });
    expect_err(&d.0, &["model.layers.0.self_attn.q_proj.bias", "missing"]);
    // An exported rotary buffer is tolerated.
    let d = tiny_copy("inv-freq");
    let (mut e, mut data) = read_raw(&d.0);
    let end = data.len() as u64;
    e.push((
        "model.layers.0.self_attn.rotary_emb.inv_freq".into(),
        json!({"dtype": "F32", "shape": [16], "data_offsets": [end, end + 64]}),
    ));
    data.extend([0u8; 64]);
    write_raw(&d.0, &e, &data);
    Model::load(&d.0).unwrap();
}

#[test]
fn non_finite_weights() {
    // A NaN norm weight once gave token 0 with exit status 0: fails the load.
    let d = tiny_copy("nan-norm");
    let (mut e, mut data) = read_raw(&d.0);
    let [s, _] = offsets(entry(&mut e, "model.norm.weight"));
    // bf16 NaN (0x7fc0), little-endian, at element 3.
    let i = s as usize + 3 * 2;
    data[i..i + 2].copy_from_slice(&0x7fc0u16.to_le_bytes());
    write_raw(&d.0, &e, &data);
    expect_err(&d.0, &["model.norm.weight", "non-finite", "[3, 0]"]);

    // An infinite value in a matrix: the load reads no matrix; reading it fails.
    let d = tiny_copy("inf-q");
    let (mut e, mut data) = read_raw(&d.0);
    let name = "model.layers.1.self_attn.q_proj.weight";
    let [s, _] = offsets(entry(&mut e, name));
    // Row 2, column 5 of [256, 256]; bf16 +inf (0x7f80).
    let i = s as usize + (2 * 256 + 5) * 2;
    data[i..i + 2].copy_from_slice(&0x7f80u16.to_le_bytes());
    write_raw(&d.0, &e, &data);
    let m = Model::load(&d.0).unwrap();
    let q = TensorKind::Q(LayerId(1));
    let msg = m
        .source
        .read(q, &Region::new(0..256, 0..256))
        .unwrap_err()
        .to_string();
    for p in [name, "non-finite", "inf", "[2, 5]"] {
        assert!(msg.contains(p), "error does not name `{p}`: {msg}");
    }
    // A region without it reads fine.
    m.source.read(q, &Region::new(3..256, 0..256)).unwrap();
}

// ---------------------------------------------------------------------------------------
// Sharded checkpoints

/// Splits model.safetensors into two shards and writes the index (model.safetensors
/// removed). Returns the weight map for editing; `write_index` writes it back.
fn shard(dir: &Path) -> Map<String, Value> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_owned).collect();
    names.sort();
    let mut map = Map::new();
    for (i, part) in names.chunks(names.len() / 2 + 1).enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let views: Vec<(String, safetensors::tensor::TensorView)> = part
            .iter()
            .map(|n| (n.clone(), st.tensor(n).unwrap()))
            .collect();
        std::fs::write(
            dir.join(&file),
            safetensors::serialize(views, None).unwrap(),
        )
        .unwrap();
        for n in part {
            map.insert(n.clone(), file.clone().into());
        }
    }
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    write_index(dir, &map);
    map
}

fn write_index(dir: &Path, map: &Map<String, Value>) {
    let index = json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

#[test]
fn sharded_index_problems() {
    let d = tiny_copy("shards");
    let map = shard(&d.0);
    Model::load(&d.0).unwrap();

    // Once printed an empty file name.
    write_index(&d.0, &Map::new());
    expect_err(
        &d.0,
        &["model.safetensors.index.json", "weight_map", "empty"],
    );

    // Once "No such device (os error 19)".
    std::fs::create_dir(d.0.join("subdir")).unwrap();
    for (bad, why) in [
        ("", "is empty"),
        (".", "not a file name"),
        ("subdir", "not a regular file"),
    ] {
        let mut m = map.clone();
        m.insert("model.norm.weight".into(), bad.into());
        write_index(&d.0, &m);
        let msg = load_err(&d.0);
        assert!(msg.contains(why), "{bad:?}: {msg}");
        assert!(!msg.contains("os error"), "{bad:?}: {msg}");
        if bad.is_empty() {
            assert!(msg.contains("model.norm.weight"), "{msg}");
        } else {
            assert!(msg.contains(bad), "{msg}");
        }
    }

    // The index places a tensor in the other shard.
    let mut m = map.clone();
    let name = "model.norm.weight";
    let other = if m[name] == "model-00001-of-00002.safetensors" {
        "model-00002-of-00002.safetensors"
    } else {
        "model-00001-of-00002.safetensors"
    };
    m.insert(name.into(), other.into());
    write_index(&d.0, &m);
    expect_err(&d.0, &[name, other, "index"]);

    // The index lists a tensor its shard does not hold.
    let mut m = map.clone();
    m.insert(
        "model.extra.weight".into(),
        "model-00002-of-00002.safetensors".into(),
    );
    write_index(&d.0, &m);
    expect_err(
        &d.0,
        &[
            "model-00002-of-00002.safetensors",
            "model.extra.weight",
            "missing",
        ],
    );
}

// ---------------------------------------------------------------------------------------
// config.json and generation_config.json

#[test]
fn eos_ids_out_of_range() {
    // Above 32 bits: once truncated to 35.
    for (id, tag) in [(json!(4294967331u64), "4294967331"), (json!(512), "512")] {
        let d = tiny_copy("eos");
        edit_config(&d.0, |c| {
            c.insert("eos_token_id".into(), id.clone());
        });
        expect_err(&d.0, &["config.json", "eos_token_id", tag]);
        // In a list too.
        edit_config(&d.0, |c| {
            c.insert("eos_token_id".into(), json!([1, id]));
        });
        expect_err(&d.0, &["config.json", "eos_token_id", tag]);
    }
    let d = tiny_copy("eos-neg");
    edit_config(&d.0, |c| {
        c.insert("eos_token_id".into(), json!(-1));
    });
    expect_err(&d.0, &["config.json", "eos_token_id", "-1"]);

    // In generation_config.json (used when config.json has none).
    let d = tiny_copy("gen-eos");
    edit_config(&d.0, |c| {
        c.remove("eos_token_id");
    });
    assert_eq!(Model::load(&d.0).unwrap().config.eos_token_ids, vec![1]);
    edit_json(&d.0.join("generation_config.json"), |c| {
        c.insert("eos_token_id".into(), json!(4294967331u64));
    });
    expect_err(
        &d.0,
        &["generation_config.json", "eos_token_id", "4294967331"],
    );
}

#[test]
fn generation_config_corrupt_or_missing() {
    let d = tiny_copy("gen");
    std::fs::write(
        d.0.join("generation_config.json"),
        "{\"eos_token_id\": 1,, oops",
    )
    .unwrap();
    expect_err(&d.0, &["generation_config.json", "not valid JSON"]);
    std::fs::write(d.0.join("generation_config.json"), "[1]").unwrap();
    expect_err(&d.0, &["generation_config.json"]);
    // Missing is fine.
    std::fs::remove_file(d.0.join("generation_config.json")).unwrap();
    assert_eq!(Model::load(&d.0).unwrap().config.eos_token_ids, vec![1]);
}

#[test]
fn config_values_of_the_wrong_type() {
    let cases: Vec<(&str, Value, &[&str])> = vec![
        ("hidden_act", json!(5), &["hidden_act", "5"]),
        ("hidden_act", json!("gelu"), &["hidden_act", "gelu"]),
        (
            "rope_parameters",
            json!("yarn"),
            &["rope_parameters", "yarn"],
        ),
        (
            "rope_parameters",
            json!({"rope_type": 3, "rope_theta": 10000.0}),
            &["rope_type", "3"],
        ),
        ("dtype", json!("float8"), &["dtype", "float8"]),
        ("dtype", json!(16), &["dtype", "16"]),
        ("rms_norm_eps", json!(1e-60), &["rms_norm_eps", "1e-60"]),
        ("rms_norm_eps", json!(1e300), &["rms_norm_eps", "1e300"]),
        ("rms_norm_eps", json!(0.0), &["rms_norm_eps"]),
    ];
    for (key, value, parts) in cases {
        let d = tiny_copy("types");
        edit_config(&d.0, |c| {
            c.insert(key.into(), value.clone());
        });
        let msg = expect_err(&d.0, parts);
        assert!(msg.contains("config.json"), "{key}={value}: {msg}");
    }
    // torch_dtype (older key) is checked the same way; accepted spellings still load.
    let d = tiny_copy("torch-dtype");
    edit_config(&d.0, |c| {
        c.remove("dtype");
        c.insert("torch_dtype".into(), "float8_e4m3fn".into());
    });
    expect_err(&d.0, &["torch_dtype", "float8_e4m3fn"]);
    for ok in ["float32", "bfloat16", "float16"] {
        edit_config(&d.0, |c| {
            c.insert("torch_dtype".into(), ok.into());
        });
        Model::load(&d.0).unwrap();
    }
}

#[test]
fn heads_that_do_not_divide_hidden_size() {
    // Once blamed the checkpoint (q_proj shape [256, 256], expected [0, 256]).
    let d = tiny_copy("heads");
    edit_config(&d.0, |c| {
        c.remove("head_dim");
        c.insert("num_attention_heads".into(), 512.into());
    });
    let msg = expect_err(
        &d.0,
        &[
            "config.json",
            "hidden_size 256",
            "num_attention_heads 512",
            "divisible",
        ],
    );
    assert!(!msg.contains("q_proj"), "{msg}");
}

/// Sizes no tensor can have: num_attention_heads x head_dim wrapped to 0 in release
/// builds (the error then blamed q_proj's shape); now the config is refused.
#[test]
fn sizes_too_large_for_a_tensor() {
    let d = tiny_copy("sizes");
    for (key, value) in [
        ("num_attention_heads", 1u64 << 62),
        ("hidden_size", 1 << 60),
        ("intermediate_size", 1 << 61),
    ] {
        std::fs::copy(tiny_dir().join("config.json"), d.0.join("config.json")).unwrap();
        edit_config(&d.0, |c| {
            c.insert(key.into(), value.into());
        });
        let msg = expect_err(&d.0, &["config.json", "too large for a tensor", key]);
        assert!(!msg.contains("q_proj"), "{msg}");
    }
}

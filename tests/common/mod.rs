//! Shared test helpers: the transformers oracle in `../shared/models/remp-tiny`.
#![allow(dead_code)]

use remp::model::Model;
use remp::parallel::{LayerId, Segment, Topology, WorkerId};
use remp::reshard::executor::{ReconfigEvent, ReconfigOptions};
use remp::reshard::planner::ReshardPlan;
use remp::runtime::{Engine, Event, Request, RequestId};
use std::path::PathBuf;

/// remp-tiny and its oracle: `REMP_TINY_DIR` if set (the GPU check's bundle carries a
/// copy), else `../shared/models/remp-tiny` beside the repository.
pub fn tiny_dir() -> PathBuf {
    let d = match std::env::var_os("REMP_TINY_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/models/remp-tiny"),
    };
    assert!(
        d.join("reference.safetensors").exists(),
        "oracle missing at {} (tests need ../shared beside the repo)",
        d.display()
    );
    d
}

pub fn tiny_model() -> Model {
    Model::load(&tiny_dir()).expect("load remp-tiny")
}

pub struct OracleCase {
    pub prompt: Vec<u32>,
    /// Prompt + 48 greedy tokens.
    pub tokens: Vec<u32>,
    /// `[tokens.len(), vocab]`, logits at every position.
    pub logits: Vec<f32>,
}

pub fn oracle() -> Vec<OracleCase> {
    let bytes = std::fs::read(tiny_dir().join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ints = |name: &str| -> Vec<u32> {
        let t = st.tensor(name).unwrap();
        t.data()
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u32)
            .collect()
    };
    let mut out = Vec::new();
    for i in 0.. {
        if st.tensor(&format!("prompt_{i}")).is_err() {
            break;
        }
        let t = st.tensor(&format!("logits_{i}")).unwrap();
        let logits = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        out.push(OracleCase {
            prompt: ints(&format!("prompt_{i}")),
            tokens: ints(&format!("tokens_{i}")),
            logits,
        });
    }
    assert!(out.len() >= 5, "oracle has {} prompts", out.len());
    out
}

/// Adds `req` and runs the engine to completion; returns the request's id and the
/// logits of every position it processed, in order (`req` must ask for them).
pub fn run_with_logits(engine: &mut Engine, req: Request) -> (RequestId, Vec<f32>) {
    assert!(req.return_logits);
    let id = engine.add_request(req).unwrap();
    let mut logits = Vec::new();
    for ev in engine.run_to_completion().unwrap() {
        if let Event::Token {
            id: rid,
            logits: Some(l),
            ..
        } = ev
        {
            if rid == id {
                logits.extend(l);
            }
        }
    }
    (id, logits)
}

/// Largest |a - b| / (1 + |b|) over the slices: absolute for small logits, relative for
/// large ones.
pub fn max_rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0, f32::max)
}

/// A fresh directory under the system temp dir (name from `tag`), removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let d = std::env::temp_dir().join(format!("remp-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }

    pub fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `mod $name { emu, cuda }`: one test body run on the emulated GPU (in CI) and on CUDA
/// GPU 0 (ignored without a GPU; `tools/gpu-check` runs it with `--include-ignored`).
/// Callers import `remp::runtime::DeviceKind`.
#[allow(unused_macros)]
macro_rules! on_devices {
    ($(#[$doc:meta])* fn $name:ident($dev:ident) $body:block) => {
        on_devices! {
            ignore = "needs a CUDA device";
            $(#[$doc])* fn $name($dev) $body
        }
    };
    (ignore = $why:literal; $(#[$doc:meta])* fn $name:ident($dev:ident) $body:block) => {
        $(#[$doc])*
        mod $name {
            use super::*;
            fn body($dev: DeviceKind) $body
            #[test]
            fn emu() {
                body(DeviceKind::Emulated)
            }
            #[test]
            #[ignore = $why]
            fn cuda() {
                body(DeviceKind::Cuda)
            }
        }
    };
}

/// In `plan`, a piece of `seg` that moves between workers: (source, destination).
pub fn remote_piece(plan: &ReshardPlan, seg: Segment) -> (WorkerId, WorkerId) {
    plan.segments
        .iter()
        .filter(|s| s.segment == seg)
        .flat_map(|s| &s.transfers)
        .find(|t| t.src != t.dst)
        .map(|t| (t.src, t.dst))
        .unwrap()
}

/// Aborts a switch to `target` (the source of a layer-0 piece fails at once, before any
/// step) and returns, still in the same step, once the abort is done. The destination
/// of that piece discards the aborted job only after a message of the next job reached
/// it (test hook): the interleaving where a peer, done discarding, already sent it a
/// piece of the next switch. Returns that worker.
pub fn abort_at_once(engine: &mut Engine, target: Topology) -> WorkerId {
    let (_, plan) = engine.plan_reconfigure(target).unwrap();
    let layer0 = Segment::Layer(LayerId(0));
    let (src, dst) = remote_piece(&plan, layer0);
    let opts = ReconfigOptions {
        window: 1,
        fail_at: Some((layer0, src)),
        lookahead: 1,
        late_discard: Some(dst),
        ..Default::default()
    };
    let aborted = aborted_count(engine);
    engine.reconfigure_with(target, &opts).unwrap();
    // The failed copy needs no step to abort.
    while engine.reconfig_in_progress() {
        std::thread::yield_now();
    }
    assert_eq!(aborted_count(engine), aborted + 1);
    dst
}

/// After the switch that followed [`abort_at_once`] ran: the late worker's discard did
/// wait for, and see, a message of that switch (the interleaving the hook forces), every
/// time the hook was used, never giving up at the comm timeout.
pub fn assert_late_discards_saw_the_next_switch(engine: &Engine, times: usize) {
    assert_eq!(engine.late_discards(), (times, 0), "(saw, timed out)");
}

pub fn aborted_count(engine: &mut Engine) -> usize {
    engine
        .reconfig_events()
        .iter()
        .filter(|e| matches!(e, ReconfigEvent::Aborted { .. }))
        .count()
}

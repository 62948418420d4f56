//! The engine API a serving system embeds: queueing when the KV cache is full, refusal
//! of what can never fit, EOS and length stops, cancellation, seeded sampling, streaming
//! events. Uses the built-in random tiny model (no files).

use remp::model::{random, Model};
use remp::parallel::Topology;
use remp::runtime::{Engine, EngineConfig, Event, FinishReason, Request, Sampling};

fn engine(kv_blocks: usize) -> (Model, Engine) {
    let model = Model::random_tiny();
    let mut cfg = EngineConfig::new(Topology::new(2, 1));
    cfg.kv_blocks = kv_blocks;
    let e = Engine::new(&model, cfg).unwrap();
    (model, e)
}

fn prompt(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (seed * 37 + i * 11 + 5) % 500)
        .collect()
}

#[test]
fn full_cache_queues_then_serves_everything() {
    // 4 blocks of 16 tokens: each request needs 2 (20 prompt + 12 new = 32 tokens), so
    // only two run at once; the third waits for a slot and still completes.
    let (_, mut e) = engine(4);
    let mut ids = Vec::new();
    for r in 0..3 {
        let mut req = Request::greedy(prompt(r, 20), 12);
        req.ignore_eos = true;
        ids.push(e.add_request(req).unwrap());
    }
    e.step().unwrap();
    assert_eq!(e.num_running(), 2);
    assert_eq!(e.num_waiting(), 1);
    assert_eq!(e.free_blocks(), 0);
    e.run_to_completion().unwrap();
    for id in ids {
        let out = e.output(id).unwrap();
        assert_eq!(out.output.len(), 12);
        assert_eq!(out.finish, Some(FinishReason::Length));
    }
    assert_eq!(e.free_blocks(), 4, "every block released");
}

#[test]
fn a_request_that_can_never_fit_is_refused() {
    let (_, mut e) = engine(2);
    let err = e
        .add_request(Request::greedy(prompt(1, 30), 10))
        .unwrap_err();
    assert!(err.to_string().contains("KV blocks"), "{err}");
    assert!(!e.has_work());
    let err = e.add_request(Request::greedy(vec![], 4)).unwrap_err();
    assert!(err.to_string().contains("empty prompt"), "{err}");
    let err = e.add_request(Request::greedy(vec![600], 4)).unwrap_err();
    assert!(err.to_string().contains("out of range"), "{err}");
}

#[test]
fn eos_stops_a_request_unless_ignored() {
    // Find the first greedy token, then make it the EOS of an otherwise equal model.
    let (_, mut e) = engine(64);
    let id = e.add_request(Request::greedy(prompt(3, 8), 4)).unwrap();
    e.run_to_completion().unwrap();
    let first = e.output(id).unwrap().output[0];
    let cfg = remp::model::ModelConfig {
        eos_token_ids: vec![first],
        ..random::tiny_config()
    };
    let model = Model::random("eos-test", cfg, 0x5eed);
    let mut e = Engine::new(&model, EngineConfig::new(Topology::new(1, 2))).unwrap();
    let stop = e.add_request(Request::greedy(prompt(3, 8), 4)).unwrap();
    let mut ignore = Request::greedy(prompt(3, 8), 4);
    ignore.ignore_eos = true;
    let go_on = e.add_request(ignore).unwrap();
    e.run_to_completion().unwrap();
    let s = e.output(stop).unwrap();
    assert_eq!(
        (s.output.clone(), s.finish),
        (vec![first], Some(FinishReason::Eos))
    );
    let g = e.output(go_on).unwrap();
    assert_eq!(g.output.len(), 4);
    assert_eq!(g.finish, Some(FinishReason::Length));
}

#[test]
fn cancel_frees_blocks_and_other_requests_continue() {
    let (_, mut e) = engine(64);
    let a = e.add_request(Request::greedy(prompt(1, 10), 20)).unwrap();
    let b = e.add_request(Request::greedy(prompt(2, 10), 5)).unwrap();
    e.step().unwrap();
    let before = e.free_blocks();
    assert!(e.cancel(a));
    assert!(!e.cancel(a), "second cancel is a no-op");
    assert!(e.free_blocks() > before);
    e.run_to_completion().unwrap();
    assert_eq!(e.output(a).unwrap().finish, Some(FinishReason::Cancelled));
    assert_eq!(e.output(b).unwrap().output.len(), 5);
}

#[test]
fn seeded_sampling_is_reproducible_and_seed_dependent() {
    let run = |seed: u64| {
        let (_, mut e) = engine(64);
        let mut req = Request::greedy(prompt(4, 6), 24);
        req.ignore_eos = true;
        req.sampling = Sampling::Random {
            temperature: 1.5,
            top_p: 0.95,
            seed,
        };
        let id = e.add_request(req).unwrap();
        e.run_to_completion().unwrap();
        e.output(id).unwrap().output.clone()
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
    let (_, mut e) = engine(64);
    let mut bad = Request::greedy(prompt(4, 6), 4);
    bad.sampling = Sampling::Random {
        temperature: 0.0,
        top_p: 0.9,
        seed: 0,
    };
    assert!(e.add_request(bad).is_err());
}

#[test]
fn events_stream_tokens_in_order_and_end_with_finished() {
    let (_, mut e) = engine(64);
    let mut req = Request::greedy(prompt(5, 5), 6);
    req.ignore_eos = true;
    let id = e.add_request(req).unwrap();
    let mut streamed = Vec::new();
    let mut finished = 0;
    while e.has_work() {
        for ev in e.step().unwrap() {
            match ev {
                Event::Token { id: i, token, .. } if i == id => streamed.push(token),
                Event::Finished { id: i, reason } if i == id => {
                    assert_eq!(reason, FinishReason::Length);
                    finished += 1;
                }
                _ => {}
            }
        }
    }
    assert_eq!(finished, 1);
    assert_eq!(streamed, e.output(id).unwrap().output);
}

/// Every byte between workers goes through the communication layer and is counted:
/// one prefill step of tp2pp2 moves exactly what the placement implies. A greedy
/// request's step gathers each vocabulary half's pick; one that returns its logits, the
/// logits.
#[test]
fn comm_layer_counts_every_inter_worker_byte() {
    let model = Model::random_tiny();
    let cfg = &model.config;
    let (h, v, l) = (cfg.hidden_size, cfg.vocab_size, cfg.num_layers);
    let t = 7; // prompt tokens, all processed in the first step
    let mut tokens = Vec::new();
    for return_logits in [false, true] {
        let mut e = Engine::new(&model, EngineConfig::new(Topology::new(2, 2))).unwrap();
        let mut req = Request::greedy(prompt(6, t), 3);
        req.return_logits = return_logits;
        e.add_request(req).unwrap();
        let before = e.compute_bytes();
        let events = e.step().unwrap();
        let moved = e.compute_bytes() - before;
        // Hidden-state floats: each all-reduce in a group of 2 sends T×H to the one peer
        // from both members; the embedding has one, every layer two (attention out, MLP
        // down).
        let all_reduces = 2 * t * h * (1 + 2 * l);
        // Stage hand-off: each of the 2 members of the next stage receives T×H once.
        let handoff = 2 * t * h;
        // From both vocabulary halves to the driver: the logits of every position, or
        // the last position's pick (a value and an index).
        let head = if return_logits { t * v } else { 2 * 2 };
        assert_eq!(
            moved as usize,
            4 * (all_reduces + handoff + head),
            "return_logits {return_logits}"
        );
        tokens.push(events.iter().find_map(|ev| match ev {
            Event::Token { token, .. } => Some(*token),
            _ => None,
        }));
    }
    assert!(tokens[0].is_some());
    assert_eq!(
        tokens[0], tokens[1],
        "picked on the ranks vs from all logits"
    );
}

/// A switch moves exactly the bytes its plan says (here with no KV cached, weights only),
/// all of them counted by the communication layer.
#[test]
fn a_switch_moves_exactly_the_planned_bytes() {
    use remp::reshard::executor::ReconfigEvent;
    let model = Model::random_tiny();
    let mut cfg = EngineConfig::new(Topology::new(2, 2));
    cfg.workers = Some(4);
    let mut e = Engine::new(&model, cfg).unwrap();
    let (_, plan) = e.plan_reconfigure(Topology::new(4, 1)).unwrap();
    assert!(plan.bytes_moved > 0);
    let before = e.comm_stats().reshard_bytes();
    e.reconfigure(Topology::new(4, 1)).unwrap();
    e.run_to_completion().unwrap();
    assert_eq!(e.comm_stats().reshard_bytes() - before, plan.bytes_moved);
    let finished = e
        .reconfig_events()
        .iter()
        .find_map(|ev| match ev {
            ReconfigEvent::Finished { bytes_moved, .. } => Some(*bytes_moved),
            _ => None,
        })
        .unwrap();
    assert_eq!(finished, plan.bytes_moved);
}

/// A KV cache the engine cannot hold is refused when the engine is built, with a message
/// saying why, instead of wrapping its size or allocating until the host runs out of
/// memory: more token slots than 32-bit slot ids address, or more host memory than is
/// available (the CPU backend keeps K and V in f32).
#[test]
fn an_impossible_kv_cache_is_refused_up_front() {
    let model = Model::random_tiny();
    for (blocks, want) in [
        (usize::MAX, "32-bit"),
        (1usize << 53, "32-bit"),
        // remp-tiny: 6 layers x 4 KV heads x 32 x 16 tokens x K+V x f32 = 96 KiB a block,
        // so 2^27 blocks want 12 TiB.
        (1 << 27, "GiB of host memory"),
    ] {
        let mut cfg = EngineConfig::new(Topology::new(1, 1));
        cfg.kv_blocks = blocks;
        let err = Engine::new(&model, cfg).err().expect("refused").to_string();
        assert!(err.contains(want), "kv_blocks {blocks}: {err}");
    }
}

/// Programmatic dependent launch is a way of launching device kernels: asked of the
/// CPU backend, the engine refuses to start instead of ignoring it.
#[test]
fn pdl_on_the_cpu_is_refused() {
    let model = Model::random_tiny();
    let mut cfg = EngineConfig::new(Topology::new(1, 1));
    cfg.pdl = true;
    let err = Engine::new(&model, cfg).err().expect("refused").to_string();
    assert!(err.contains("programmatic dependent launch"), "{err}");
}

/// A model whose logits come out all NaN (here: a NaN final norm) fails the step with a
/// numerics error on both head paths (the greedy picks and the gathered logits), instead
/// of emitting token 0.
#[test]
fn all_nan_logits_fail_the_step() {
    use remp::model::TensorSource;
    use remp::parallel::{Region, TensorKind};
    use std::sync::Arc;
    struct NanNorm(Arc<dyn TensorSource>);
    impl TensorSource for NanNorm {
        fn read(&self, kind: TensorKind, region: &Region) -> remp::Result<Vec<f32>> {
            let mut v = self.0.read(kind, region)?;
            if kind == TensorKind::FinalNorm {
                v.fill(f32::NAN);
            }
            Ok(v)
        }
    }
    let mut model = Model::random_tiny();
    model.source = Arc::new(NanNorm(model.source.clone()));
    for (tp, return_logits) in [(1, false), (2, false), (1, true), (2, true)] {
        let mut e = Engine::new(&model, EngineConfig::new(Topology::new(tp, 1))).unwrap();
        let mut req = Request::greedy(prompt(3, 4), 2);
        req.return_logits = return_logits;
        e.add_request(req).unwrap();
        let err = e.step().expect_err("a NaN step fails").to_string();
        assert!(
            err.contains("NaN"),
            "tp{tp} return_logits {return_logits}: {err}"
        );
    }
}

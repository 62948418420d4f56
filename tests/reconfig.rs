//! Online reconfiguration: requests keep producing the transformers oracle's tokens on
//! remp-tiny while the topology changes under them, whatever the sequence of switches.

mod common;

use common::*;
use remp::parallel::{LayerId, Segment, Topology, WorkerId};
use remp::reshard::executor::{ReconfigEvent, ReconfigOptions};
use remp::runtime::sampling::Rng;
use remp::runtime::{Engine, EngineConfig, Request, RequestId};

/// Every topology of remp-tiny (8 heads, 4 KV heads, 6 layers) with at most 8 ranks.
fn all_topologies() -> Vec<Topology> {
    let mut v = Vec::new();
    for tp in [1, 2, 4, 8] {
        for pp in 1..=6 {
            if tp * pp <= 8 {
                v.push(Topology::new(tp, pp));
            }
        }
    }
    v
}

/// The oracle request of `c`: greedy, its 48 tokens, EOS ignored.
fn oracle_request(c: &OracleCase) -> Request {
    let mut r = Request::greedy(c.prompt.clone(), c.tokens.len() - c.prompt.len());
    r.ignore_eos = true;
    r
}

fn add_all(engine: &mut Engine, cases: &[OracleCase]) -> Vec<RequestId> {
    cases
        .iter()
        .map(|c| engine.add_request(oracle_request(c)).unwrap())
        .collect()
}

/// tp2pp2 on 4 workers with every oracle prompt added.
fn tp2pp2_serving_oracle() -> (Vec<OracleCase>, Engine, Vec<RequestId>) {
    let model = tiny_model();
    let cases = oracle();
    let mut econf = EngineConfig::new(Topology::new(2, 2));
    econf.workers = Some(4);
    let mut engine = Engine::new(&model, econf).unwrap();
    let ids = add_all(&mut engine, &cases);
    (cases, engine, ids)
}

fn assert_oracle_tokens(engine: &Engine, cases: &[OracleCase], ids: &[RequestId]) {
    for (c, id) in cases.iter().zip(ids) {
        assert_eq!(
            engine.output(*id).unwrap().output,
            c.tokens[c.prompt.len()..]
        );
    }
}

fn below(rng: &mut Rng, n: usize) -> usize {
    (rng.next_u64() % n as u64) as usize
}

fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

/// Runs the oracle prompts (joining at staggered steps) while switching topology at
/// random steps, and checks every request's tokens.
fn run_sequence(seed: u64, switches: usize) {
    let model = tiny_model();
    let cases = oracle();
    let topos = all_topologies();
    let mut rng = Rng::new(seed);
    let start = topos[below(&mut rng, topos.len())];
    let mut econf = EngineConfig::new(start);
    econf.workers = Some(8);
    let mut engine = Engine::new(&model, econf).unwrap();
    let mut ids = Vec::new();
    let mut pending_switches = switches;
    let mut step = 0;
    let mut next_join = 0;
    let mut trail = vec![start.to_string()];
    while next_join < cases.len() || engine.has_work() || pending_switches > 0 {
        // Requests join at different steps (some while a switch is in flight).
        if next_join < cases.len() && below(&mut rng, 3) == 0 {
            ids.push(
                engine
                    .add_request(oracle_request(&cases[next_join]))
                    .unwrap(),
            );
            next_join += 1;
        }
        if pending_switches > 0 && !engine.reconfig_in_progress() && below(&mut rng, 4) == 0 {
            let t = topos[below(&mut rng, topos.len())];
            engine.reconfigure(t).unwrap();
            trail.push(t.to_string());
            pending_switches -= 1;
        }
        engine.step().unwrap();
        step += 1;
        assert!(step < 5000, "seed {seed}: does not finish");
    }
    while engine.reconfig_in_progress() {
        engine.step().unwrap();
    }
    let evs = engine.reconfig_events().to_vec();
    assert!(
        !evs.iter()
            .any(|e| matches!(e, ReconfigEvent::Aborted { .. })),
        "seed {seed}: {evs:?}"
    );
    for (case, id) in cases.iter().zip(&ids) {
        let out = engine.output(*id).unwrap();
        assert_eq!(
            out.output,
            case.tokens[case.prompt.len()..],
            "seed {seed}, switches {trail:?}"
        );
    }
    let last = trail.last().unwrap();
    assert_eq!(&engine.topology_name(), last, "seed {seed}");
}

#[test]
fn random_switch_sequences_keep_oracle_tokens() {
    let base = seed();
    for k in 0..6 {
        run_sequence(base.wrapping_add(k), 4);
    }
}

#[test]
fn tp2pp2_to_tp4pp1_and_back_mid_decode() {
    let (cases, mut engine, ids) = tp2pp2_serving_oracle();
    // An extra request that leaves (cancelled) while the switch is in flight.
    let leaver = engine.add_request(oracle_request(&cases[1])).unwrap();
    for _ in 0..5 {
        engine.step().unwrap();
    }
    engine.reconfigure(Topology::new(4, 1)).unwrap();
    // A second request while the first runs is refused with a clear error.
    if engine.reconfig_in_progress() {
        let e = engine.reconfigure(Topology::new(1, 1)).unwrap_err();
        assert!(e.to_string().contains("in progress"), "{e}");
        assert!(engine.cancel(leaver));
    }
    while engine.reconfig_in_progress() {
        engine.step().unwrap();
    }
    assert_eq!(engine.topology_name(), "tp4pp1");
    for _ in 0..5 {
        engine.step().unwrap();
    }
    engine.reconfigure(Topology::new(2, 2)).unwrap();
    engine.run_to_completion().unwrap();
    assert_eq!(engine.topology_name(), "tp2pp2");
    assert_oracle_tokens(&engine, &cases, &ids);
    let evs = engine.reconfig_events();
    let finished = evs
        .iter()
        .filter(|e| matches!(e, ReconfigEvent::Finished { bytes_moved, .. } if *bytes_moved > 0))
        .count();
    assert_eq!(finished, 2, "{evs:?}");
}

#[test]
fn switch_requested_during_prefill_and_with_idle_engine() {
    let model = tiny_model();
    let cases = oracle();
    let mut econf = EngineConfig::new(Topology::new(1, 3));
    econf.workers = Some(8);
    let mut engine = Engine::new(&model, econf).unwrap();
    // Idle engine: the switch completes through empty steps.
    engine.reconfigure(Topology::new(8, 1)).unwrap();
    engine.run_to_completion().unwrap();
    assert_eq!(engine.topology_name(), "tp8pp1");
    // Requested right before the prefill step of all five prompts.
    let ids = add_all(&mut engine, &cases);
    engine.reconfigure(Topology::new(2, 3)).unwrap();
    engine.run_to_completion().unwrap();
    assert_eq!(engine.topology_name(), "tp2pp3");
    assert_oracle_tokens(&engine, &cases, &ids);
}

#[test]
fn failed_transfer_aborts_and_keeps_serving() {
    let (cases, mut engine, ids) = tp2pp2_serving_oracle();
    for _ in 0..4 {
        engine.step().unwrap();
    }
    let opts = ReconfigOptions {
        window: 1,
        fail_at: Some((Segment::Layer(LayerId(4)), WorkerId(2))),
        lookahead: 0,
        ..Default::default()
    };
    engine.reconfigure_with(Topology::new(4, 1), &opts).unwrap();
    engine.run_to_completion().unwrap();
    let evs = engine.reconfig_events().to_vec();
    assert!(
        evs.iter().any(
            |e| matches!(e, ReconfigEvent::Aborted { error, .. } if error.contains("injected"))
        ),
        "{evs:?}"
    );
    // Some layers moved, layer 4 did not: a valid mixed placement, still serving.
    let p = engine.placement();
    assert_eq!(p.layers[4].len(), 2);
    assert_oracle_tokens(&engine, &cases, &ids);
    // And a later switch completes from there.
    engine.reconfigure(Topology::new(4, 1)).unwrap();
    while engine.reconfig_in_progress() {
        engine.step().unwrap();
    }
    assert_eq!(engine.topology_name(), "tp4pp1");
}

/// A switch started right after an abort (same step): a peer's piece of the new job
/// that reaches a worker before it discards the aborted one is not lost with the
/// aborted job's leftovers. Both a stop-the-world switch (exactly the planned bytes) and
/// an online one complete, and the requests keep the oracle's tokens.
#[test]
fn switch_started_right_after_an_abort_completes() {
    let (cases, mut engine, ids) = tp2pp2_serving_oracle();
    for _ in 0..4 {
        engine.step().unwrap();
    }
    let tp4 = Topology::new(4, 1);
    let late = abort_at_once(&mut engine, tp4);
    let (_, plan) = engine.plan_reconfigure(tp4).unwrap();
    assert!(
        plan.segments
            .iter()
            .flat_map(|s| &s.transfers)
            .any(|t| t.dst == late && t.src != late),
        "the late worker receives pieces of the new switch"
    );
    let reshard0 = engine.comm_stats().reshard_bytes();
    engine.reconfigure_stop_the_world(tp4).unwrap();
    assert_late_discards_saw_the_next_switch(&engine, 1);
    assert_eq!(engine.topology_name(), "tp4pp1");
    assert_eq!(
        engine.comm_stats().reshard_bytes() - reshard0,
        plan.bytes_moved
    );
    for _ in 0..3 {
        engine.step().unwrap();
    }

    // Online this time: the new switch's first segments (layers 2 and 3) also send the
    // late worker pieces.
    let tp2pp2 = Topology::new(2, 2);
    let late = abort_at_once(&mut engine, tp2pp2);
    let (_, plan) = engine.plan_reconfigure(tp2pp2).unwrap();
    assert_eq!(remote_piece(&plan, Segment::Layer(LayerId(2))).1, late);
    engine.reconfigure(tp2pp2).unwrap();
    engine.run_to_completion().unwrap();
    assert_late_discards_saw_the_next_switch(&engine, 2);
    assert_eq!(engine.topology_name(), "tp2pp2");
    assert_oracle_tokens(&engine, &cases, &ids);
    let evs = engine.reconfig_events().to_vec();
    let outcomes: Vec<_> = evs
        .iter()
        .filter_map(|e| match e {
            ReconfigEvent::Finished { bytes_moved, .. } => Some(Ok(*bytes_moved)),
            ReconfigEvent::Aborted { error, .. } => Some(Err(error.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(outcomes.len(), 4, "{outcomes:?}");
    for (i, o) in outcomes.iter().enumerate() {
        match o {
            Err(e) => assert!(i % 2 == 0 && e.contains("injected"), "{outcomes:?}"),
            Ok(moved) => assert!(i % 2 == 1 && *moved > 0, "{outcomes:?}"),
        }
    }
}

/// A worker that fails at a flip keeps its old shard while the placement moves on:
/// the step fails, and the engine says it cannot serve (every later step at once, with
/// the reason) rather than failing each step on a shard check; `restart` recovers it.
#[test]
fn failed_flip_is_reported_and_restart_recovers() {
    let model = tiny_model();
    let cases = oracle();
    let mut econf = EngineConfig::new(Topology::new(2, 2));
    econf.workers = Some(4);
    // The failed worker's peers wait this long for its all-reduce part.
    econf.comm_timeout = std::time::Duration::from_secs(5);
    let mut engine = Engine::new(&model, econf).unwrap();
    let ids = add_all(&mut engine, &cases);
    for _ in 0..3 {
        engine.step().unwrap();
    }
    let tp4 = Topology::new(4, 1);
    let (_, plan) = engine.plan_reconfigure(tp4).unwrap();
    let layer0 = Segment::Layer(LayerId(0));
    let (_, joining) = remote_piece(&plan, layer0);
    let opts = ReconfigOptions {
        fail_flip_at: Some((layer0, joining)),
        ..Default::default()
    };
    engine.reconfigure_with(tp4, &opts).unwrap();
    let err = loop {
        match engine.step() {
            Ok(_) => assert!(engine.reconfig_in_progress(), "layer 0 never flipped"),
            Err(e) => break e.to_string(),
        }
    };
    assert!(
        err.contains("injected failure at the flip") && err.contains("Engine::restart"),
        "{err}"
    );
    assert!(
        err.contains(&format!("{joining} holds nothing of {layer0}")),
        "{err}"
    );
    // Refused at once, with the same reason; so is a new switch.
    assert_eq!(engine.step().unwrap_err().to_string(), err);
    assert!(engine.reconfigure(Topology::new(2, 2)).is_err());
    engine.restart(tp4).unwrap();
    engine.run_to_completion().unwrap();
    assert_eq!(engine.topology_name(), "tp4pp1");
    assert_oracle_tokens(&engine, &cases, &ids);
}

#[test]
fn stop_the_world_and_restart_baselines_keep_tokens() {
    let (cases, mut engine, ids) = tp2pp2_serving_oracle();
    for _ in 0..6 {
        engine.step().unwrap();
    }
    engine
        .reconfigure_stop_the_world(Topology::new(4, 1))
        .unwrap();
    assert_eq!(engine.topology_name(), "tp4pp1");
    for _ in 0..6 {
        engine.step().unwrap();
    }
    engine.restart(Topology::new(1, 2)).unwrap();
    assert_eq!(engine.topology_name(), "tp1pp2");
    engine.run_to_completion().unwrap();
    assert_oracle_tokens(&engine, &cases, &ids);
}

/// The decider of an online switch's flips runs one step late (the lead of stage 0, whose
/// members decide every layer of the step): the others give up on the step and settle
/// its undecided segments as "no flip", so the late decider cannot flip a layer they
/// never flipped. The step fails, the engine keeps serving (not broken), the switch
/// completes in later steps, and every request keeps the oracle's tokens.
#[test]
fn a_late_decider_during_a_switch_fails_one_step_and_the_switch_completes() {
    use remp::runtime::worker::StepDelay;
    use std::time::{Duration, Instant};
    let model = tiny_model();
    let cases = oracle();
    let timeout = Duration::from_millis(1500);
    let mut econf = EngineConfig::new(Topology::new(2, 2));
    econf.workers = Some(4);
    econf.comm_timeout = timeout;
    econf.step_delay = Some(StepDelay {
        step: 3,
        worker: WorkerId(0),
        delay: 2 * timeout,
        before_sync: false,
    });
    let mut engine = Engine::new(&model, econf).unwrap();
    let ids = add_all(&mut engine, &cases);
    for _ in 0..3 {
        engine.step().unwrap();
    }
    // Every segment at once, copied before the late step starts: that step would flip
    // them all.
    let opts = ReconfigOptions {
        window: 100,
        lookahead: 100,
        ..Default::default()
    };
    engine.reconfigure_with(Topology::new(4, 1), &opts).unwrap();
    let segments = 6 + 2;
    let t0 = Instant::now();
    while engine
        .reconfig_events()
        .iter()
        .filter(|e| matches!(e, ReconfigEvent::SegmentReady { .. }))
        .count()
        < segments
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "copies did not finish"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let err = engine.step().unwrap_err().to_string();
    assert!(err.contains("within") || err.contains("waited"), "{err}");
    assert!(engine.broken_reason().is_none(), "{err}");
    engine.run_to_completion().unwrap();
    assert_eq!(engine.topology_name(), "tp4pp1");
    assert_oracle_tokens(&engine, &cases, &ids);
}

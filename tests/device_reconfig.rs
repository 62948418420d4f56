//! Online reconfiguration on device workers (the GPU kernel path; each test runs on the
//! emulated GPU and, ignored without one, on CUDA GPU 0): weights and KV move between
//! bf16 device buffers through the reshard kernels and the counted copy lane while
//! requests keep decoding, and the tokens stay those of the transformers oracle. In the
//! same-device exchange (the default) pieces travel as bf16 device buffers, 2 bytes per
//! element; in the host-staged one as f32 host floats, 4 bytes: either way exactly the
//! bytes the plan counts.
//!
//! On remp-tiny the device path's first 16 greedy tokens of oracle prompt 0 equal the
//! oracle's on every topology tried (bf16 activations; see `device_engine.rs` for the
//! tolerance argument), so tokens are compared exactly. The emulator takes about half a
//! second per step here: the tests keep to a few dozen steps.

#[macro_use]
mod common;

use common::*;
use remp::backend::comm::Lane;
use remp::backend::device::Exchange;
use remp::parallel::Topology;
use remp::reshard::executor::ReconfigEvent;
use remp::runtime::{DeviceKind, Engine, EngineConfig, Request, RequestId};

fn engine(dev: DeviceKind, exchange: Exchange, start: Topology, workers: usize) -> Engine {
    let mut ec = EngineConfig::new(start);
    ec.device = dev;
    ec.exchange = exchange;
    ec.kv_blocks = 64;
    ec.workers = Some(workers);
    Engine::new(&tiny_model(), ec).unwrap()
}

fn request(c: &OracleCase, n: usize) -> Request {
    let mut r = Request::greedy(c.prompt.clone(), n);
    r.ignore_eos = true;
    r
}

fn assert_oracle(engine: &Engine, id: RequestId, c: &OracleCase, n: usize, what: &str) {
    let out = &engine.output(id).unwrap().output;
    assert_eq!(out.len(), n, "{what}");
    assert_eq!(
        out[..],
        c.tokens[c.prompt.len()..c.prompt.len() + n],
        "{what}"
    );
}

/// The meter (allocations and frees of shards and KV on every worker) agrees with what
/// the workers hold once nothing is staged (an aborted switch's copy threads release
/// theirs in the background: wait for that, boundedly).
fn assert_meter_matches_memory(engine: &Engine) {
    let t0 = std::time::Instant::now();
    while !engine.reconfig_settled() {
        assert!(t0.elapsed().as_secs() < 60, "copy threads did not settle");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let held: usize = engine.worker_bytes().iter().sum();
    assert_eq!(engine.resident_bytes(), held as i64);
}

/// Two workers on tp2pp1 two steps into decoding `c`'s prompt for `n` tokens (the
/// set-up of the abort tests).
fn decoding_prompt0(dev: DeviceKind, c: &OracleCase, n: usize) -> (Engine, RequestId) {
    let mut e = engine(dev, Exchange::SameDevice, Topology::new(2, 1), 2);
    let a = e.add_request(request(c, n)).unwrap();
    for _ in 0..2 {
        e.step().unwrap();
    }
    (e, a)
}

fn finished(engine: &mut Engine) -> Vec<(u64, u64)> {
    engine
        .reconfig_events()
        .iter()
        .filter_map(|e| match e {
            ReconfigEvent::Finished {
                bytes_moved,
                peak_extra_bytes,
                ..
            } => Some((*bytes_moved, *peak_extra_bytes)),
            ReconfigEvent::Aborted { error, .. } => panic!("switch aborted: {error}"),
            _ => None,
        })
        .collect()
}

on_devices! {
/// tp2pp1 → tp1pp2 → tp4pp1 while oracle prompt 0 decodes (the first switch two steps
/// in) and prompt 1 joins in the middle of the first switch: KV pre-copy, the delta at
/// each flip, head re-slicing (2 → 4 → 1 KV heads per rank) and pipeline hand-offs
/// across a mixed placement all happen on the device path. Then an online switch of
/// the idle engine back to tp2pp1 moves exactly its planned bytes.
fn online_switches_keep_oracle_tokens(dev) {
    let cases = oracle();
    let mut e = engine(dev, Exchange::SameDevice, Topology::new(2, 1), 4);
    assert_eq!(e.reshard_elem_bytes(), 2, "bf16 device buffers on the wire");
    let (n0, n1) = (16, 8);
    let a = e.add_request(request(&cases[0], n0)).unwrap();
    for _ in 0..2 {
        e.step().unwrap();
    }
    e.reconfigure(Topology::new(1, 2)).unwrap();
    assert!(e.reconfig_in_progress());
    // Prefilled in the switch's first step: the segments that flip in the next one
    // receive its whole prompt's KV as their flip delta.
    let b = e.add_request(request(&cases[1], n1)).unwrap();
    while e.reconfig_in_progress() {
        e.step().unwrap();
    }
    assert_eq!(e.topology_name(), "tp1pp2");
    assert_meter_matches_memory(&e);
    e.step().unwrap();
    e.reconfigure(Topology::new(4, 1)).unwrap();
    e.run_to_completion().unwrap();
    assert_eq!(e.topology_name(), "tp4pp1");
    assert_oracle(&e, a, &cases[0], n0, "prompt 0");
    assert_oracle(&e, b, &cases[1], n1, "prompt 1");
    assert_meter_matches_memory(&e);
    let done = finished(&mut e);
    assert_eq!(done.len(), 2);
    for (moved, peak) in &done {
        assert!(*moved > 0 && *peak > 0, "{done:?}");
    }

    // Idle: no KV to move, weights only; every byte on the copy lane, as planned.
    let (_, plan) = e.plan_reconfigure(Topology::new(2, 1)).unwrap();
    let (reshard0, copy0) = (
        e.comm_stats().reshard_bytes(),
        e.comm_stats().total(Lane::Copy),
    );
    e.reconfigure(Topology::new(2, 1)).unwrap();
    e.run_to_completion().unwrap();
    assert_eq!(e.topology_name(), "tp2pp1");
    assert!(plan.bytes_moved > 0);
    assert_eq!(e.comm_stats().reshard_bytes() - reshard0, plan.bytes_moved);
    assert_eq!(e.comm_stats().total(Lane::Copy) - copy0, plan.bytes_moved);
    assert_eq!(finished(&mut e)[2].0, plan.bytes_moved);
    assert_meter_matches_memory(&e);
}
}

/// The stop-the-world baseline on the same executor, tp4pp1 → tp2pp1 with a request
/// mid-decode (each new rank's 2 KV heads come from two old ranks): the switch moves
/// exactly its planned bytes — weights and the KV of every cached position, all on the
/// copy lane, `elem_bytes` per element — and decoding continues with the oracle's tokens.
fn stop_the_world_case(dev: DeviceKind, exchange: Exchange, elem_bytes: u64) {
    let cases = oracle();
    let mut e = engine(dev, exchange, Topology::new(4, 1), 4);
    assert_eq!(e.reshard_elem_bytes(), elem_bytes);
    let n = 8;
    let a = e.add_request(request(&cases[0], n)).unwrap();
    for _ in 0..3 {
        e.step().unwrap();
    }
    let (_, plan) = e.plan_reconfigure(Topology::new(2, 1)).unwrap();
    let kv_planned: u64 = plan
        .segments
        .iter()
        .flat_map(|s| &s.transfers)
        .filter(|t| t.src != t.dst && matches!(t.item, remp::reshard::planner::Item::Kv(_)))
        .map(|t| t.bytes)
        .sum();
    assert!(kv_planned > 0, "no KV in the plan");
    // Every weight piece counts its elements at the wire's element size.
    for t in plan.segments.iter().flat_map(|s| &s.transfers) {
        if matches!(t.item, remp::reshard::planner::Item::Weight(_)) {
            assert_eq!(t.bytes, t.region.len() as u64 * elem_bytes);
        }
    }
    let (reshard0, copy0) = (
        e.comm_stats().reshard_bytes(),
        e.comm_stats().total(Lane::Copy),
    );
    e.reconfigure_stop_the_world(Topology::new(2, 1)).unwrap();
    assert_eq!(e.topology_name(), "tp2pp1");
    assert!(!e.reconfig_in_progress());
    assert_eq!(e.comm_stats().reshard_bytes() - reshard0, plan.bytes_moved);
    assert_eq!(e.comm_stats().total(Lane::Copy) - copy0, plan.bytes_moved);
    assert_meter_matches_memory(&e);
    e.run_to_completion().unwrap();
    assert_oracle(&e, a, &cases[0], n, "prompt 0");
    let done = finished(&mut e);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].0, plan.bytes_moved);
}

on_devices! {
/// [`stop_the_world_case`] with pieces as bf16 device buffers (same-device exchange).
fn stop_the_world_moves_exactly_the_planned_bytes(dev) {
    stop_the_world_case(dev, Exchange::SameDevice, 2);
}
}

on_devices! {
/// [`stop_the_world_case`] with pieces staged through host memory as f32.
fn host_staged_stop_the_world_moves_exactly_the_planned_bytes(dev) {
    stop_the_world_case(dev, Exchange::HostStaged, 4);
}
}

on_devices! {
/// A copy that fails on a device worker aborts the switch: staged device buffers are
/// dropped (the meter is back to what the workers hold), the flipped layers stay, and
/// the engine keeps decoding the oracle's tokens on the mixed placement.
fn failed_device_copy_aborts_and_keeps_serving(dev) {
    use remp::parallel::{LayerId, Segment, WorkerId};
    use remp::reshard::executor::ReconfigOptions;
    let cases = oracle();
    let n = 6;
    let (mut e, a) = decoding_prompt0(dev, &cases[0], n);
    let opts = ReconfigOptions {
        window: 1,
        fail_at: Some((Segment::Layer(LayerId(3)), WorkerId(1))),
        lookahead: 0,
        ..Default::default()
    };
    e.reconfigure_with(Topology::new(1, 2), &opts).unwrap();
    e.run_to_completion().unwrap();
    let evs = e.reconfig_events().to_vec();
    assert!(
        evs.iter().any(
            |ev| matches!(ev, ReconfigEvent::Aborted { error, .. } if error.contains("injected"))
        ),
        "{evs:?}"
    );
    assert_eq!(
        e.placement().layers[3].len(),
        2,
        "layer 3 must not have moved"
    );
    assert_meter_matches_memory(&e);
    assert_oracle(&e, a, &cases[0], n, "prompt 0");
}
}

on_devices! {
/// A switch started right after an abort, in the same step: the worker that receives
/// layer-0 pieces discards the aborted job only after its peer, done discarding, sent
/// it a piece of the new switch (test hook). That piece is kept and the aborted job's
/// leftover device buffers are uncounted: the new (stop-the-world) switch moves exactly
/// its planned bytes, the meter matches what the workers hold, and decoding goes on
/// with the oracle's tokens.
fn switch_started_right_after_an_abort_completes(dev) {
    let cases = oracle();
    let n = 6;
    let (mut e, a) = decoding_prompt0(dev, &cases[0], n);
    let target = Topology::new(1, 2);
    abort_at_once(&mut e, target);
    let (_, plan) = e.plan_reconfigure(target).unwrap();
    let reshard0 = e.comm_stats().reshard_bytes();
    e.reconfigure_stop_the_world(target).unwrap();
    assert_late_discards_saw_the_next_switch(&e, 1);
    assert_eq!(e.topology_name(), "tp1pp2");
    assert_eq!(e.comm_stats().reshard_bytes() - reshard0, plan.bytes_moved);
    assert_meter_matches_memory(&e);
    e.run_to_completion().unwrap();
    assert_oracle(&e, a, &cases[0], n, "prompt 0");
    assert_meter_matches_memory(&e);
    // (`finished` panics on the abort: look at the new switch's events only.)
    let evs = e.reconfig_events().to_vec();
    let last = evs
        .iter()
        .rposition(|ev| matches!(ev, ReconfigEvent::Aborted { .. }))
        .unwrap();
    let moved: Vec<u64> = evs[last..]
        .iter()
        .filter_map(|ev| match ev {
            ReconfigEvent::Finished { bytes_moved, .. } => Some(*bytes_moved),
            _ => None,
        })
        .collect();
    assert_eq!(moved, vec![plan.bytes_moved]);
}
}

on_devices! {
/// A switch of a freshly loaded engine, before its first step (stop-the-world, so no
/// step synchronizes the workers' streams meanwhile): the copy threads reshard from
/// the shards the workers just uploaded — uploads are queued on the workers' streams,
/// and the load's synchronize is what makes them visible to the copy streams — then a
/// request decodes the oracle's tokens on the new placement.
fn switch_before_the_first_step_reads_the_loaded_shards(dev) {
    let cases = oracle();
    let mut e = engine(dev, Exchange::SameDevice, Topology::new(2, 1), 2);
    e.reconfigure_stop_the_world(Topology::new(1, 2)).unwrap();
    assert_eq!(finished(&mut e).len(), 1);
    let n = 4;
    let a = e.add_request(request(&cases[0], n)).unwrap();
    e.run_to_completion().unwrap();
    assert_oracle(&e, a, &cases[0], n, "prompt 0 after the switch");
}
}

on_devices! {
/// An online switch tp2pp1 → tp1pp2 with graphs on: the flips swap shards and KV
/// between segments (whose runs are issued by then), and the runs of the new placement
/// (other shards, the pipeline hand-off) are new runs; tokens stay the oracle's and
/// runs were built and replayed before and after the switch.
fn online_switch_with_graphs_keeps_oracle_tokens(dev) {
    let c = &oracle()[0];
    let mut ec = EngineConfig::new(Topology::new(2, 1));
    ec.device = dev;
    ec.kv_blocks = 64;
    ec.workers = Some(2);
    ec.graphs = true;
    let mut e = Engine::new(&tiny_model(), ec).unwrap();
    let n = 14;
    let a = e.add_request(request(c, n)).unwrap();
    for _ in 0..4 {
        e.step().unwrap();
    }
    let before = e.graph_counts();
    assert!(before.graph_runs > 0, "{before:?}");
    e.reconfigure(Topology::new(1, 2)).unwrap();
    e.run_to_completion().unwrap();
    assert_eq!(e.topology_name(), "tp1pp2");
    assert_oracle(&e, a, c, n, "prompt 0 with graphs");
    assert_eq!(finished(&mut e).len(), 1);
    let after = e.graph_counts();
    assert!(after.built > before.built, "{before:?} → {after:?}");
    assert!(after.graph_runs > before.graph_runs, "{before:?} → {after:?}");
    assert_meter_matches_memory(&e);
}
}

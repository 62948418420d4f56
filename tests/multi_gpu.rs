//! Workers on GPUs of their own (`EngineConfig::gpus`): tensor-parallel partials and
//! pipeline hand-offs go through communicators (NCCL on CUDA; here its emulated twin,
//! which enforces NCCL's matching and blocking rules, so an exchange that would hang on
//! GPUs fails here), and so do reshard pieces (one group per job on the copy threads'
//! communicator) and a flip's KV delta.
//!
//! Each test body runs on the emulator (`…::emu`, in CI) and on CUDA (`…::cuda`,
//! ignored: it needs a GPU per worker, or one GPU with NCCL 2.31 or later and
//! `NCCL_MULTI_RANK_GPU_ENABLE=1 REMP_CUDA_GPUS_ON_ONE=1`, which put every logical GPU
//! on GPU 0 and let NCCL run several ranks there through host memory; `tools/gpu-check`
//! runs them so).
//!
//! The collectives carry the same bytes the one-GPU (same-device) exchange hands over —
//! each member's f32 partial gathered into its slot, the slots summed in group order by
//! the same reduce kernel — so results must be bit-identical to one GPU's, and the
//! counted bytes equal.

#[macro_use]
mod common;

use common::*;
use remp::backend::comm::Lane;
use remp::backend::device::Exchange;
use remp::parallel::Topology;
use remp::reshard::executor::ReconfigEvent;
use remp::runtime::{DeviceKind, Engine, EngineConfig, Request};

/// Why the `::cuda` twins are ignored.
macro_rules! on_emu_and_gpus {
    ($($t:tt)*) => {
        on_devices! {
            ignore = "needs a GPU per worker, or one GPU with NCCL >= 2.31 and \
                      NCCL_MULTI_RANK_GPU_ENABLE=1 REMP_CUDA_GPUS_ON_ONE=1";
            $($t)*
        }
    };
}

fn config(
    dev: DeviceKind,
    start: Topology,
    workers: usize,
    gpus: usize,
    exchange: Exchange,
) -> EngineConfig {
    let mut ec = EngineConfig::new(start);
    ec.device = dev;
    ec.exchange = exchange;
    ec.kv_blocks = 64;
    ec.workers = Some(workers);
    ec.gpus = gpus;
    ec
}

/// Bytes between workers on the compute lane (partials and hand-offs; not the logits
/// or picks that go to the driver).
fn worker_compute_bytes(e: &Engine) -> u64 {
    let n = e.num_workers();
    let s = e.comm_stats();
    (0..n)
        .flat_map(|a| (0..n).map(move |b| (a, b)))
        .map(|(a, b)| s.between(Lane::Compute, a, b))
        .sum()
}

on_emu_and_gpus! {
fn one_worker_per_gpu_equals_one_gpu_bit_for_bit(dev) {
    let model = tiny_model();
    let case = &oracle()[0];
    let n = 6;
    for (tp, pp) in [(2, 2), (4, 1), (1, 2)] {
        let topo = Topology::new(tp, pp);
        let run = |gpus: usize| {
            let ec = config(dev, topo, topo.world_size(), gpus, Exchange::SameDevice);
            let mut e = Engine::new(&model, ec).unwrap();
            let mut req = Request::greedy(case.prompt.clone(), n);
            req.ignore_eos = true;
            req.return_logits = true;
            let (id, logits) = run_with_logits(&mut e, req);
            let out = e.output(id).unwrap().output.clone();
            let bytes = worker_compute_bytes(&e);
            (logits, out, bytes, e.comm_stats().collective_bytes())
        };
        let (one, one_out, one_bytes, one_coll) = run(1);
        let (many, many_out, many_bytes, many_coll) = run(topo.world_size());
        assert!(!one.is_empty());
        assert!(
            one.len() == many.len()
                && one
                    .iter()
                    .zip(&many)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{topo}: logits differ between one GPU and a GPU per worker"
        );
        assert_eq!(one_out, many_out, "{topo}");
        assert_eq!(
            many_out[..],
            case.tokens[case.prompt.len()..case.prompt.len() + n],
            "{topo}: oracle tokens"
        );
        // The same bytes, counted the same way; on one GPU none through collectives, on
        // a GPU per worker all of them.
        assert!(one_bytes > 0, "{topo}");
        assert_eq!(one_bytes, many_bytes, "{topo}");
        assert_eq!(one_coll, 0, "{topo}");
        assert_eq!(
            many_coll, many_bytes,
            "{topo}: every worker-to-worker byte through a collective"
        );
    }
}

}

on_emu_and_gpus! {
/// tp2pp1 → tp4pp1 → tp1pp2 on four GPUs while oracle prompt 0 decodes and
/// prompt 1 joins during the first switch: the new groups' communicators are split
/// before their layers flip, and the tokens stay the oracle's. Then an idle switch
/// moves exactly its planned bytes, bf16, every one through a collective.
fn online_switches_across_gpus_keep_oracle_tokens(dev) {
    let cases = oracle();
    let ec = config(dev, Topology::new(2, 1), 4, 4, Exchange::SameDevice);
    let mut e = Engine::new(&tiny_model(), ec).unwrap();
    assert_eq!(e.reshard_elem_bytes(), 2, "bf16 pieces through NCCL");
    let req = |c: &OracleCase, n: usize| {
        let mut r = Request::greedy(c.prompt.clone(), n);
        r.ignore_eos = true;
        r
    };
    let (n0, n1) = (14, 8);
    let a = e.add_request(req(&cases[0], n0)).unwrap();
    for _ in 0..2 {
        e.step().unwrap();
    }
    e.reconfigure(Topology::new(4, 1)).unwrap();
    let b = e.add_request(req(&cases[1], n1)).unwrap();
    while e.reconfig_in_progress() {
        e.step().unwrap();
    }
    assert_eq!(e.topology_name(), "tp4pp1");
    e.step().unwrap();
    e.reconfigure(Topology::new(1, 2)).unwrap();
    e.run_to_completion().unwrap();
    assert_eq!(e.topology_name(), "tp1pp2");
    for (id, c, n, what) in [
        (a, &cases[0], n0, "prompt 0"),
        (b, &cases[1], n1, "prompt 1"),
    ] {
        let out = &e.output(id).unwrap().output;
        assert_eq!(
            out[..],
            c.tokens[c.prompt.len()..c.prompt.len() + n],
            "{what}"
        );
    }
    assert!(e.comm_stats().collective_bytes() > 0);

    let (_, plan) = e.plan_reconfigure(Topology::new(2, 2)).unwrap();
    let before = e.comm_stats().reshard_bytes();
    let coll_before = e.comm_stats().collective_bytes();
    e.reconfigure(Topology::new(2, 2)).unwrap();
    e.run_to_completion().unwrap();
    assert_eq!(e.topology_name(), "tp2pp2");
    // Only the two stage groups' communicators are left (the earlier placements'
    // were destroyed when their switches ended).
    assert_eq!(e.group_communicators(), 2);
    assert!(plan.bytes_moved > 0);
    assert_eq!(e.comm_stats().reshard_bytes() - before, plan.bytes_moved);
    assert_eq!(
        e.comm_stats().collective_bytes() - coll_before,
        plan.bytes_moved,
        "every reshard byte through a collective"
    );
    let aborted = e
        .reconfig_events()
        .iter()
        .filter(|ev| matches!(ev, ReconfigEvent::Aborted { .. }))
        .count();
    assert_eq!(aborted, 0);
}

}

/// tp2pp1 on two GPUs, two steps into decoding oracle prompt 0 for `n` tokens (the
/// set-up of the failure tests), with `timeout` for the communication layer.
fn decoding_prompt0(
    dev: DeviceKind,
    n: usize,
    timeout: Option<std::time::Duration>,
) -> (Engine, remp::runtime::RequestId) {
    let case = &oracle()[0];
    let mut ec = config(dev, Topology::new(2, 1), 2, 2, Exchange::SameDevice);
    if let Some(t) = timeout {
        ec.comm_timeout = t;
    }
    let mut e = Engine::new(&tiny_model(), ec).unwrap();
    let mut r = Request::greedy(case.prompt.clone(), n);
    r.ignore_eos = true;
    let a = e.add_request(r).unwrap();
    for _ in 0..2 {
        e.step().unwrap();
    }
    (e, a)
}

#[test]
fn gpu_counts_the_exchange_cannot_serve_are_refused() {
    let config = |t, w, g, x| config(DeviceKind::Emulated, t, w, g, x);
    let model = tiny_model();
    let err = |ec: EngineConfig| match Engine::new(&model, ec) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    // Four workers on two GPUs: NCCL takes one rank per GPU.
    let msg = err(config(Topology::new(2, 2), 4, 2, Exchange::SameDevice));
    assert!(msg.contains("4 workers on 2 GPUs"), "{msg}");
    let msg = err(config(Topology::new(1, 1), 1, 0, Exchange::SameDevice));
    assert!(msg.contains("at least 1"), "{msg}");
    let mut cpu = config(Topology::new(2, 1), 2, 2, Exchange::SameDevice);
    cpu.device = DeviceKind::Cpu;
    let msg = err(cpu);
    assert!(msg.contains("cuda or emu"), "{msg}");
    // The host-staged exchange serves any number of workers per GPU.
    let ec = config(Topology::new(2, 2), 4, 2, Exchange::HostStaged);
    let mut e = Engine::new(&model, ec).unwrap();
    let case = &oracle()[0];
    let mut r = Request::greedy(case.prompt.clone(), 4);
    r.ignore_eos = true;
    let id = e.add_request(r).unwrap();
    e.run_to_completion().unwrap();
    let out = &e.output(id).unwrap().output;
    assert_eq!(
        out[..],
        case.tokens[case.prompt.len()..case.prompt.len() + 4]
    );
    assert_eq!(e.comm_stats().collective_bytes(), 0);
}

on_emu_and_gpus! {
/// A copy that fails on one worker (injected, before it prepared its pieces) aborts the
/// switch on every worker before any of them queues its pieces' collectives (the job's
/// gate: otherwise a peer's sends would wait forever for receives never queued, and
/// every later pair's sequence would be off by one). Decoding goes on with the oracle's
/// tokens, and a second switch to the same target completes.
fn a_failed_copy_across_gpus_aborts_and_the_next_switch_completes(dev) {
    use remp::parallel::{LayerId, Segment, WorkerId};
    use remp::reshard::executor::ReconfigOptions;
    let case = &oracle()[0];
    let n = 10;
    let (mut e, a) = decoding_prompt0(dev, n, None);
    let opts = ReconfigOptions {
        window: 1,
        fail_at: Some((Segment::Layer(LayerId(3)), WorkerId(1))),
        lookahead: 0,
        ..Default::default()
    };
    e.reconfigure_with(Topology::new(1, 2), &opts).unwrap();
    while e.reconfig_in_progress() {
        e.step().unwrap();
    }
    let aborted: Vec<String> = e
        .reconfig_events()
        .iter()
        .filter_map(|ev| match ev {
            ReconfigEvent::Aborted { error, .. } => Some(error.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(aborted.len(), 1, "{aborted:?}");
    assert!(aborted[0].contains("injected"), "{aborted:?}");
    assert_eq!(
        e.placement().layers[3].len(),
        2,
        "layer 3 must not have moved"
    );
    e.step().unwrap();
    e.reconfigure(Topology::new(1, 2)).unwrap();
    e.run_to_completion().unwrap();
    assert_eq!(e.topology_name(), "tp1pp2");
    let out = &e.output(a).unwrap().output;
    assert_eq!(
        out[..],
        case.tokens[case.prompt.len()..case.prompt.len() + n]
    );
    let t0 = std::time::Instant::now();
    while !e.reconfig_settled() {
        assert!(t0.elapsed().as_secs() < 60, "copy threads did not settle");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let held: usize = e.worker_bytes().iter().sum();
    assert_eq!(
        e.resident_bytes(),
        held as i64,
        "meter vs what the workers hold"
    );
}
}

on_emu_and_gpus! {
/// A worker that fails in a step (here its flip, injected) may leave a peer's stream
/// waiting on its GPU for a collective it never queued; on NCCL nothing would ever end
/// that wait, so the engine aborts every communicator at the first failed reply, says
/// why it cannot serve, and a restart (fresh communicators) serves again with the
/// oracle's tokens.
fn a_failed_step_across_gpus_aborts_the_communicators_and_restart_serves(dev) {
    use remp::parallel::{LayerId, Segment, WorkerId};
    use remp::reshard::executor::ReconfigOptions;
    let case = &oracle()[0];
    let n = 10;
    let (mut e, a) = decoding_prompt0(dev, n, Some(std::time::Duration::from_secs(20)));
    let opts = ReconfigOptions {
        window: 1,
        fail_flip_at: Some((Segment::Layer(LayerId(0)), WorkerId(1))),
        ..Default::default()
    };
    e.reconfigure_with(Topology::new(1, 2), &opts).unwrap();
    let mut failed = None;
    for _ in 0..50 {
        if let Err(err) = e.step() {
            failed = Some(err.to_string());
            break;
        }
    }
    let failed = failed.expect("the injected flip failure never failed a step");
    let why = e.broken_reason().expect("not broken").to_string();
    assert!(
        why.contains("communicators were aborted"),
        "{why} / {failed}"
    );
    assert!(e.step().is_err(), "a broken engine must refuse steps");
    e.restart(Topology::new(1, 2)).unwrap();
    e.run_to_completion().unwrap();
    let out = &e.output(a).unwrap().output;
    assert_eq!(
        out[..],
        case.tokens[case.prompt.len()..case.prompt.len() + n]
    );
}
}

on_emu_and_gpus! {
/// A copy that fails after its job's gate (injected, before it queues its pieces):
/// its peers have queued theirs, which on NCCL would wait on their GPUs forever. The
/// copy thread aborts every communicator, the switch aborts, the engine refuses work
/// saying why, and a restart serves the oracle's tokens.
fn a_copy_failing_after_its_gate_aborts_the_communicators(dev) {
    use remp::parallel::{LayerId, Segment, WorkerId};
    use remp::reshard::executor::ReconfigOptions;
    let case = &oracle()[0];
    let n = 8;
    let (mut e, a) = decoding_prompt0(dev, n, None);
    let opts = ReconfigOptions {
        window: 1,
        fail_after_gate_at: Some((Segment::Layer(LayerId(2)), WorkerId(0))),
        ..Default::default()
    };
    e.reconfigure_with(Topology::new(1, 2), &opts).unwrap();
    let t0 = std::time::Instant::now();
    let err = loop {
        assert!(t0.elapsed().as_secs() < 120, "the engine kept serving");
        match e.step() {
            Ok(_) => continue,
            Err(err) => break err.to_string(),
        }
    };
    assert!(err.contains("aborted"), "{err}");
    let why = e.broken_reason().expect("not broken").to_string();
    assert!(why.contains("injected failure after layer 2"), "{why}");
    e.restart(Topology::new(1, 2)).unwrap();
    e.run_to_completion().unwrap();
    let out = &e.output(a).unwrap().output;
    assert_eq!(out[..], case.tokens[case.prompt.len()..case.prompt.len() + n]);
}
}

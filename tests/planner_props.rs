//! Property tests of the reshard planner (`remp::reshard::planner`) on random model shapes
//! and random topology pairs of up to 8 workers:
//! - applying a plan to the old shards (filled with values that encode their global
//!   coordinates) yields exactly the new shards, every element written exactly once, and
//!   every transfer reads only what its source holds;
//! - bytes on the wire equal the lower bound (bytes of new shards not already on their
//!   worker), totals and per-worker loads are consistent;
//! - the chosen assignment keeps as many bytes in place as the best of all injective
//!   rank → worker maps (exhaustive);
//! - the examples of the issue (tp4pp2 → tp8pp1, tp2pp2 → tp4pp1 on `tiny_config`).

use remp::model::random::tiny_config;
use remp::model::ModelConfig;
use remp::parallel::{Group, Placement, Region, Segment, Topology, WorkerId};
use remp::reshard::planner::{
    choose_assignment, plan, plan_topology, segment_items, Item, ReshardPlan,
};
use remp::runtime::sampling::Rng as Splitmix;
use std::collections::HashMap;

/// The library's splitmix64 generator (`Splitmix`), with the helpers these tests use.
struct Rng(Splitmix);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn range(&mut self, lo: usize, hi_incl: usize) -> usize {
        lo + (self.next() % (hi_incl - lo + 1) as u64) as usize
    }
    fn bool(&mut self) -> bool {
        self.next() & 1 == 1
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.range(0, v.len() - 1)]
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.range(0, i);
            v.swap(i, j);
        }
    }
}

fn random_cfg(rng: &mut Rng) -> ModelConfig {
    let kv = rng.pick(&[1, 2, 3, 4, 8]);
    let ratio = rng.pick(&[1, 2, 3, 4]);
    let heads: usize = (kv * ratio).min(16);
    let kv = if heads.is_multiple_of(kv) { kv } else { 1 };
    ModelConfig {
        num_layers: rng.range(1, 7),
        num_heads: heads,
        num_kv_heads: kv,
        head_dim: rng.range(1, 3),
        hidden_size: rng.range(3, 20),
        intermediate_size: rng.range(5, 33),
        vocab_size: rng.range(8, 41),
        qkv_bias: rng.bool(),
        o_bias: rng.bool(),
        mlp_bias: rng.bool(),
        tie_word_embeddings: rng.bool(),
        ..tiny_config()
    }
}

fn valid_topologies(cfg: &ModelConfig, max_world: usize) -> Vec<Topology> {
    let mut v = Vec::new();
    for tp in 1..=max_world {
        for pp in 1..=max_world / tp {
            let t = Topology::new(tp, pp);
            if t.validate(cfg).is_ok() {
                v.push(t);
            }
        }
    }
    v
}

fn random_kv(rng: &mut Rng, cfg: &ModelConfig) -> Vec<u64> {
    if rng.range(0, 4) == 0 {
        Vec::new()
    } else {
        (0..cfg.num_layers)
            .map(|_| rng.range(0, 3000) as u64)
            .collect()
    }
}

/// `topo` played by a random injective choice of `n` workers.
fn random_placement(rng: &mut Rng, cfg: &ModelConfig, topo: Topology, n: usize) -> Placement {
    let mut ids: Vec<WorkerId> = (0..n).map(WorkerId).collect();
    rng.shuffle(&mut ids);
    Placement::from_topology(topo, cfg, &ids[..topo.world_size()]).unwrap()
}

/// A mid-switch placement: every segment's group taken from `a` or `b` at random.
fn mixed_placement(rng: &mut Rng, a: &Placement, b: &Placement) -> Placement {
    let mut p = a.clone();
    for seg in a.segments().collect::<Vec<_>>() {
        if rng.bool() {
            *p.group_mut(seg) = b.group(seg).clone();
        }
    }
    p
}

fn overlap(a: &Region, b: &Region) -> u64 {
    let r = a
        .rows
        .end
        .min(b.rows.end)
        .saturating_sub(a.rows.start.max(b.rows.start));
    let c = a
        .cols
        .end
        .min(b.cols.end)
        .saturating_sub(a.cols.start.max(b.cols.start));
    (r * c) as u64
}

fn contains(outer: &Region, inner: &Region) -> bool {
    outer.rows.start <= inner.rows.start
        && inner.rows.end <= outer.rows.end
        && outer.cols.start <= inner.cols.start
        && inner.cols.end <= outer.cols.end
}

fn old_group(p: &Placement, seg: Segment) -> &Group {
    p.group(seg)
}

/// Bytes of one weight element on the wire in these tests (f32, the CPU backend's).
const W: u64 = 4;

fn elem_bytes(item: Item, kv: &[u64]) -> u64 {
    match item {
        Item::Weight(_) => W,
        Item::Kv(l) => kv.get(l.0).copied().unwrap_or(0),
    }
}

/// The value every copy of element (row, col) of `item` must carry.
fn value(item_key: u64, row: usize, col: usize) -> u64 {
    let mut r = Rng(Splitmix::new(item_key ^ ((row as u64) << 20) ^ col as u64));
    r.next()
}

fn item_key(item: Item) -> u64 {
    format!("{item:?}")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        })
}

struct Buf {
    region: Region,
    data: Vec<u64>,
    writes: Vec<u32>,
}

impl Buf {
    fn idx(&self, row: usize, col: usize) -> usize {
        (row - self.region.rows.start) * self.region.cols.len() + (col - self.region.cols.start)
    }
}

/// Every worker's buffers under a placement; old ones filled with the encoded values.
fn buffers(cfg: &ModelConfig, p: &Placement, fill: bool) -> HashMap<(WorkerId, Item), Buf> {
    let mut m = HashMap::new();
    for seg in p.segments() {
        let g = p.group(seg);
        for item in segment_items(cfg, seg) {
            let key = item_key(item);
            for (i, &w) in g.workers().iter().enumerate() {
                let region = item.region(cfg, g.len(), i);
                let mut data = vec![0u64; region.len()];
                if fill {
                    let mut k = 0;
                    for r in region.rows.clone() {
                        for c in region.cols.clone() {
                            data[k] = value(key, r, c);
                            k += 1;
                        }
                    }
                }
                let writes = vec![0u32; region.len()];
                assert!(m
                    .insert(
                        (w, item),
                        Buf {
                            region,
                            data,
                            writes
                        }
                    )
                    .is_none());
            }
        }
    }
    m
}

/// Bytes of `target`'s shards already on their worker under `current`.
fn kept_bytes(cfg: &ModelConfig, current: &Placement, target: &Placement, kv: &[u64]) -> u64 {
    let mut kept = 0;
    for seg in target.segments() {
        let (ng, og) = (target.group(seg), old_group(current, seg));
        for item in segment_items(cfg, seg) {
            for (i, w) in ng.workers().iter().enumerate() {
                if let Some(j) = og.position(*w) {
                    let n = item.region(cfg, ng.len(), i);
                    let o = item.region(cfg, og.len(), j);
                    kept += overlap(&n, &o) * elem_bytes(item, kv);
                }
            }
        }
    }
    kept
}

fn total_bytes(cfg: &ModelConfig, p: &Placement, kv: &[u64]) -> u64 {
    let mut t = 0;
    for seg in p.segments() {
        let g = p.group(seg);
        for item in segment_items(cfg, seg) {
            for i in 0..g.len() {
                t += item.region(cfg, g.len(), i).len() as u64 * elem_bytes(item, kv);
            }
        }
    }
    t
}

/// Applies `plan` to the old shards and checks everything it promises.
fn check_plan(cfg: &ModelConfig, cur: &Placement, tgt: &Placement, kv: &[u64], plan: &ReshardPlan) {
    let ctx = || format!("{} -> {}\n{cfg:?}\n{cur:?}\n{tgt:?}", plan.from, plan.to);
    let old = buffers(cfg, cur, true);
    let mut new = buffers(cfg, tgt, false);

    // Every segment exactly once, changed ones in execution order.
    let planned: Vec<Segment> = plan.segments.iter().map(|s| s.segment).collect();
    let mut sorted = planned.clone();
    sorted.sort();
    assert_eq!(planned, sorted, "{}", ctx());
    let mut all: Vec<Segment> = planned.iter().chain(&plan.unchanged).copied().collect();
    all.sort();
    assert_eq!(all, tgt.segments().collect::<Vec<_>>(), "{}", ctx());

    let copy = |new: &mut HashMap<(WorkerId, Item), Buf>, src: &Buf, dst_key, region: &Region| {
        let dst: &mut Buf = new.get_mut(&dst_key).expect("destination buffer");
        assert!(
            contains(&dst.region, region),
            "{region:?} outside {:?}",
            dst.region
        );
        assert!(
            contains(&src.region, region),
            "{region:?} not held by source {:?}",
            src.region
        );
        for r in region.rows.clone() {
            for c in region.cols.clone() {
                let v = src.data[src.idx(r, c)];
                let k = dst.idx(r, c);
                dst.data[k] = v;
                dst.writes[k] += 1;
            }
        }
    };

    for &seg in &plan.unchanged {
        assert_eq!(cur.group(seg), tgt.group(seg), "{}", ctx());
        for item in segment_items(cfg, seg) {
            for &w in tgt.group(seg).workers() {
                let src = &old[&(w, item)];
                let region = src.region.clone();
                copy(&mut new, src, (w, item), &region);
            }
        }
    }
    let mut moved = 0;
    let mut local = 0;
    let mut sent: HashMap<WorkerId, u64> = HashMap::new();
    let mut recv: HashMap<WorkerId, u64> = HashMap::new();
    for s in &plan.segments {
        assert_eq!(&s.old_group, cur.group(s.segment), "{}", ctx());
        assert_eq!(&s.new_group, tgt.group(s.segment), "{}", ctx());
        assert_ne!(s.old_group, s.new_group);
        let (mut sm, mut sk) = (0, 0);
        for t in &s.transfers {
            assert!(!t.region.is_empty());
            assert_eq!(
                t.bytes,
                t.region.len() as u64 * elem_bytes(t.item, kv),
                "{}",
                ctx()
            );
            assert!(
                s.old_group.contains(t.src) && s.new_group.contains(t.dst),
                "{}",
                ctx()
            );
            let src = old.get(&(t.src, t.item)).expect("source buffer");
            copy(&mut new, src, (t.dst, t.item), &t.region);
            if t.is_local() {
                sk += t.bytes;
            } else {
                sm += t.bytes;
                *sent.entry(t.src).or_default() += t.bytes;
                *recv.entry(t.dst).or_default() += t.bytes;
            }
        }
        assert_eq!((s.bytes_moved, s.bytes_kept), (sm, sk), "{}", ctx());
        moved += sm;
        local += sk;
    }
    // Every element of every new shard written exactly once, with the right value.
    for ((w, item), b) in &new {
        let key = item_key(*item);
        for r in b.region.rows.clone() {
            for c in b.region.cols.clone() {
                let k = b.idx(r, c);
                assert_eq!(
                    b.writes[k],
                    1,
                    "{w} {item:?} ({r},{c}) written {} times\n{}",
                    b.writes[k],
                    ctx()
                );
                assert_eq!(
                    b.data[k],
                    value(key, r, c),
                    "{w} {item:?} ({r},{c})\n{}",
                    ctx()
                );
            }
        }
    }
    // Wire bytes are the lower bound; totals consistent.
    let kept = kept_bytes(cfg, cur, tgt, kv);
    let total = total_bytes(cfg, tgt, kv);
    assert_eq!(plan.bytes_moved, total - kept, "lower bound\n{}", ctx());
    assert_eq!(plan.bytes_moved, moved);
    assert_eq!(plan.bytes_kept, kept);
    assert!(local <= kept);
    let mut busiest = 0;
    for (w, l) in &plan.per_worker {
        assert_eq!(l.sent, sent.get(w).copied().unwrap_or(0), "{}", ctx());
        assert_eq!(l.received, recv.get(w).copied().unwrap_or(0), "{}", ctx());
        busiest = busiest.max(l.sent + l.received);
    }
    assert_eq!(plan.busiest_worker_bytes, busiest);
    // Rendering and JSON work on everything.
    let text = plan.to_string();
    assert!(text.contains("total: moved"));
    let j = plan.to_json();
    assert_eq!(j["bytes_moved"].as_u64(), Some(plan.bytes_moved));
}

#[test]
fn applying_a_plan_yields_the_new_shards() {
    let mut rng = Rng(Splitmix::new(0x5eed_0001));
    let mut cases = 0;
    while cases < 500 {
        let cfg = random_cfg(&mut rng);
        let topos = valid_topologies(&cfg, 8);
        let (a, b) = (rng.pick(&topos), rng.pick(&topos));
        let n = a.world_size().max(b.world_size()) + rng.range(0, 2);
        let n = n.min(8).max(a.world_size().max(b.world_size()));
        let kv = random_kv(&mut rng, &cfg);
        let cur = random_placement(&mut rng, &cfg, a, n);
        // The planner's own assignment, a random one, and a mid-switch current placement.
        let (tgt, p) = plan_topology(&cfg, &cur, b, n, W, &kv).unwrap();
        check_plan(&cfg, &cur, &tgt, &kv, &p);
        assert_eq!(p.assignment.len(), b.world_size());
        let rnd = random_placement(&mut rng, &cfg, b, n);
        let p2 = plan(&cfg, &cur, &rnd, W, &kv);
        check_plan(&cfg, &cur, &rnd, &kv, &p2);
        assert!(
            p.bytes_kept >= p2.bytes_kept,
            "chosen assignment keeps less than a random one"
        );
        let mixed = mixed_placement(&mut rng, &cur, &rnd);
        check_plan(&cfg, &mixed, &tgt, &kv, &plan(&cfg, &mixed, &tgt, W, &kv));
        check_plan(&cfg, &cur, &mixed, &kv, &plan(&cfg, &cur, &mixed, W, &kv));
        // Determinism.
        assert_eq!(plan_topology(&cfg, &cur, b, n, W, &kv).unwrap().1, p);
        cases += 1;
    }
}

/// All injective maps of `k` ranks into `n` workers, calling `f` with each.
fn injective(
    k: usize,
    n: usize,
    cur: &mut Vec<usize>,
    used: &mut [bool],
    f: &mut dyn FnMut(&[usize]),
) {
    if cur.len() == k {
        f(cur);
        return;
    }
    for w in 0..n {
        if !used[w] {
            used[w] = true;
            cur.push(w);
            injective(k, n, cur, used, f);
            cur.pop();
            used[w] = false;
        }
    }
}

#[test]
fn chosen_assignment_is_optimal_exhaustively() {
    let mut rng = Rng(Splitmix::new(0x5eed_0002));
    let mut cases = 0;
    let mut big = 0;
    while cases < 40 {
        let cfg = random_cfg(&mut rng);
        let topos = valid_topologies(&cfg, 8);
        let (a, b) = (rng.pick(&topos), rng.pick(&topos));
        let need = a.world_size().max(b.world_size());
        let n = (need + rng.range(0, 3)).min(8);
        // Keep the exhaustive part bounded: at most a handful of 8!-sized cases.
        let count: usize = (0..b.world_size()).map(|i| n - i).product();
        if count > 5000 {
            if big >= 10 {
                continue;
            }
            big += 1;
        }
        let kv = random_kv(&mut rng, &cfg);
        let cur = random_placement(&mut rng, &cfg, a, n);
        let chosen = choose_assignment(&cfg, &cur, b, n, W, &kv).unwrap();
        // Valid: one distinct worker per rank, all existing.
        let mut ids: Vec<usize> = chosen.iter().map(|w| w.0).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), b.world_size());
        assert!(ids.iter().all(|&w| w < n));
        // Affinity computed independently: bytes rank r finds on worker w.
        let ranks = Placement::static_topology(b, &cfg).unwrap();
        let mut aff = vec![vec![0u64; n]; b.world_size()];
        for seg in ranks.segments() {
            let (ng, og) = (ranks.group(seg), cur.group(seg));
            for item in segment_items(&cfg, seg) {
                for (i, r) in ng.workers().iter().enumerate() {
                    for (j, w) in og.workers().iter().enumerate() {
                        let o = overlap(
                            &item.region(&cfg, ng.len(), i),
                            &item.region(&cfg, og.len(), j),
                        );
                        aff[r.0][w.0] += o * elem_bytes(item, &kv);
                    }
                }
            }
        }
        let mut best = 0u64;
        let mut used = vec![false; n];
        injective(b.world_size(), n, &mut Vec::new(), &mut used, &mut |m| {
            best = best.max(m.iter().enumerate().map(|(r, &w)| aff[r][w]).sum());
        });
        let got: u64 = chosen.iter().enumerate().map(|(r, w)| aff[r][w.0]).sum();
        assert_eq!(got, best, "{a} -> {b} on {n} workers: {cfg:?}");
        let tgt = Placement::from_topology(b, &cfg, &chosen).unwrap();
        let p = plan(&cfg, &cur, &tgt, W, &kv);
        assert_eq!(p.bytes_kept, best);
        cases += 1;
    }
}

fn tiny_kv() -> Vec<u64> {
    // 100 cached tokens per head: K and V, head_dim 32, f32.
    vec![100 * 2 * 32 * 4; 6]
}

/// Bytes each worker holds under a placement.
fn held(cfg: &ModelConfig, p: &Placement, kv: &[u64]) -> HashMap<WorkerId, u64> {
    let mut m = HashMap::new();
    for seg in p.segments() {
        let g = p.group(seg);
        for item in segment_items(cfg, seg) {
            for (i, &w) in g.workers().iter().enumerate() {
                *m.entry(w).or_default() +=
                    item.region(cfg, g.len(), i).len() as u64 * elem_bytes(item, kv);
            }
        }
    }
    m
}

#[test]
fn tp4pp2_to_tp8pp1_keeps_half_of_every_worker() {
    let cfg = tiny_config();
    let kv = tiny_kv();
    let cur = Placement::static_topology(Topology::new(4, 2), &cfg).unwrap();
    let (tgt, p) = plan_topology(&cfg, &cur, Topology::new(8, 1), 8, W, &kv).unwrap();
    check_plan(&cfg, &cur, &tgt, &kv, &p);
    let text = p.to_string();
    let summary: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with(' ') || l.contains("->"))
        .collect();
    println!("{}", summary.join("\n"));
    let order: Vec<usize> = p.assignment.iter().map(|w| w.0).collect();
    assert_eq!(order, vec![0, 4, 1, 5, 2, 6, 3, 7]);
    let before = held(&cfg, &cur, &kv);
    for w in 0..8 {
        let w = WorkerId(w);
        let kept = p.per_worker[&w].kept;
        assert!(
            2 * kept >= before[&w],
            "{w} keeps {kept} of {}\n{p}",
            before[&w]
        );
    }
    // The identity assignment keeps much less.
    let ident = Placement::static_topology(Topology::new(8, 1), &cfg).unwrap();
    let pi = plan(&cfg, &cur, &ident, W, &kv);
    assert!(pi.bytes_kept < p.bytes_kept);
    // Traffic is spread: nobody handles more than its share plus the receivers' own.
    assert!(
        p.busiest_worker_bytes * 8 <= p.bytes_moved * 2 * 3 / 2,
        "{p}"
    );
}

#[test]
fn tp2pp2_to_tp4pp1_is_sensible() {
    let cfg = tiny_config();
    let kv = tiny_kv();
    let cur = Placement::static_topology(Topology::new(2, 2), &cfg).unwrap();
    let (tgt, p) = plan_topology(&cfg, &cur, Topology::new(4, 1), 4, W, &kv).unwrap();
    check_plan(&cfg, &cur, &tgt, &kv, &p);
    println!("{p}");
    // Each new rank r holds heads/rows r/4 of every layer; old stage-s rank k holds half
    // k of its stage's layers: new ranks 0,1 fit old rank 0 or 2, ranks 2,3 old 1 or 3.
    // Identity-first tie-breaking puts r0 on w0 and r3 on w3.
    assert_eq!(
        p.assignment,
        vec![WorkerId(0), WorkerId(2), WorkerId(1), WorkerId(3)]
    );
    // Every worker keeps half of its new layer shards; every segment changes.
    assert!(p.unchanged.is_empty());
    for w in 0..4 {
        let l = p.per_worker[&WorkerId(w)];
        assert!(l.kept > 0 && l.received > 0 && l.sent > 0, "{p}");
    }
    assert!(p.bytes_kept * 10 >= p.bytes_moved * 9, "{p}");
    // And back: about half stays again (replicated norms make the two directions differ
    // slightly).
    let (back_tgt, back) = plan_topology(&cfg, &tgt, Topology::new(2, 2), 4, W, &kv).unwrap();
    check_plan(&cfg, &tgt, &back_tgt, &kv, &back);
    assert!(back.bytes_kept * 10 >= back.bytes_moved * 9, "{back}");
}

#[test]
fn growing_and_shrinking_use_the_right_workers() {
    let cfg = tiny_config();
    let cur = Placement::static_topology(Topology::new(2, 1), &cfg).unwrap();
    let (tgt, p) = plan_topology(&cfg, &cur, Topology::new(8, 1), 8, W, &[]).unwrap();
    check_plan(&cfg, &cur, &tgt, &[], &p);
    // Shrinking to one rank keeps it on a worker that held data.
    let (tgt1, p1) = plan_topology(&cfg, &tgt, Topology::new(1, 1), 8, W, &[]).unwrap();
    check_plan(&cfg, &tgt, &tgt1, &[], &p1);
    assert!(p1.bytes_kept > 0);
    // Too few workers is an error, not a panic.
    assert!(plan_topology(&cfg, &cur, Topology::new(8, 1), 4, W, &[]).is_err());
}

#[test]
fn weight_element_size_scales_the_bytes_not_the_plan() {
    // bf16 on the wire (device workers, same-device exchange): weights and KV (whose
    // per-head bytes the engine halves too) count half; the same pieces move.
    let cfg = tiny_config();
    let kv = tiny_kv();
    let half: Vec<u64> = kv.iter().map(|b| b / 2).collect();
    assert!(kv.iter().all(|b| b % 2 == 0));
    let cur = Placement::static_topology(Topology::new(2, 2), &cfg).unwrap();
    for (to, n) in [(Topology::new(4, 1), 4), (Topology::new(1, 2), 4)] {
        let (t4, p4) = plan_topology(&cfg, &cur, to, n, W, &kv).unwrap();
        let (t2, p2) = plan_topology(&cfg, &cur, to, n, 2, &half).unwrap();
        assert_eq!(t4, t2);
        assert_eq!(p2.bytes_moved * 2, p4.bytes_moved);
        assert_eq!(p2.bytes_kept * 2, p4.bytes_kept);
        let pieces = |p: &ReshardPlan| -> Vec<(Item, WorkerId, WorkerId, Region, u64)> {
            p.segments
                .iter()
                .flat_map(|s| &s.transfers)
                .map(|t| (t.item, t.src, t.dst, t.region.clone(), t.bytes))
                .collect()
        };
        let (a, b) = (pieces(&p4), pieces(&p2));
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!((x.0, x.1, x.2, &x.3), (y.0, y.1, y.2, &y.3));
            assert_eq!(x.4, y.4 * 2);
        }
    }
    // A zero element size is refused.
    assert!(plan_topology(&cfg, &cur, Topology::new(4, 1), 4, 0, &kv).is_err());
}

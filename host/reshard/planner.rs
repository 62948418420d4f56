//! The reshard planner: which worker plays which rank of the new topology, and which
//! bytes of weights and KV cache move from where to where. Pure and deterministic: the
//! same inputs always give the same plan, and nothing here touches a worker.
//!
//! # What a worker holds
//!
//! Under a [`Placement`], a worker at position `i` of a segment's group of size `g` holds,
//! for every tensor of the segment, exactly `kind.region(cfg, g, i)` (see
//! [`crate::parallel::shard`], the single source of truth for the split), and for a
//! decoder layer the KV heads `HeadShard::new(cfg, g, i).kv_heads` of its cache. Both are
//! rectangles in global coordinates; the planner only ever intersects and cuts such
//! rectangles, so it is exact for any split the shard module defines (including uneven
//! splits and KV heads replicated when `tp > kv heads`). An [`Item`] names one such
//! piece of state: a weight tensor, or a layer's KV cache whose "region" is a range of KV
//! heads (rows) times `0..1` (cols). A weight element counts `weight_elem_bytes` (what
//! it takes on the wire: 4 for the CPU's f32 and host-staged device transfers, 2 for
//! bf16 device buffers moved as they are); a KV head of layer `l` counts
//! `kv_bytes_per_head[l]` bytes (K and V of every cached token, same element size).
//! KV transfers are planned even when that is 0 (an empty cache), so the executor always
//! learns where each new member's KV heads come from; the byte counts are a snapshot.
//!
//! # Step 1: the assignment ([`choose_assignment`])
//!
//! A switch may put any worker on any new rank, and that choice decides how much data is
//! already in place. The affinity `A[rank][worker]` is the number of bytes of the new
//! rank's shards (weights and KV) that the worker already holds under the current
//! placement; the total kept in place by an assignment is the sum of the affinities of
//! its pairs, so the best assignment is a maximum-weight bipartite matching between new
//! ranks and workers. It is solved exactly with the Hungarian (Kuhn–Munkres) algorithm in
//! O(n³), `n = max(ranks, workers)`, padding with zero-affinity dummy ranks when more
//! workers are available than the target needs (the workers matched to dummies stay
//! idle). Ties are broken deterministically inside the objective itself, by integer
//! scores whose tiers each outweigh every possible sum of the tiers below: bytes kept,
//! then the number of ranks on the worker with the same number, then the lowest worker
//! ids (which workers stay idle), then workers close to their rank (Σ `n − |rank −
//! worker|`). Example: tp4pp2 → tp8pp1 on 8 workers gives `[w0,w4,w1,w5,w2,w6,w3,w7]` and
//! keeps half of every worker's data in place (new rank `r` is half of old stage-0 rank
//! `r/2`'s slice of layers 0–2, or of old stage-1 rank `4 + r/2`'s slice of layers 3–5);
//! the identity assignment keeps slices in place on only 2 of the 8 workers.
//!
//! # Step 2: the transfers ([`plan`])
//!
//! For every segment whose group changes and every member `d` of its new group, the new
//! region `N` of each item is cut along every boundary of the old members' regions that
//! falls inside it. Each resulting cell is either already held by `d` (a *local* copy,
//! `src == dst`, counted as kept in place) or held by a set of old members (one, or several
//! for replicated data: norms, biases, replicated KV heads and K/V rows). A piece on its
//! destination is never sent, so the bytes on the wire are exactly the lower bound
//! `Σ bytes of new shards not already on their worker` — no assignment of sources can do
//! better, and each byte is sent exactly once.
//!
//! Sources are then chosen to keep the busiest worker's traffic (bytes sent plus bytes
//! received) small: pieces with a single holder are forced and charged first (and every
//! receiver is charged for what it receives, whatever the source); the pieces with
//! several holders are then placed largest first (LPT order), each on the holder with the
//! least traffic so far (lowest id on ties): the classic LPT heuristic for makespan,
//! cheap and deterministic (not always optimal). Adjacent cells with the same source are
//! then merged, so each transfer is a maximal rectangle per (item, source, destination).
//!
//! Segments whose group is unchanged are listed in [`ReshardPlan::unchanged`] and have no
//! transfers: nothing to do, the buffers stay. For a changed segment, the transfers into
//! each new member tile its new regions exactly (every element written once), local
//! copies included, so an executor can build every new buffer from the transfers alone;
//! [`SegmentPlan::unchanged_members`] names the members whose shard is identical to the
//! one they already hold (same group size and index), whose buffers may simply be kept.
//!
//! Segments are listed in execution order (embedding, layers, head), the order in which
//! an online executor flips them.
//!
//! # Output
//!
//! A [`ReshardPlan`] prints (`Display`) the assignment (new rank → worker, with the rank
//! the worker played before), per changed segment one line per (source → destination)
//! pair listing the pieces on the wire plus the local bytes per worker, and the totals:
//! bytes moved, bytes kept in place, the busiest worker's traffic.
//! [`ReshardPlan::to_json`] gives every transfer. `tests/planner_props.rs` checks the
//! plans by applying them to coordinate-encoded shards, against the wire lower bound, and
//! the assignment against every injective rank → worker map.

use crate::error::{Error, Result};
use crate::model::ModelConfig;
use crate::parallel::shard::HeadShard;
use crate::parallel::{
    Group, LayerId, Placement, Rank, Region, Segment, TensorKind, Topology, WorkerId,
};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// One piece of per-segment state that a reshard moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Item {
    /// A weight tensor; its regions are those of [`TensorKind::region`].
    Weight(TensorKind),
    /// A layer's KV cache; its region is `rows = KV-head range, cols = 0..1`.
    Kv(LayerId),
}

impl Item {
    /// The region of this item held by member `index` of a group of `group_size`.
    pub fn region(self, cfg: &ModelConfig, group_size: usize, index: usize) -> Region {
        match self {
            Item::Weight(k) => k.region(cfg, group_size, index),
            Item::Kv(_) => Region::new(HeadShard::new(cfg, group_size, index).kv_heads, 0..1),
        }
    }

    /// Bytes per element of the region: `weight_elem_bytes` for weights (what one weight
    /// element takes on the wire), the bytes of one KV head for KV (0 when
    /// `kv_bytes_per_head` has no entry for the layer).
    pub fn elem_bytes(self, weight_elem_bytes: u64, kv_bytes_per_head: &[u64]) -> u64 {
        match self {
            Item::Weight(_) => weight_elem_bytes,
            Item::Kv(l) => kv_bytes_per_head.get(l.0).copied().unwrap_or(0),
        }
    }

    /// Short name for printing (`q_proj`, `kv`, `lm_head`, `q_proj.bias`, ...).
    pub fn short_name(self) -> &'static str {
        use TensorKind::*;
        match self {
            Item::Kv(_) => "kv",
            Item::Weight(k) => match k {
                Embed => "embed_tokens",
                InputNorm(_) => "input_layernorm",
                Q(_) => "q_proj",
                K(_) => "k_proj",
                V(_) => "v_proj",
                QBias(_) => "q_proj.bias",
                KBias(_) => "k_proj.bias",
                VBias(_) => "v_proj.bias",
                O(_) => "o_proj",
                OBias(_) => "o_proj.bias",
                PostNorm(_) => "post_attention_layernorm",
                Gate(_) => "gate_proj",
                Up(_) => "up_proj",
                Down(_) => "down_proj",
                GateBias(_) => "gate_proj.bias",
                UpBias(_) => "up_proj.bias",
                DownBias(_) => "down_proj.bias",
                FinalNorm => "norm",
                LmHead => "lm_head",
            },
        }
    }

    /// Compact description of a region of this item: the split axis only (`rows a..b`,
    /// `cols a..b`, `heads a..b`), or `all` for a whole replicated tensor.
    pub fn describe_region(self, region: &Region) -> String {
        use crate::parallel::ShardSpec;
        match self {
            Item::Kv(_) => format!("heads {}..{}", region.rows.start, region.rows.end),
            Item::Weight(k) => match k.spec() {
                ShardSpec::Replicated => "all".to_string(),
                ShardSpec::Rows => format!("rows {}..{}", region.rows.start, region.rows.end),
                ShardSpec::Cols => format!("cols {}..{}", region.cols.start, region.cols.end),
            },
        }
    }
}

/// The items of a segment: its weight tensors (the same list, in the same order, as the
/// workers keep) and, for a decoder layer, its KV cache last.
pub fn segment_items(cfg: &ModelConfig, seg: Segment) -> Vec<Item> {
    let tensors = match seg {
        Segment::Embed => vec![TensorKind::Embed],
        Segment::Layer(l) => TensorKind::layer_tensors(cfg, l),
        Segment::Head => vec![TensorKind::FinalNorm, TensorKind::LmHead],
    };
    let mut items: Vec<Item> = tensors.into_iter().map(Item::Weight).collect();
    if let Segment::Layer(l) = seg {
        items.push(Item::Kv(l));
    }
    items
}

/// One copy: `region` (global coordinates) of `item`, from `src`'s current buffer to
/// `dst`'s new buffer. `src == dst` is a local copy (no bytes on the wire).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    pub item: Item,
    pub src: WorkerId,
    pub dst: WorkerId,
    pub region: Region,
    pub bytes: u64,
}

impl Transfer {
    pub fn is_local(&self) -> bool {
        self.src == self.dst
    }
}

/// What happens to one segment whose group changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentPlan {
    pub segment: Segment,
    pub old_group: Group,
    pub new_group: Group,
    /// Ordered by item (segment order), then destination (new group order), then region.
    /// Together they tile every new member's regions exactly, local copies included.
    pub transfers: Vec<Transfer>,
    /// Bytes on the wire (transfers with `src != dst`).
    pub bytes_moved: u64,
    /// Bytes of local copies (already on their destination).
    pub bytes_kept: u64,
}

impl SegmentPlan {
    /// New members holding exactly the shard they already hold (same group size and
    /// index): an executor may keep their buffers instead of copying them locally.
    pub fn unchanged_members(&self) -> Vec<WorkerId> {
        let (g_new, g_old) = (self.new_group.len(), self.old_group.len());
        self.new_group
            .workers()
            .iter()
            .enumerate()
            .filter(|&(i, &w)| g_new == g_old && self.old_group.position(w) == Some(i))
            .map(|(_, &w)| w)
            .collect()
    }

    /// The transfers into one destination worker.
    pub fn transfers_to(&self, dst: WorkerId) -> impl Iterator<Item = &Transfer> + '_ {
        self.transfers.iter().filter(move |t| t.dst == dst)
    }
}

/// Traffic and kept bytes of one worker over the whole plan.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerLoad {
    pub sent: u64,
    pub received: u64,
    /// Bytes of its new shards already in place (local copies and unchanged segments).
    pub kept: u64,
}

impl WorkerLoad {
    /// Bytes through this worker's link: sent plus received.
    pub fn traffic(&self) -> u64 {
        self.sent + self.received
    }
}

/// A complete reshard plan from one placement to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReshardPlan {
    /// Description of the current and target placements (`tp2pp2`, or `mixed[...]`).
    pub from: String,
    pub to: String,
    /// New rank → worker, when the target is a static topology (else empty).
    pub assignment: Vec<WorkerId>,
    /// For each entry of `assignment`: the rank its worker played under the current
    /// placement, when that is a static topology and the worker took part.
    pub previous_ranks: Vec<Option<Rank>>,
    /// Segments whose group changes, in execution order.
    pub segments: Vec<SegmentPlan>,
    /// Segments whose group does not change: nothing to do.
    pub unchanged: Vec<Segment>,
    /// Bytes on the wire.
    pub bytes_moved: u64,
    /// Bytes of the target's shards already on their worker (unchanged segments included).
    pub bytes_kept: u64,
    /// Every worker taking part in either placement.
    pub per_worker: BTreeMap<WorkerId, WorkerLoad>,
    /// The worker with the most traffic (lowest id on ties; `None` if nothing moves).
    pub busiest_worker: Option<WorkerId>,
    /// Its bytes sent plus received.
    pub busiest_worker_bytes: u64,
}

impl ReshardPlan {
    /// Bytes of the target placement's shards: moved plus kept.
    pub fn bytes_total(&self) -> u64 {
        self.bytes_moved + self.bytes_kept
    }

    /// Number of transfers, local copies included.
    pub fn num_transfers(&self) -> usize {
        self.segments.iter().map(|s| s.transfers.len()).sum()
    }

    /// Whether the plan does nothing (the placements are equal).
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// The full plan as JSON, every transfer included.
    pub fn to_json(&self) -> Value {
        let group = |g: &Group| g.workers().iter().map(|w| w.0).collect::<Vec<_>>();
        let assignment: Vec<Value> = self
            .assignment
            .iter()
            .enumerate()
            .map(|(r, w)| {
                json!({
                    "rank": r,
                    "worker": w.0,
                    "previous_rank": self.previous_ranks.get(r).copied().flatten().map(|p| p.0),
                })
            })
            .collect();
        let segments: Vec<Value> = self
            .segments
            .iter()
            .map(|s| {
                let transfers: Vec<Value> = s
                    .transfers
                    .iter()
                    .map(|t| {
                        let (kind, layer) = match t.item {
                            Item::Weight(k) => ("weight", k.layer().map(|l| l.0)),
                            Item::Kv(l) => ("kv", Some(l.0)),
                        };
                        json!({
                            "kind": kind,
                            "item": t.item.short_name(),
                            "layer": layer,
                            "src": t.src.0,
                            "dst": t.dst.0,
                            "local": t.is_local(),
                            "rows": [t.region.rows.start, t.region.rows.end],
                            "cols": [t.region.cols.start, t.region.cols.end],
                            "bytes": t.bytes,
                        })
                    })
                    .collect();
                json!({
                    "segment": s.segment.to_string(),
                    "old_group": group(&s.old_group),
                    "new_group": group(&s.new_group),
                    "bytes_moved": s.bytes_moved,
                    "bytes_kept": s.bytes_kept,
                    "transfers": transfers,
                })
            })
            .collect();
        let per_worker: Vec<Value> = self
            .per_worker
            .iter()
            .map(|(w, l)| json!({"worker": w.0, "sent": l.sent, "received": l.received, "kept": l.kept}))
            .collect();
        json!({
            "from": self.from,
            "to": self.to,
            "assignment": assignment,
            "segments": segments,
            "unchanged": self.unchanged.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            "bytes_moved": self.bytes_moved,
            "bytes_kept": self.bytes_kept,
            "bytes_total": self.bytes_total(),
            "busiest_worker": self.busiest_worker.map(|w| w.0),
            "busiest_worker_bytes": self.busiest_worker_bytes,
            "num_transfers": self.num_transfers(),
            "per_worker": per_worker,
        })
    }
}

/// `1536` → `1.5 KiB`.
pub fn format_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut x = b as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    format!("{x:.1} {}", UNITS[u])
}

impl fmt::Display for ReshardPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "reshard {} -> {}", self.from, self.to)?;
        if !self.assignment.is_empty() {
            writeln!(f, "assignment (new rank -> worker):")?;
            for (r, w) in self.assignment.iter().enumerate() {
                match self.previous_ranks.get(r).copied().flatten() {
                    Some(p) => writeln!(f, "  r{r} -> {w} (was r{})", p.0)?,
                    None => writeln!(f, "  r{r} -> {w} (new)")?,
                }
            }
        }
        for s in &self.segments {
            writeln!(
                f,
                "{}: {} -> {}  moved {}, kept {}",
                s.segment,
                s.old_group,
                s.new_group,
                format_bytes(s.bytes_moved),
                format_bytes(s.bytes_kept)
            )?;
            // One line per (src, dst) pair on the wire, listing its pieces.
            let mut pairs: BTreeMap<(WorkerId, WorkerId), (u64, Vec<String>)> = BTreeMap::new();
            let mut local: BTreeMap<WorkerId, u64> = BTreeMap::new();
            for t in &s.transfers {
                if t.is_local() {
                    *local.entry(t.dst).or_default() += t.bytes;
                } else {
                    let e = pairs.entry((t.src, t.dst)).or_default();
                    e.0 += t.bytes;
                    e.1.push(format!(
                        "{} {}",
                        t.item.short_name(),
                        t.item.describe_region(&t.region)
                    ));
                }
            }
            for ((src, dst), (bytes, pieces)) in &pairs {
                writeln!(
                    f,
                    "  {src}→{dst} {}: {}",
                    format_bytes(*bytes),
                    pieces.join(", ")
                )?;
            }
            if !local.is_empty() {
                let kept: Vec<String> = local
                    .iter()
                    .map(|(w, b)| format!("{w} {}", format_bytes(*b)))
                    .collect();
                writeln!(f, "  local: {}", kept.join(", "))?;
            }
        }
        if !self.unchanged.is_empty() {
            let names: Vec<String> = self.unchanged.iter().map(|s| s.to_string()).collect();
            writeln!(f, "unchanged: {}", names.join(", "))?;
        }
        let total = self.bytes_total().max(1);
        writeln!(
            f,
            "total: moved {}, kept in place {} ({:.1}% of {}), {} transfers",
            format_bytes(self.bytes_moved),
            format_bytes(self.bytes_kept),
            100.0 * self.bytes_kept as f64 / total as f64,
            format_bytes(self.bytes_total()),
            self.num_transfers()
        )?;
        match self.busiest_worker {
            Some(w) => {
                let l = self.per_worker.get(&w).copied().unwrap_or_default();
                writeln!(
                    f,
                    "busiest worker: {w} {} (sent {}, received {})",
                    format_bytes(self.busiest_worker_bytes),
                    format_bytes(l.sent),
                    format_bytes(l.received)
                )
            }
            None => writeln!(f, "busiest worker: none (nothing moves)"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------

/// Checks that a placement can be planned for `cfg`: one group per layer, no empty group,
/// no worker twice in a group, every group size a valid tensor-parallel degree.
pub fn validate_placement(cfg: &ModelConfig, p: &Placement, what: &str) -> Result<()> {
    if p.layers.len() != cfg.num_layers {
        return Err(Error::Reconfig(format!(
            "{what} placement has {} layers, the model has {}",
            p.layers.len(),
            cfg.num_layers
        )));
    }
    for seg in p.segments() {
        let g = p.group(seg);
        if g.is_empty() {
            return Err(Error::Reconfig(format!(
                "{what} placement: {seg} has an empty group"
            )));
        }
        let distinct: BTreeSet<WorkerId> = g.workers().iter().copied().collect();
        if distinct.len() != g.len() {
            return Err(Error::Reconfig(format!(
                "{what} placement: {seg} has a worker twice in its group {g}"
            )));
        }
        Topology::new(g.len(), 1)
            .validate(cfg)
            .map_err(|e| Error::Reconfig(format!("{what} placement: {seg} group {g}: {e}")))?;
    }
    Ok(())
}

fn validate_kv(cfg: &ModelConfig, weight_elem_bytes: u64, kv_bytes_per_head: &[u64]) -> Result<()> {
    if weight_elem_bytes == 0 {
        return Err(Error::Reconfig("weight elements of 0 bytes".into()));
    }
    if !kv_bytes_per_head.is_empty() && kv_bytes_per_head.len() != cfg.num_layers {
        return Err(Error::Reconfig(format!(
            "kv_bytes_per_head has {} entries, expected one per layer ({}) or none",
            kv_bytes_per_head.len(),
            cfg.num_layers
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Step 1: assignment
// ---------------------------------------------------------------------------------------

fn overlap_elems(a: &Region, b: &Region) -> u64 {
    a.intersect(b).map_or(0, |r| r.len() as u64)
}

/// Bytes that member `new_idx` of a new group of `new_size` finds already held by member
/// `old_idx` of an old group of `old_size`, for one segment.
fn segment_overlap_bytes(
    cfg: &ModelConfig,
    items: &[Item],
    (new_size, new_idx): (usize, usize),
    (old_size, old_idx): (usize, usize),
    weight_elem_bytes: u64,
    kv_bytes_per_head: &[u64],
) -> u64 {
    items
        .iter()
        .map(|&it| {
            let n = it.region(cfg, new_size, new_idx);
            let o = it.region(cfg, old_size, old_idx);
            overlap_elems(&n, &o) * it.elem_bytes(weight_elem_bytes, kv_bytes_per_head)
        })
        .sum()
}

/// The most workers the planner accepts (`num_workers` of [`affinity`],
/// [`choose_assignment`], [`plan_topology`]): more is refused with [`Error::Reconfig`]
/// instead of allocating a `ranks x workers` matrix (and, for the assignment, an O(n³)
/// search) of that size. No model this crate serves has a topology of that many ranks.
pub const MAX_WORKERS: usize = 4096;

fn check_worker_count(num_workers: usize) -> Result<()> {
    if num_workers > MAX_WORKERS {
        return Err(Error::Reconfig(format!(
            "{num_workers} workers: the planner takes at most {MAX_WORKERS}"
        )));
    }
    Ok(())
}

/// The affinity matrix `A[rank][worker]`: bytes of new rank `rank`'s shards (weights and
/// KV) that `worker` already holds under `current`. `rank < target.world_size()`,
/// `worker < num_workers`. Validates like [`choose_assignment`] (at most
/// [`MAX_WORKERS`] workers).
pub fn affinity(
    cfg: &ModelConfig,
    current: &Placement,
    target: Topology,
    num_workers: usize,
    weight_elem_bytes: u64,
    kv_bytes_per_head: &[u64],
) -> Result<Vec<Vec<u64>>> {
    target.validate(cfg)?;
    check_worker_count(num_workers)?;
    let world = target.world_size();
    if world > num_workers {
        return Err(Error::Topology(format!(
            "{target} needs {world} workers, only {num_workers} available"
        )));
    }
    validate_placement(cfg, current, "current")?;
    validate_kv(cfg, weight_elem_bytes, kv_bytes_per_head)?;
    if let Some(w) = current.workers().into_iter().find(|w| w.0 >= num_workers) {
        return Err(Error::Reconfig(format!(
            "current placement uses {w}, but only {num_workers} workers exist"
        )));
    }
    // The target with worker id = rank id.
    let ranks = Placement::static_topology(target, cfg)?;
    let mut a = vec![vec![0u64; num_workers]; world];
    for seg in ranks.segments() {
        let items = segment_items(cfg, seg);
        let (ng, og) = (ranks.group(seg), current.group(seg));
        for (i, r) in ng.workers().iter().enumerate() {
            for (j, w) in og.workers().iter().enumerate() {
                a[r.0][w.0] += segment_overlap_bytes(
                    cfg,
                    &items,
                    (ng.len(), i),
                    (og.len(), j),
                    weight_elem_bytes,
                    kv_bytes_per_head,
                );
            }
        }
    }
    Ok(a)
}

/// Which worker plays each rank of `target` (index = new rank): the assignment that keeps
/// the most bytes (weights and KV) where they already are, by maximum-weight matching on
/// the [`affinity`] matrix (Hungarian algorithm, O(n³)). Deterministic; on ties it prefers
/// rank `r` on worker `r`, then lower worker ids. `weight_elem_bytes` is the bytes of one
/// weight element on the wire; `kv_bytes_per_head[l]` is the bytes of one KV head (K and
/// V) currently cached in layer `l`; pass `&[]` to ignore the KV cache.
///
/// Errors if `target` is invalid for the model, needs more than `num_workers` workers,
/// or `current` / `kv_bytes_per_head` do not fit the model or the worker count, or
/// `weight_elem_bytes` is 0, or `num_workers` exceeds [`MAX_WORKERS`].
///
/// Workers beyond `max(ranks of target, highest worker of current + 1)` are never
/// chosen (they hold nothing, are no rank's own number, and a lower idle worker always
/// wins the low-id tier), so the search runs on that many workers only: its cost follows
/// the placements, not `num_workers`.
pub fn choose_assignment(
    cfg: &ModelConfig,
    current: &Placement,
    target: Topology,
    num_workers: usize,
    weight_elem_bytes: u64,
    kv_bytes_per_head: &[u64],
) -> Result<Vec<WorkerId>> {
    check_worker_count(num_workers)?;
    let used = current
        .workers()
        .iter()
        .map(|w| w.0.saturating_add(1))
        .max()
        .unwrap_or(0);
    // Never more than `num_workers`: affinity's own checks then report what is missing.
    let n = num_workers.min(target.world_size().max(used));
    assign_among(
        cfg,
        current,
        target,
        n,
        weight_elem_bytes,
        kv_bytes_per_head,
    )
}

/// [`choose_assignment`] searching all of `num_workers` workers.
fn assign_among(
    cfg: &ModelConfig,
    current: &Placement,
    target: Topology,
    num_workers: usize,
    weight_elem_bytes: u64,
    kv_bytes_per_head: &[u64],
) -> Result<Vec<WorkerId>> {
    let a = affinity(
        cfg,
        current,
        target,
        num_workers,
        weight_elem_bytes,
        kv_bytes_per_head,
    )?;
    let world = target.world_size();
    let n = num_workers;
    // Lexicographic objective folded into one integer, each tier weighted above the
    // largest possible sum of all tiers below it: bytes kept, then ranks on the worker
    // with the same number, then low worker ids, then workers close to their rank.
    let nn = n as i128;
    let close_w = nn * nn + 1; // > Σ over an assignment of (n - |rank - worker|)
    let low_w = nn * nn * close_w + 1; // > Σ of the closeness tier
    let ident_w = nn * nn * low_w + close_w * nn * nn + 1; // > Σ of the two tiers below
    let bytes_w = nn * ident_w + ident_w;
    let mut score = vec![vec![0i128; n]; n];
    for (r, row) in score.iter_mut().enumerate().take(world) {
        for (w, s) in row.iter_mut().enumerate() {
            let (ri, wi) = (r as i128, w as i128);
            let ties = if r == w { ident_w } else { 0 }
                + (nn - 1 - wi) * low_w
                + (nn - (ri - wi).abs()) * close_w;
            *s = (a[r][w] as i128)
                .checked_mul(bytes_w)
                .and_then(|x| x.checked_add(ties))
                .filter(|x| *x < i128::MAX / (4 * nn.max(1)))
                .ok_or_else(|| {
                    Error::Reconfig(format!("assignment score overflow ({n} workers)"))
                })?;
        }
    }
    let cols = hungarian_max(&score);
    Ok(cols[..world].iter().map(|&w| WorkerId(w)).collect())
}

/// Maximum-weight perfect matching on a square matrix (rows → columns), by the
/// Hungarian algorithm with potentials (O(n³)). Returns the column of every row.
fn hungarian_max(score: &[Vec<i128>]) -> Vec<usize> {
    let n = score.len();
    if n == 0 {
        return Vec::new();
    }
    let max = score.iter().flatten().copied().max().unwrap_or(0);
    // Minimise cost = max - score (non-negative).
    let cost = |i: usize, j: usize| max - score[i][j];
    let inf = i128::MAX / 4;
    let mut u = vec![0i128; n + 1];
    let mut v = vec![0i128; n + 1];
    let mut p = vec![0usize; n + 1]; // p[j]: row (1-based) matched to column j
    let mut way = vec![0usize; n + 1];
    for i in 1..=n {
        p[0] = i;
        let mut j0 = 0usize;
        let mut minv = vec![inf; n + 1];
        let mut used = vec![false; n + 1];
        loop {
            used[j0] = true;
            let i0 = p[j0];
            let mut delta = inf;
            let mut j1 = 0usize;
            for j in 1..=n {
                if !used[j] {
                    let cur = cost(i0 - 1, j - 1) - u[i0] - v[j];
                    if cur < minv[j] {
                        minv[j] = cur;
                        way[j] = j0;
                    }
                    if minv[j] < delta {
                        delta = minv[j];
                        j1 = j;
                    }
                }
            }
            for j in 0..=n {
                if used[j] {
                    u[p[j]] += delta;
                    v[j] -= delta;
                } else {
                    minv[j] -= delta;
                }
            }
            j0 = j1;
            if p[j0] == 0 {
                break;
            }
        }
        loop {
            let j1 = way[j0];
            p[j0] = p[j1];
            j0 = j1;
            if j0 == 0 {
                break;
            }
        }
    }
    let mut ans = vec![0usize; n];
    for j in 1..=n {
        if p[j] != 0 {
            ans[p[j] - 1] = j - 1;
        }
    }
    ans
}

// ---------------------------------------------------------------------------------------
// Step 2: transfers
// ---------------------------------------------------------------------------------------

/// Where the bytes of one cell come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    /// Already on the destination.
    Local,
    /// Held by these old members (sorted, at least one).
    Holders(Vec<WorkerId>),
    /// Held by nobody (only when the current placement lacks the segment).
    Missing,
}

/// Cuts `new` along every boundary of the old holders' regions inside it and labels each
/// piece with its source; cells with the same source are merged into maximal bands.
fn decompose(new: &Region, holders: &[(WorkerId, Region)], dst: WorkerId) -> Vec<(Region, Source)> {
    let cuts = |outer: &std::ops::Range<usize>,
                inner: &mut dyn Iterator<Item = std::ops::Range<usize>>| {
        let mut v = vec![outer.start, outer.end];
        for r in inner {
            for x in [r.start, r.end] {
                if x > outer.start && x < outer.end {
                    v.push(x);
                }
            }
        }
        v.sort_unstable();
        v.dedup();
        v
    };
    let row_cuts = cuts(&new.rows, &mut holders.iter().map(|(_, r)| r.rows.clone()));
    let col_cuts = cuts(&new.cols, &mut holders.iter().map(|(_, r)| r.cols.clone()));
    // Per row band: cells merged along columns.
    type Cells = Vec<(std::ops::Range<usize>, Source)>;
    let mut bands: Vec<(std::ops::Range<usize>, Cells)> = Vec::new();
    for rw in row_cuts.windows(2) {
        let rows = rw[0]..rw[1];
        let mut cells: Cells = Vec::new();
        for cw in col_cuts.windows(2) {
            let cols = cw[0]..cw[1];
            let contains = |r: &Region| {
                r.rows.start <= rows.start
                    && rows.end <= r.rows.end
                    && r.cols.start <= cols.start
                    && cols.end <= r.cols.end
            };
            let src = if holders.iter().any(|(w, r)| *w == dst && contains(r)) {
                Source::Local
            } else {
                let mut h: Vec<WorkerId> = holders
                    .iter()
                    .filter(|(_, r)| contains(r))
                    .map(|(w, _)| *w)
                    .collect();
                h.sort_unstable();
                h.dedup();
                if h.is_empty() {
                    Source::Missing
                } else {
                    Source::Holders(h)
                }
            };
            match cells.last_mut() {
                Some((c, s)) if *s == src && c.end == cols.start => c.end = cols.end,
                _ => cells.push((cols, src)),
            }
        }
        match bands.last_mut() {
            Some((r, c)) if *c == cells && r.end == rows.start => r.end = rows.end,
            _ => bands.push((rows, cells)),
        }
    }
    bands
        .into_iter()
        .flat_map(|(rows, cells)| {
            cells
                .into_iter()
                .map(move |(cols, s)| (Region::new(rows.clone(), cols), s))
        })
        .collect()
}

/// Merges rectangles that share a full edge, until none do. Deterministic.
fn merge_regions(mut v: Vec<Region>) -> Vec<Region> {
    v.sort_by_key(|r| (r.rows.start, r.cols.start, r.rows.end, r.cols.end));
    loop {
        let mut merged = false;
        'outer: for i in 0..v.len() {
            for j in 0..v.len() {
                if i == j {
                    continue;
                }
                let (a, b) = (&v[i], &v[j]);
                let joined = if a.cols == b.cols && a.rows.end == b.rows.start {
                    Some(Region::new(a.rows.start..b.rows.end, a.cols.clone()))
                } else if a.rows == b.rows && a.cols.end == b.cols.start {
                    Some(Region::new(a.rows.clone(), a.cols.start..b.cols.end))
                } else {
                    None
                };
                if let Some(r) = joined {
                    v[i] = r;
                    v.remove(j);
                    merged = true;
                    break 'outer;
                }
            }
        }
        if !merged {
            break;
        }
    }
    v.sort_by_key(|r| (r.rows.start, r.cols.start, r.rows.end, r.cols.end));
    v
}

struct Piece {
    seg: usize,
    item_idx: usize,
    dst_pos: usize,
    dst: WorkerId,
    region: Region,
    bytes: u64,
    source: Source,
    src: Option<WorkerId>,
}

/// The rank → worker map of a static-topology placement.
fn assignment_of(p: &Placement) -> Option<(Topology, Vec<WorkerId>)> {
    let t = p.as_topology()?;
    let mut v = Vec::with_capacity(t.world_size());
    for s in 0..t.pp {
        let g = p.layers.get(t.stage_layers(p.layers.len(), s).start)?;
        v.extend_from_slice(g.workers());
    }
    Some((t, v))
}

/// The transfers that turn the shards of `current` into those of `target` (see the module
/// docs). Infallible by contract: both placements must satisfy [`validate_placement`]
/// (as placements built by [`Placement::from_topology`] do); use [`plan_checked`] or
/// [`plan_topology`] on untrusted input. `weight_elem_bytes`: bytes of one weight element
/// on the wire; `kv_bytes_per_head[l]`: bytes of one KV head (K+V) currently cached in
/// layer `l` (missing entries count 0).
pub fn plan(
    cfg: &ModelConfig,
    current: &Placement,
    target: &Placement,
    weight_elem_bytes: u64,
    kv_bytes_per_head: &[u64],
) -> ReshardPlan {
    let empty = Group(Vec::new());
    let mut per_worker: BTreeMap<WorkerId, WorkerLoad> = BTreeMap::new();
    for w in current.workers().into_iter().chain(target.workers()) {
        per_worker.entry(w).or_default();
    }
    let mut unchanged = Vec::new();
    let mut changed: Vec<(Segment, Group, Group, Vec<Item>)> = Vec::new();
    let mut pieces: Vec<Piece> = Vec::new();

    for seg in target.segments() {
        let new_group = target.group(seg).clone();
        let old_group = match seg {
            Segment::Layer(l) => current.layers.get(l.0).unwrap_or(&empty),
            _ => current.group(seg),
        }
        .clone();
        let items = segment_items(cfg, seg);
        if new_group == old_group {
            for (i, &w) in new_group.workers().iter().enumerate() {
                let b: u64 = items
                    .iter()
                    .map(|it| {
                        it.region(cfg, new_group.len(), i).len() as u64
                            * it.elem_bytes(weight_elem_bytes, kv_bytes_per_head)
                    })
                    .sum();
                per_worker.entry(w).or_default().kept += b;
            }
            unchanged.push(seg);
            continue;
        }
        let seg_idx = changed.len();
        for (item_idx, &item) in items.iter().enumerate() {
            let eb = item.elem_bytes(weight_elem_bytes, kv_bytes_per_head);
            let holders: Vec<(WorkerId, Region)> = old_group
                .workers()
                .iter()
                .enumerate()
                .map(|(j, &w)| (w, item.region(cfg, old_group.len(), j)))
                .collect();
            for (dst_pos, &dst) in new_group.workers().iter().enumerate() {
                let n = item.region(cfg, new_group.len(), dst_pos);
                for (region, source) in decompose(&n, &holders, dst) {
                    let bytes = region.len() as u64 * eb;
                    debug_assert!(
                        source != Source::Missing,
                        "{seg}: no holder of {item:?} {region:?}"
                    );
                    let src = match &source {
                        Source::Local => Some(dst),
                        Source::Holders(h) if h.len() == 1 => Some(h[0]),
                        _ => None,
                    };
                    pieces.push(Piece {
                        seg: seg_idx,
                        item_idx,
                        dst_pos,
                        dst,
                        region,
                        bytes,
                        source,
                        src,
                    });
                }
            }
        }
        changed.push((seg, old_group, new_group, items));
    }

    // Charge forced traffic and every receiver.
    for p in &pieces {
        match (&p.source, p.src) {
            (Source::Local, _) => per_worker.entry(p.dst).or_default().kept += p.bytes,
            (Source::Holders(_), Some(s)) => {
                per_worker.entry(s).or_default().sent += p.bytes;
                per_worker.entry(p.dst).or_default().received += p.bytes;
            }
            (Source::Holders(_), None) => per_worker.entry(p.dst).or_default().received += p.bytes,
            (Source::Missing, _) => {}
        }
    }
    // Replicated pieces: largest first, each on the holder with the least traffic so far.
    let mut open: Vec<usize> = (0..pieces.len())
        .filter(|&i| pieces[i].src.is_none() && matches!(pieces[i].source, Source::Holders(_)))
        .collect();
    open.sort_by_key(|&i| (std::cmp::Reverse(pieces[i].bytes), i));
    for i in open {
        let Source::Holders(h) = &pieces[i].source else {
            continue;
        };
        let best = h
            .iter()
            .copied()
            .min_by_key(|w| (per_worker.get(w).map_or(0, WorkerLoad::traffic), *w));
        if let Some(s) = best {
            per_worker.entry(s).or_default().sent += pieces[i].bytes;
            pieces[i].src = Some(s);
        }
    }

    // Group pieces into transfers: per (segment, item, dst, src), merged rectangles.
    let mut groups: BTreeMap<(usize, usize, usize, WorkerId), Vec<Region>> = BTreeMap::new();
    for p in &pieces {
        if let Some(s) = p.src {
            groups
                .entry((p.seg, p.item_idx, p.dst_pos, s))
                .or_default()
                .push(p.region.clone());
        }
    }
    let mut seg_transfers: Vec<Vec<Transfer>> = vec![Vec::new(); changed.len()];
    for ((seg, item_idx, dst_pos, src), regions) in groups {
        let (_, _, new_group, items) = &changed[seg];
        let item = items[item_idx];
        let dst = new_group.workers()[dst_pos];
        let eb = item.elem_bytes(weight_elem_bytes, kv_bytes_per_head);
        for region in merge_regions(regions) {
            let bytes = region.len() as u64 * eb;
            seg_transfers[seg].push(Transfer {
                item,
                src,
                dst,
                region,
                bytes,
            });
        }
    }
    let mut segments = Vec::with_capacity(changed.len());
    for ((segment, old_group, new_group, items), mut transfers) in
        changed.into_iter().zip(seg_transfers)
    {
        let item_pos = |it: Item| items.iter().position(|&x| x == it).unwrap_or(usize::MAX);
        transfers.sort_by_key(|t| {
            (
                item_pos(t.item),
                new_group.position(t.dst),
                t.region.rows.start,
                t.region.cols.start,
                t.src,
            )
        });
        let bytes_moved = transfers
            .iter()
            .filter(|t| !t.is_local())
            .map(|t| t.bytes)
            .sum();
        let bytes_kept = transfers
            .iter()
            .filter(|t| t.is_local())
            .map(|t| t.bytes)
            .sum();
        segments.push(SegmentPlan {
            segment,
            old_group,
            new_group,
            transfers,
            bytes_moved,
            bytes_kept,
        });
    }

    let bytes_moved = per_worker.values().map(|l| l.received).sum();
    let bytes_kept = per_worker.values().map(|l| l.kept).sum();
    let (busiest_worker, busiest_worker_bytes) = per_worker
        .iter()
        .filter(|(_, l)| l.traffic() > 0)
        .max_by_key(|(w, l)| (l.traffic(), std::cmp::Reverse(**w)))
        .map_or((None, 0), |(w, l)| (Some(*w), l.traffic()));

    let (assignment, previous_ranks) = match assignment_of(target) {
        Some((_, a)) => {
            let prev: Vec<Option<Rank>> = match current.as_topology() {
                Some(ct) => a.iter().map(|&w| current.rank_of(ct, w)).collect(),
                None => vec![None; a.len()],
            };
            (a, prev)
        }
        None => (Vec::new(), Vec::new()),
    };

    ReshardPlan {
        from: current.describe(),
        to: target.describe(),
        assignment,
        previous_ranks,
        segments,
        unchanged,
        bytes_moved,
        bytes_kept,
        per_worker,
        busiest_worker,
        busiest_worker_bytes,
    }
}

/// [`plan`] after checking both placements ([`validate_placement`]) and the KV sizes.
pub fn plan_checked(
    cfg: &ModelConfig,
    current: &Placement,
    target: &Placement,
    weight_elem_bytes: u64,
    kv_bytes_per_head: &[u64],
) -> Result<ReshardPlan> {
    validate_placement(cfg, current, "current")?;
    validate_placement(cfg, target, "target")?;
    validate_kv(cfg, weight_elem_bytes, kv_bytes_per_head)?;
    Ok(plan(
        cfg,
        current,
        target,
        weight_elem_bytes,
        kv_bytes_per_head,
    ))
}

/// Both steps: the best assignment of `target`'s ranks to `num_workers` workers, the
/// target placement it gives, and the plan to get there.
pub fn plan_topology(
    cfg: &ModelConfig,
    current: &Placement,
    target: Topology,
    num_workers: usize,
    weight_elem_bytes: u64,
    kv_bytes_per_head: &[u64],
) -> Result<(Placement, ReshardPlan)> {
    let assignment = choose_assignment(
        cfg,
        current,
        target,
        num_workers,
        weight_elem_bytes,
        kv_bytes_per_head,
    )?;
    let placement = Placement::from_topology(target, cfg, &assignment)?;
    let p = plan(
        cfg,
        current,
        &placement,
        weight_elem_bytes,
        kv_bytes_per_head,
    );
    Ok((placement, p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::random::tiny_config;

    fn lcg(s: &mut u64) -> u64 {
        *s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *s >> 33
    }

    #[test]
    fn hungarian_matches_brute_force() {
        let mut s = 7u64;
        for n in 1..=6 {
            for _ in 0..30 {
                let m: Vec<Vec<i128>> = (0..n)
                    .map(|_| (0..n).map(|_| (lcg(&mut s) % 10) as i128).collect())
                    .collect();
                let a = hungarian_max(&m);
                let got: i128 = a.iter().enumerate().map(|(i, &j)| m[i][j]).sum();
                let mut perm: Vec<usize> = (0..n).collect();
                let mut best = i128::MIN;
                permute(&mut perm, 0, &mut |p| {
                    best = best.max(p.iter().enumerate().map(|(i, &j)| m[i][j]).sum());
                });
                assert_eq!(got, best);
                let mut seen = a.clone();
                seen.sort_unstable();
                assert_eq!(seen, (0..n).collect::<Vec<_>>());
            }
        }
    }

    fn permute(v: &mut Vec<usize>, k: usize, f: &mut dyn FnMut(&[usize])) {
        if k == v.len() {
            f(v);
            return;
        }
        for i in k..v.len() {
            v.swap(k, i);
            permute(v, k + 1, f);
            v.swap(k, i);
        }
    }

    #[test]
    fn segment_items_match_worker_tensors() {
        let cfg = ModelConfig {
            qkv_bias: true,
            mlp_bias: true,
            o_bias: true,
            ..tiny_config()
        };
        let p = Placement::static_topology(Topology::new(1, 1), &cfg).unwrap();
        for seg in p.segments() {
            let w: Vec<Item> = crate::runtime::worker::segment_tensors(&cfg, seg)
                .into_iter()
                .map(Item::Weight)
                .collect();
            let mine: Vec<Item> = segment_items(&cfg, seg)
                .into_iter()
                .filter(|i| matches!(i, Item::Weight(_)))
                .collect();
            assert_eq!(w, mine);
        }
    }

    #[test]
    fn same_placement_is_empty() {
        let cfg = tiny_config();
        let p = Placement::static_topology(Topology::new(2, 2), &cfg).unwrap();
        let plan = plan(&cfg, &p, &p, 4, &[64; 6]);
        assert!(plan.is_empty());
        assert_eq!(plan.bytes_moved, 0);
        assert_eq!(plan.unchanged.len(), 8);
        assert!(plan.bytes_kept > 0);
        assert_eq!(plan.busiest_worker, None);
    }

    #[test]
    fn identity_is_preferred_on_ties() {
        let cfg = tiny_config();
        let p = Placement::static_topology(Topology::new(2, 2), &cfg).unwrap();
        let a = choose_assignment(&cfg, &p, Topology::new(2, 2), 6, 4, &[]).unwrap();
        assert_eq!(a, (0..4).map(WorkerId).collect::<Vec<_>>());
        // Nothing held anywhere useful beyond identity: extra workers stay idle.
        let a = choose_assignment(&cfg, &p, Topology::new(4, 1), 8, 4, &[]).unwrap();
        assert!(a.iter().all(|w| w.0 < 4), "{a:?}");
    }

    /// Searching only the workers the placements can use gives the assignment a search
    /// over every available worker gives; huge counts are an error, not an allocation.
    #[test]
    fn extra_workers_change_nothing_and_huge_counts_are_refused() {
        let cfg = tiny_config();
        let topos = [
            (1, 1),
            (2, 1),
            (1, 2),
            (2, 2),
            (4, 1),
            (1, 3),
            (2, 3),
            (4, 2),
        ];
        for &(ft, fp) in &topos {
            let from = Topology::new(ft, fp);
            let cur = Placement::static_topology(from, &cfg).unwrap();
            for &(tt, tp_) in &topos {
                let to = Topology::new(tt, tp_);
                let need = from.world_size().max(to.world_size());
                for extra in [0, 1, 3, 7] {
                    let n = need + extra;
                    for kv in [&[][..], &[64; 6][..]] {
                        let got = choose_assignment(&cfg, &cur, to, n, 4, kv).unwrap();
                        let full = assign_among(&cfg, &cur, to, n, 4, kv).unwrap();
                        assert_eq!(got, full, "{from} -> {to} on {n} workers");
                    }
                }
            }
        }
        // A current placement on scattered workers (5, 2, 7, 0).
        let ws = [5, 2, 7, 0].map(WorkerId);
        let cur = Placement::from_topology(Topology::new(2, 2), &cfg, &ws).unwrap();
        for &(tt, tp_) in &topos {
            let to = Topology::new(tt, tp_);
            for n in [8, 9, 12] {
                let got = choose_assignment(&cfg, &cur, to, n, 4, &[]).unwrap();
                assert_eq!(got, assign_among(&cfg, &cur, to, n, 4, &[]).unwrap());
            }
        }
        let cur = Placement::static_topology(Topology::new(2, 2), &cfg).unwrap();
        for n in [MAX_WORKERS + 1, 1_000_000, usize::MAX] {
            let t = Topology::new(4, 1);
            let e = choose_assignment(&cfg, &cur, t, n, 4, &[]).unwrap_err();
            assert!(e.to_string().contains(&format!("{n} workers")), "{e}");
            assert!(affinity(&cfg, &cur, t, n, 4, &[]).is_err());
            assert!(plan_topology(&cfg, &cur, t, n, 4, &[]).is_err());
        }
        let a = choose_assignment(&cfg, &cur, Topology::new(4, 1), MAX_WORKERS, 4, &[]);
        assert!(a.unwrap().iter().all(|w| w.0 < 4));
    }

    #[test]
    fn moving_to_other_workers_moves_everything() {
        let cfg = tiny_config();
        let t = Topology::new(1, 1);
        let cur = Placement::from_topology(t, &cfg, &[WorkerId(0)]).unwrap();
        let tgt = Placement::from_topology(t, &cfg, &[WorkerId(1)]).unwrap();
        let plan = plan(&cfg, &cur, &tgt, 4, &[]);
        assert_eq!(plan.bytes_kept, 0);
        assert_eq!(plan.busiest_worker_bytes, plan.bytes_moved);
        assert!(plan
            .segments
            .iter()
            .all(|s| s.transfers.iter().all(|t| t.src == WorkerId(0))));
        // Whole tensors move as one transfer each.
        let n_items: usize = cur.segments().map(|s| segment_items(&cfg, s).len()).sum();
        assert_eq!(plan.num_transfers(), n_items);
    }

    #[test]
    fn replicated_sources_are_balanced() {
        // tp8 (KV heads replicated twice) -> tp1 on another worker: every replicated piece
        // has two holders; the greedy must spread them.
        let cfg = tiny_config();
        let cur = Placement::static_topology(Topology::new(8, 1), &cfg).unwrap();
        let tgt = Placement::from_topology(Topology::new(1, 1), &cfg, &[WorkerId(8)]).unwrap();
        let plan = plan(&cfg, &cur, &tgt, 4, &[1000; 6]);
        let sent: Vec<u64> = (0..8).map(|w| plan.per_worker[&WorkerId(w)].sent).collect();
        let (lo, hi) = (
            sent.iter().min().copied().unwrap(),
            sent.iter().max().copied().unwrap(),
        );
        assert!(hi - lo <= hi / 4, "{sent:?}");
    }

    #[test]
    fn errors() {
        let cfg = tiny_config();
        let p = Placement::static_topology(Topology::new(2, 2), &cfg).unwrap();
        assert!(choose_assignment(&cfg, &p, Topology::new(4, 2), 4, 4, &[]).is_err());
        assert!(choose_assignment(&cfg, &p, Topology::new(3, 1), 4, 4, &[]).is_err());
        assert!(choose_assignment(&cfg, &p, Topology::new(1, 1), 3, 4, &[]).is_err());
        assert!(choose_assignment(&cfg, &p, Topology::new(1, 1), 4, 4, &[1, 2]).is_err());
        let mut bad = p.clone();
        bad.layers[1] = Group(vec![WorkerId(0), WorkerId(0)]);
        assert!(plan_checked(&cfg, &bad, &p, 4, &[]).is_err());
        assert!(plan_topology(&cfg, &p, Topology::new(4, 1), 4, 4, &[]).is_ok());
    }

    #[test]
    fn decompose_cuts_and_labels() {
        let new = Region::new(0..8, 0..4);
        let holders = vec![
            (WorkerId(0), Region::new(0..4, 0..4)),
            (WorkerId(1), Region::new(4..8, 0..4)),
            (WorkerId(2), Region::new(2..8, 0..4)),
        ];
        let d = decompose(&new, &holders, WorkerId(1));
        assert_eq!(
            d,
            vec![
                (Region::new(0..2, 0..4), Source::Holders(vec![WorkerId(0)])),
                (
                    Region::new(2..4, 0..4),
                    Source::Holders(vec![WorkerId(0), WorkerId(2)])
                ),
                (Region::new(4..8, 0..4), Source::Local),
            ]
        );
    }

    #[test]
    fn format_bytes_units() {
        assert_eq!(format_bytes(10), "10 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(3 << 20), "3.0 MiB");
    }
}

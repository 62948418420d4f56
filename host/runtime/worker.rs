//! Workers: one thread per device, each with its own memory (the shards and KV cache of
//! the segments it runs). A worker executes a step by walking the placement: for each
//! segment whose group contains it, it receives the hidden state if the previous segment
//! ran on a group it was not in, runs its shard, and all-reduces partial sums within the
//! group. All inter-worker bytes go through its [`Comm`] endpoint.
//!
//! Memory is behind locks only so that a copy thread of the *same* worker (the reshard
//! executor) can read and install buffers while the compute thread runs steps; no buffer
//! is ever shared between two workers. A device worker keeps its shards and KV in device
//! memory (`dev_shards`, `dev_kv`) and runs segments as kernel launches; its flips install
//! what its copy thread staged in device memory ([`StagedDevShards`]).

use crate::backend::collective::{trade_pieces, CommBook};
use crate::backend::comm::{Comm, Tag};
use crate::backend::cpu::ops;
use crate::backend::cuda::nvtx;
use crate::backend::device::llama::{check_heads, DevKv, DevShards, DeviceCompute, StepInputs};
use crate::backend::device::{mark_ready, wait_ready, Buf, Event, Exchange};
use crate::error::{no_panic, Error, Result};
use crate::model::{ModelConfig, TensorSource};
use crate::parallel::shard::HeadShard;
use crate::parallel::{Group, LayerId, Placement, Region, Segment, TensorKind, WorkerId};
use crate::reshard::device;
use crate::reshard::planner::{Item, Transfer};
use crate::runtime::kv_cache::{kv_pack, kv_unpack, KvGeometry, LayerKv};
use crate::runtime::live_placement::{Decision, FlipInfo, LivePlacement};
use crate::runtime::sampling;
use crate::runtime::trace;
use crossbeam_channel::{Receiver, Sender};
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// The shards one worker holds for one segment.
#[derive(Debug)]
pub struct ShardSet {
    /// Size of the group and this worker's index in it when the shards were cut.
    pub group_size: usize,
    pub index: usize,
    pub tensors: HashMap<TensorKind, Vec<f32>>,
}

impl ShardSet {
    pub fn get(&self, k: TensorKind) -> Result<&[f32]> {
        self.tensors
            .get(&k)
            .map(Vec::as_slice)
            .ok_or_else(|| Error::Worker {
                worker: usize::MAX,
                msg: format!("shard {k:?} not resident"),
            })
    }

    pub fn bytes(&self) -> usize {
        self.tensors.values().map(|v| v.len() * 4).sum()
    }
}

/// The tensors a segment needs.
pub fn segment_tensors(cfg: &ModelConfig, seg: Segment) -> Vec<TensorKind> {
    match seg {
        Segment::Embed => vec![TensorKind::Embed],
        Segment::Layer(l) => TensorKind::layer_tensors(cfg, l),
        Segment::Head => vec![TensorKind::FinalNorm, TensorKind::LmHead],
    }
}

/// Bytes resident on all workers now, and the peak since the last reset: how the extra
/// memory of a reconfiguration (new buffers alive beside the old ones) is measured.
#[derive(Debug, Default)]
pub struct MemMeter {
    now: AtomicI64,
    peak: AtomicI64,
}

impl MemMeter {
    pub fn alloc(&self, bytes: usize) {
        let now = self.now.fetch_add(bytes as i64, Ordering::SeqCst) + bytes as i64;
        self.peak.fetch_max(now, Ordering::SeqCst);
    }

    pub fn free(&self, bytes: usize) {
        self.now.fetch_sub(bytes as i64, Ordering::SeqCst);
    }

    pub fn now(&self) -> i64 {
        self.now.load(Ordering::SeqCst)
    }

    pub fn peak(&self) -> i64 {
        self.peak.load(Ordering::SeqCst)
    }

    /// Starts a new peak measurement from the current level.
    pub fn reset_peak(&self) {
        self.peak.store(self.now(), Ordering::SeqCst);
    }
}

/// A segment's shards prepared for its flip.
pub enum StagedShards {
    /// This worker's shard does not change: the resident one stays.
    Kept(Arc<ShardSet>),
    /// New buffers; the tensors in `in_place` (old region, new region) are cut out of the
    /// resident buffer at the flip instead of copied beforehand: no second copy of the
    /// data that stays, and no extra memory for it while the switch is in flight.
    New {
        set: ShardSet,
        in_place: Vec<(TensorKind, Region, Region)>,
    },
}

/// A segment's device shards prepared for its flip. Nothing is cut in place on the
/// device: the part of the old shard that stays was copied device-to-device into the new
/// buffers during the copy job (one kernel, counted by the meter while both exist).
pub enum StagedDevShards {
    Kept(Arc<DevShards>),
    New(DevShards),
}

impl StagedDevShards {
    /// Bytes allocated for the switch (0 when kept).
    pub fn new_bytes(&self) -> usize {
        match self {
            StagedDevShards::Kept(_) => 0,
            StagedDevShards::New(s) => s.bytes(),
        }
    }
}

/// Buffers prepared by the copy thread for a pending switch of one segment (host
/// fields on CPU workers, `dev_` fields on device workers).
#[derive(Default)]
pub struct Staged {
    pub shards: Option<StagedShards>,
    pub kv: Option<Arc<Mutex<LayerKv>>>,
    pub dev_shards: Option<StagedDevShards>,
    pub dev_kv: Option<Arc<DevKv>>,
    /// On device workers: the copy stream's event after the job's last transfer; the
    /// compute stream waits for it before the flip touches the staged buffers.
    pub ready: Option<Event>,
}

/// At a flip: frees `old`'s bytes from the meter unless `new` is that very buffer (a
/// shard or cache that stays as it is).
fn release<T>(
    meter: &MemMeter,
    old: Option<&Arc<T>>,
    new: Option<&Arc<T>>,
    bytes: impl Fn(&T) -> usize,
) {
    if let Some(o) = old {
        if !new.is_some_and(|n| Arc::ptr_eq(o, n)) {
            meter.free(bytes(o));
        }
    }
}

/// Keeps `to` (inside `from`) of a row-major buffer holding `from`, in place: rows move
/// forward only, so one pass suffices; a kept prefix costs nothing.
pub fn compact_in_place(mut v: Vec<f32>, from: &Region, to: &Region) -> Vec<f32> {
    let (fw, tw) = (from.cols.len(), to.cols.len());
    for (i, r) in to.rows.clone().enumerate() {
        let src = (r - from.rows.start) * fw + (to.cols.start - from.cols.start);
        let dst = i * tw;
        if src != dst {
            v.copy_within(src..src + tw, dst);
        }
    }
    v.truncate(to.len());
    v.shrink_to_fit();
    v
}

/// A worker's memory.
#[derive(Default)]
pub struct WorkerMem {
    pub shards: RwLock<HashMap<Segment, Arc<ShardSet>>>,
    pub kv: RwLock<HashMap<LayerId, Arc<Mutex<LayerKv>>>>,
    pub staged: Mutex<HashMap<Segment, Staged>>,
    pub meter: Arc<MemMeter>,
    /// Shards and KV in device memory (device workers only; `shards`/`kv` stay empty).
    pub dev_shards: RwLock<HashMap<Segment, Arc<DevShards>>>,
    pub dev_kv: RwLock<HashMap<LayerId, Arc<DevKv>>>,
}

impl WorkerMem {
    pub fn shard(&self, seg: Segment) -> Option<Arc<ShardSet>> {
        self.shards.read().ok()?.get(&seg).cloned()
    }

    pub fn kv(&self, l: LayerId) -> Option<Arc<Mutex<LayerKv>>> {
        self.kv.read().ok()?.get(&l).cloned()
    }

    /// [`WorkerMem::shard`] of a device worker.
    pub fn dev_shard(&self, seg: Segment) -> Option<Arc<DevShards>> {
        self.dev_shards.read().ok()?.get(&seg).cloned()
    }

    /// [`WorkerMem::kv`] of a device worker.
    pub fn dev_kv_of(&self, l: LayerId) -> Option<Arc<DevKv>> {
        self.dev_kv.read().ok()?.get(&l).cloned()
    }

    /// Takes what was staged for `seg` (nothing staged: empty).
    pub fn take_staged(&self, seg: Segment) -> Staged {
        self.staged
            .lock()
            .ok()
            .and_then(|mut s| s.remove(&seg))
            .unwrap_or_default()
    }

    /// Bytes of weights and KV resident on this worker (host and device memory).
    pub fn bytes(&self) -> usize {
        fn sum<K, V>(m: &RwLock<HashMap<K, V>>, f: impl Fn(&V) -> usize) -> usize {
            m.read().map(|m| m.values().map(f).sum()).unwrap_or(0)
        }
        sum(&self.shards, |s| s.bytes())
            + sum(&self.kv, |k| k.lock().map(|k| k.bytes()).unwrap_or(0))
            + sum(&self.dev_shards, |s| s.bytes())
            + sum(&self.dev_kv, |k| k.bytes())
    }
}

/// The hidden state between segments: host memory on the CPU backend, device memory
/// (bf16) on a device worker.
enum Hidden {
    Host(Vec<f32>),
    Dev(Arc<Buf>),
}

/// One sequence's share of a step.
#[derive(Debug, Clone)]
pub struct SeqWork {
    /// The request's id (keys the KV pre-copy bookkeeping of reconfigurations).
    pub id: u64,
    pub tokens: Vec<u32>,
    /// Position of `tokens[0]`.
    pub start_pos: usize,
    pub block_table: Arc<Vec<u32>>,
    /// Logits wanted for every token (true) or only the last (false).
    pub all_logits: bool,
}

/// What the LM head's ranks send the driver for each row of [`StepPlan::logit_rows`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadOutput {
    /// The f32 logits of the rank's vocabulary slice, `[rows, slice]`.
    Logits,
    /// Each row's largest logit in the slice and its index
    /// ([`crate::runtime::sampling::pack_picks`]), which the driver merges across
    /// slices: for steps in which every sequence samples greedily and none asks for its
    /// logits. 8 bytes a row instead of 4 × the slice (128 KiB a row for a 32k
    /// vocabulary), and on a GPU no logits leave the device.
    Argmax,
}

/// Everything a worker needs to run one step.
pub struct StepPlan {
    pub step: u64,
    /// Which group runs each segment is decided per step through this.
    pub live: Arc<LivePlacement>,
    pub seqs: Vec<SeqWork>,
    pub head: HeadOutput,
    /// A switch is in flight (graph recorders remember nothing new meanwhile).
    pub switching: bool,
}

impl StepPlan {
    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens.len()).sum()
    }

    /// Rows (token indices in the flattened batch) whose logits are returned, in order.
    pub fn logit_rows(&self) -> Vec<usize> {
        let mut rows = Vec::new();
        let mut at = 0;
        for s in &self.seqs {
            let n = s.tokens.len();
            if s.all_logits {
                rows.extend(at..at + n);
            } else if n > 0 {
                rows.push(at + n - 1);
            }
            at += n;
        }
        rows
    }
}

/// Test hook ([`crate::runtime::EngineConfig::step_delay`]): worker `worker` sleeps
/// `delay` at the start of step `step`, so that peers waiting longer than the comm
/// timeout give up on the step and its parts of it arrive after they did; or, with
/// `before_sync`, after queuing the step's layers and before anything of it
/// synchronizes (the head's download, the closing synchronize), so that on the
/// emulator its peers' waits run its queued work only as far as each needs (the
/// laziest order the events allow), which exposes a missing order between streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[doc(hidden)] // test hook, not part of the serving API
pub struct StepDelay {
    pub step: u64,
    pub worker: WorkerId,
    pub delay: Duration,
    pub before_sync: bool,
}

pub enum Cmd {
    /// Load this worker's shards of `placement` from the source and allocate its KV.
    Load(Arc<Placement>),
    Step(Arc<StepPlan>),
    Shutdown,
}

pub enum Reply {
    Loaded(WorkerId, Result<()>),
    StepDone(WorkerId, Result<()>),
}

pub struct Worker {
    pub id: WorkerId,
    pub cfg: Arc<ModelConfig>,
    pub source: Arc<dyn TensorSource>,
    pub mem: Arc<WorkerMem>,
    pub comm: Comm,
    pub geom: KvGeometry,
    inv_freq: Vec<f32>,
    /// The kernel path, when this worker runs on a device (CPU ops otherwise).
    device: Option<DeviceCompute>,
    delay: Option<StepDelay>,
}

impl Worker {
    pub fn new(
        id: WorkerId,
        cfg: Arc<ModelConfig>,
        source: Arc<dyn TensorSource>,
        mem: Arc<WorkerMem>,
        comm: Comm,
        geom: KvGeometry,
    ) -> Self {
        let inv_freq = ops::rope_inv_freq(&cfg);
        Worker {
            id,
            cfg,
            source,
            mem,
            comm,
            geom,
            inv_freq,
            device: None,
            delay: None,
        }
    }

    /// Installs the [`StepDelay`] test hook (ignored unless it names this worker).
    pub fn with_step_delay(mut self, delay: Option<StepDelay>) -> Self {
        self.delay = delay.filter(|d| d.worker == self.id);
        self
    }

    /// Runs this worker's segments on a device through the GPU kernels.
    pub fn with_device(mut self, device: DeviceCompute) -> Self {
        self.device = Some(device);
        self
    }

    /// The worker thread's loop.
    pub fn run(self, cmds: Receiver<Cmd>, replies: Sender<Reply>) {
        while let Ok(cmd) = cmds.recv() {
            let reply = match cmd {
                Cmd::Load(p) => Reply::Loaded(self.id, no_panic(|| self.load(&p), |m| self.err(m))),
                Cmd::Step(plan) => {
                    let r = no_panic(|| self.step(&plan), |m| self.err(m));
                    if r.is_err() {
                        plan.live.abandon(plan.step);
                        self.after_failed_step();
                    }
                    // KV pieces of flips the receives dropped (stale or mismatched) were
                    // counted by their senders.
                    let n = self.comm.take_dropped_bytes();
                    if n > 0 {
                        self.mem.meter.free(n);
                    }
                    Reply::StepDone(self.id, r)
                }
                Cmd::Shutdown => break,
            };
            if replies.send(reply).is_err() {
                break;
            }
        }
    }

    /// Cleanup before a failed step is reported. Nothing of the next step can be queued
    /// yet (the driver sends it only once every worker has replied), but a slower peer
    /// may still send its parts of this one: those are dropped by the stale-step rule of
    /// the receives and by the sweep that starts every step. Here the KV pieces of this
    /// step's flips go (the engine cannot serve after a flip that did not complete), with
    /// the device bytes their senders counted.
    fn after_failed_step(&self) {
        let pieces = self.comm.drain_where(|t| t.reshard_job().is_some());
        if pieces.dev_bytes > 0 {
            self.mem.meter.free(pieces.dev_bytes);
        }
        // What the failed step queued before it stopped still runs: wait for it here (a
        // worker that queues nothing in the next steps skips their synchronize), so a
        // fault in it is reported with this failure and a pre-copy of this worker's KV
        // reads finished writes.
        if let Some(dc) = &self.device {
            if let Err(e) = dc.device().and_then(|d| d.synchronize()) {
                eprintln!("remp: worker {}: after a failed step: {e}", self.id.0);
            }
        }
    }

    fn err(&self, msg: impl Into<String>) -> Error {
        Error::Worker {
            worker: self.id.0,
            msg: msg.into(),
        }
    }

    /// Reads this worker's shard of `seg` (group of `tp`, member `idx`) from the source.
    pub fn load_segment(
        cfg: &ModelConfig,
        source: &dyn TensorSource,
        seg: Segment,
        tp: usize,
        idx: usize,
    ) -> Result<ShardSet> {
        let mut tensors = HashMap::new();
        for k in segment_tensors(cfg, seg) {
            let region = k.region(cfg, tp, idx);
            tensors.insert(k, source.read(k, &region)?);
        }
        Ok(ShardSet {
            group_size: tp,
            index: idx,
            tensors,
        })
    }

    fn load(&self, p: &Placement) -> Result<()> {
        if let Some(dc) = &self.device {
            return self.load_device(dc, p);
        }
        let mut shards = HashMap::new();
        let mut kv = HashMap::new();
        let meter = &self.mem.meter;
        for seg in p.segments() {
            let g = p.group(seg);
            let Some(idx) = g.position(self.id) else {
                continue;
            };
            let set = Self::load_segment(&self.cfg, self.source.as_ref(), seg, g.len(), idx)?;
            meter.alloc(set.bytes());
            shards.insert(seg, Arc::new(set));
            if let Segment::Layer(l) = seg {
                let heads = HeadShard::new(&self.cfg, g.len(), idx);
                let layer_kv = LayerKv::new(heads.kv_heads, self.geom);
                meter.alloc(layer_kv.bytes());
                kv.insert(l, Arc::new(Mutex::new(layer_kv)));
            }
        }
        *self.mem.shards.write().map_err(|_| self.err("poisoned"))? = shards;
        *self.mem.kv.write().map_err(|_| self.err("poisoned"))? = kv;
        Ok(())
    }

    fn load_device(&self, dc: &DeviceCompute, p: &Placement) -> Result<()> {
        let mut shards = HashMap::new();
        let mut kv = HashMap::new();
        let meter = &self.mem.meter;
        let dev = dc.device()?;
        for seg in p.segments() {
            let g = p.group(seg);
            let Some(idx) = g.position(self.id) else {
                continue;
            };
            if let Segment::Layer(l) = seg {
                check_heads(&self.cfg, g.len(), idx)?;
                let heads = HeadShard::new(&self.cfg, g.len(), idx);
                let layer_kv = DevKv::new(dev, heads.kv_heads, self.geom)?;
                meter.alloc(layer_kv.bytes());
                kv.insert(l, Arc::new(layer_kv));
            }
            let set = DevShards::load(dev, &self.cfg, self.source.as_ref(), seg, g.len(), idx)?;
            meter.alloc(set.bytes());
            shards.insert(seg, Arc::new(set));
        }
        // Uploads are queued: the shards must have landed before another stream (the
        // copy thread, resharding from them) reads them, and a fault fails the load
        // before anything is installed.
        dev.synchronize()?;
        *self
            .mem
            .dev_shards
            .write()
            .map_err(|_| self.err("poisoned"))? = shards;
        *self.mem.dev_kv.write().map_err(|_| self.err("poisoned"))? = kv;
        Ok(())
    }

    /// Hands the hidden state from `prev` to `next`: a member of `next` that was not in
    /// `prev` receives it from `prev[j % prev.len()]` (j = its index in `next`).
    fn handoff(
        &self,
        (prev, next): (&Group, &Group),
        step: u64,
        h: &mut Option<Hidden>,
        n: usize,
    ) -> Result<()> {
        if prev == next {
            return Ok(());
        }
        let _nvtx = nvtx::range_with(|| format!("hand-off {prev} -> {next}"));
        let tag = Tag::Handoff(step);
        // Ranks on one device hand device buffers over (same-device exchange), ranks on
        // GPUs of their own send it through their communicator; otherwise the state goes
        // through host memory.
        let same_device = self
            .device
            .as_ref()
            .is_some_and(|dc| dc.exchange() == Exchange::SameDevice);
        let collectives = self
            .device
            .as_ref()
            .is_some_and(|dc| same_device && dc.collectives().is_some());
        if let Some(i) = prev.position(self.id) {
            for (j, w) in next.workers().iter().enumerate() {
                if prev.contains(*w) || j % prev.len() != i {
                    continue;
                }
                match h {
                    Some(Hidden::Dev(b)) if collectives => {
                        self.dc()?.send_hidden(&self.comm, b, n, *w, tag)?;
                    }
                    Some(Hidden::Dev(b)) if same_device => {
                        let copy = self.dc()?.hidden_for_peer(b, n)?;
                        self.comm.send_buf(w.0, tag, copy)?;
                    }
                    Some(Hidden::Dev(b)) => {
                        let v = self.dc()?.hidden_to_host(b, n)?;
                        self.comm.send(w.0, tag, v)?;
                    }
                    Some(Hidden::Host(v)) => self.comm.send(w.0, tag, v.clone())?,
                    None => return Err(self.err("no hidden state to hand off")),
                }
            }
        }
        match next.position(self.id) {
            Some(j) if !prev.contains(self.id) => {
                let from = prev.0[j % prev.len()].0;
                *h = Some(match &self.device {
                    // (An empty step's empty state stays on the host: nothing to move.)
                    Some(dc) if collectives && n > 0 => {
                        let b = dc.recv_hidden(&self.comm, n, WorkerId(from), tag)?;
                        Hidden::Dev(dc.adopt_hidden(b, n)?)
                    }
                    Some(dc) if same_device && n > 0 => {
                        let b = self.comm.recv_buf(from, tag)?;
                        if b.len() < n * 2 {
                            return Err(self.err(format!(
                                "hand-off of {} B, expected at least {} B",
                                b.len(),
                                n * 2
                            )));
                        }
                        // This stream reads it after the sender's copy into it.
                        Hidden::Dev(dc.adopt_hidden(b, n)?)
                    }
                    Some(dc) if n > 0 => {
                        Hidden::Dev(dc.hidden_from_host(&self.comm.recv(from, tag)?)?)
                    }
                    _ => Hidden::Host(self.comm.recv(from, tag)?),
                });
            }
            Some(_) => {}
            None => *h = None,
        }
        Ok(())
    }

    fn step(&self, plan: &StepPlan) -> Result<()> {
        // What peers sent for earlier steps after this worker gave up on them: all of it
        // is queued by now (each worker sends before it replies, and this step started
        // after every reply), so this frees their buffers even if no receive from that
        // peer comes again.
        self.comm.drop_steps_before(plan.step);
        trace::begin();
        if let Some(dc) = &self.device {
            dc.freeze_graphs(plan.switching);
        }
        if let Some(d) = self.delay.filter(|d| d.step == plan.step && !d.before_sync) {
            std::thread::sleep(d.delay);
        }
        let segments = std::iter::once(Segment::Embed)
            .chain((0..self.cfg.num_layers).map(|l| Segment::Layer(LayerId(l))))
            .chain(std::iter::once(Segment::Head));
        let mut h: Option<Hidden> = None;
        let mut prev: Option<Arc<Decision>> = None;
        let hidden_len = plan.num_tokens() * self.cfg.hidden_size;
        // Device workers upload the step's ids, positions and KV metadata once, before
        // their first segment of the step (queued through the pinned staging slots: the
        // host does not wait); a worker in no group of the step uploads nothing.
        let mut inputs: Option<StepInputs> = None;
        // Whether this worker queued device work this step (a flip, a segment).
        let mut queued = false;
        for seg in segments {
            if seg == Segment::Head {
                if let Some(d) = self.delay.filter(|d| d.step == plan.step && d.before_sync) {
                    std::thread::sleep(d.delay);
                }
            }
            // The lead of the group that just ran the previous segment decides this one
            // (the driver decides the embedding before the step starts).
            let decider = prev
                .as_ref()
                .is_some_and(|d| d.group.0.first() == Some(&self.id));
            let d = plan.live.group_for(plan.step, seg, decider)?;
            if let Some(f) = &d.flip {
                if f.fail_on == Some(self.id) {
                    return Err(self.err(format!("injected failure at the flip of {seg}")));
                }
                match &self.device {
                    Some(dc) => {
                        queued = true;
                        trace::mark("before flip");
                        self.flip_device(dc, plan, seg, f)?;
                        trace::mark("flip");
                    }
                    None => self.flip(plan, seg, f)?,
                }
            }
            if let Some(p) = &prev {
                trace::timed("hand-off", || {
                    self.handoff((&p.group, &d.group), plan.step, &mut h, hidden_len)
                })?;
            }
            let g = &d.group;
            if let (Some(_), true, 0) = (&self.device, g.contains(self.id), hidden_len) {
                // A step without tokens only lets segments flip: no kernels to launch
                // (a grid of 0 blocks is an error on CUDA); the head still answers the
                // driver, with no rows.
                match seg {
                    Segment::Embed => h = Some(Hidden::Host(Vec::new())),
                    Segment::Layer(_) => {}
                    Segment::Head => {
                        self.comm
                            .send(self.comm.driver(), Tag::Logits(plan.step), Vec::new())?
                    }
                }
            } else if let (Some(dc), true) = (&self.device, g.contains(self.id)) {
                if inputs.is_none() {
                    inputs = Some(StepInputs::new(dc, plan, self.geom)?);
                }
                let inp = inputs.as_ref().ok_or_else(|| self.err("no step inputs"))?;
                queued = true;
                self.device_segment(dc, seg, g, inp, &mut h)?;
            } else if g.contains(self.id) {
                let shards = self
                    .mem
                    .shard(seg)
                    .ok_or_else(|| self.err(format!("{seg} not resident")))?;
                self.check_shard(seg, g, shards.group_size, shards.index)?;
                match (seg, &mut h) {
                    (Segment::Embed, _) => h = Some(Hidden::Host(self.embed(plan, g, &shards)?)),
                    (Segment::Layer(l), Some(Hidden::Host(x))) => {
                        self.layer(plan, l, g, &shards, x)?;
                    }
                    (Segment::Head, Some(Hidden::Host(x))) => self.head(plan, &shards, x)?,
                    _ => return Err(self.err("no hidden state")),
                }
            }
            prev = Some(d);
        }
        // Nothing in the step blocked on the device (hand-overs are ordered by events):
        // wait here, so that a fault in this worker's kernels fails this step, and the
        // KV the step wrote is complete before the driver counts it (a copy job's
        // pre-copy reads it on the copy stream). A worker with nothing queued this step
        // (in no group, no flip) skips the call.
        trace::mark("queued");
        if let (Some(dc), true) = (&self.device, queued) {
            dc.device()?.synchronize()?;
        }
        trace::mark("sync");
        trace::end(|| format!("step {} on {}", plan.step, self.id));
        Ok(())
    }

    /// The resident shard of `seg` (cut for member `index` of a group of `group_size`)
    /// must be the one the placement's group `g` asks of this worker.
    fn check_shard(&self, seg: Segment, g: &Group, group_size: usize, index: usize) -> Result<()> {
        if group_size != g.len() || g.position(self.id) != Some(index) {
            return Err(self.err(format!(
                "{seg}: resident shard is {index}/{group_size} but placement says {}/{}",
                g.position(self.id).unwrap_or(usize::MAX),
                g.len()
            )));
        }
        Ok(())
    }

    fn dc(&self) -> Result<&DeviceCompute> {
        self.device
            .as_ref()
            .ok_or_else(|| self.err("not a device worker"))
    }

    /// One segment on the device (this worker is in its group `g`).
    fn device_segment(
        &self,
        dc: &DeviceCompute,
        seg: Segment,
        g: &Group,
        inp: &StepInputs,
        h: &mut Option<Hidden>,
    ) -> Result<()> {
        let shards = self
            .mem
            .dev_shard(seg)
            .ok_or_else(|| self.err(format!("{seg} not resident on the device")))?;
        self.check_shard(seg, g, shards.group_size, shards.index)?;
        // One recording scope per segment (graphs on): the shards, KV and hidden state
        // it launches on outlive it.
        dc.segment(|| {
            match (seg, &*h) {
                (Segment::Embed, _) => {
                    *h = Some(Hidden::Dev(dc.embed(&self.comm, g, &shards, inp)?))
                }
                (Segment::Layer(l), Some(Hidden::Dev(x))) => {
                    let kv = self
                        .mem
                        .dev_kv_of(l)
                        .ok_or_else(|| self.err(format!("KV of layer {} not resident", l.0)))?;
                    dc.layer(&self.comm, g, l, &shards, &kv, self.geom, inp, x)?;
                }
                (Segment::Head, Some(Hidden::Dev(x))) => dc.head(&self.comm, &shards, inp, x)?,
                _ => return Err(self.err("no hidden state on the device")),
            }
            Ok(())
        })
    }

    /// This worker's part of a segment's flip, at the point of the step where it takes
    /// effect: send / receive the KV appended since the pre-copy, then swap the staged
    /// buffers in and free the old ones.
    fn flip(&self, plan: &StepPlan, seg: Segment, f: &FlipInfo) -> Result<()> {
        let _nvtx = nvtx::range_with(|| format!("flip {seg}: {} -> {}", f.old, f.new));
        let me = self.id;
        let staged = self.mem.take_staged(seg);
        if f.new.contains(me) && (staged.shards.is_none()) {
            return Err(self.err(format!("{seg} flipped before its shards were staged")));
        }
        if let Segment::Layer(l) = seg {
            let old = self.mem.kv(l);
            let delta = |s: &SeqWork| f.precopied.get(&s.id).copied().unwrap_or(0)..s.start_pos;
            // Every sequence's delta, in plan order, for one KV transfer's heads.
            let unpack = |kv: &Arc<Mutex<LayerKv>>, t: &Transfer, buf: &[f32]| -> Result<()> {
                let mut kv = kv.lock().map_err(|_| self.err("KV poisoned"))?;
                let mut at = 0;
                for s in &plan.seqs {
                    at += kv_unpack(
                        &mut kv,
                        &s.block_table,
                        delta(s),
                        &t.region.rows,
                        &buf[at..],
                    );
                }
                if at != buf.len() {
                    return Err(self.err(format!(
                        "KV delta of {seg}: {} floats, used {at}",
                        buf.len()
                    )));
                }
                Ok(())
            };
            let tag = Tag::Reshard(f.job);
            for t in &f.kv_transfers {
                if t.src != me || t.item != Item::Kv(l) {
                    continue;
                }
                let old = old.as_ref().ok_or_else(|| self.err("no KV to send"))?;
                let mut buf = Vec::new();
                {
                    let kv = old.lock().map_err(|_| self.err("KV poisoned"))?;
                    for s in &plan.seqs {
                        kv_pack(&kv, &s.block_table, delta(s), &t.region.rows, &mut buf);
                    }
                }
                if t.dst == me {
                    let new = staged.kv.as_ref().ok_or_else(|| self.err("no staged KV"))?;
                    if !Arc::ptr_eq(old, new) {
                        unpack(new, t, &buf)?;
                    }
                } else {
                    self.comm.send(t.dst.0, tag, buf)?;
                }
            }
            for t in &f.kv_transfers {
                if t.dst != me || t.src == me || t.item != Item::Kv(l) {
                    continue;
                }
                let buf = self.comm.recv(t.src.0, tag)?;
                let new = staged.kv.as_ref().ok_or_else(|| self.err("no staged KV"))?;
                unpack(new, t, &buf)?;
            }
        }
        // Swap: the old buffers go (unless kept, or cut down in place).
        let meter = &self.mem.meter;
        {
            let mut shards = self.mem.shards.write().map_err(|_| self.err("poisoned"))?;
            let old = shards.remove(&seg);
            let old_bytes = old.as_ref().map_or(0, |o| o.bytes());
            match staged.shards {
                Some(StagedShards::Kept(new)) => {
                    release(meter, old.as_ref(), Some(&new), ShardSet::bytes);
                    shards.insert(seg, new);
                }
                Some(StagedShards::New { mut set, in_place }) => {
                    // Bytes of the old buffers that live on as new tensors.
                    let stays: usize = in_place.iter().map(|(_, _, to)| to.len() * 4).sum();
                    if !in_place.is_empty() {
                        let old =
                            old.ok_or_else(|| self.err(format!("{seg}: nothing to cut down")))?;
                        // The compute thread is the only holder at a flip; if not, copy.
                        let mut old_tensors = match Arc::try_unwrap(old) {
                            Ok(o) => o.tensors,
                            Err(shared) => shared.tensors.clone(),
                        };
                        for (k, from, to) in in_place {
                            let v = old_tensors
                                .remove(&k)
                                .ok_or_else(|| self.err(format!("{k:?} not resident")))?;
                            set.tensors.insert(k, compact_in_place(v, &from, &to));
                        }
                    }
                    meter.free(old_bytes - stays);
                    shards.insert(seg, Arc::new(set));
                }
                None => meter.free(old_bytes),
            }
        }
        if let Segment::Layer(l) = seg {
            let mut kvs = self.mem.kv.write().map_err(|_| self.err("poisoned"))?;
            let old = kvs.remove(&l);
            release(
                meter,
                old.as_ref(),
                staged.kv.as_ref(),
                |k: &Mutex<LayerKv>| k.lock().map(|k| k.bytes()).unwrap_or(0),
            );
            if let Some(n) = staged.kv {
                kvs.insert(l, n);
            }
        }
        Ok(())
    }

    /// A flip's KV deltas of layer `l` between workers on GPUs of their own: the local
    /// part copied, every remote piece packed and every incoming one given a buffer
    /// (sizes from the step's spans, known to both sides), a counted notice per piece,
    /// then ONE group of sends and receives on the all-worker communicator (two workers
    /// trading deltas would deadlock ungrouped), then the unpacks. All on the compute
    /// stream, in its order; the pieces are counted in the meter while they live.
    #[allow(clippy::too_many_arguments)]
    fn flip_deltas_through(
        &self,
        book: &CommBook,
        dc: &DeviceCompute,
        f: &FlipInfo,
        l: LayerId,
        spans: &[device::KvSpan],
        old: Option<&Arc<DevKv>>,
        new: Option<&Arc<DevKv>>,
    ) -> Result<()> {
        let me = self.id;
        let dev = dc.device()?;
        let tag = Tag::Reshard(f.job);
        let geom = self.geom;
        let old = || old.ok_or_else(|| self.err("no KV to send"));
        let new = || new.ok_or_else(|| self.err("no staged KV"));
        let bytes = |t: &Transfer| device::kv_piece_elems(spans, &t.region.rows, geom) * 2;
        let mine = |t: &&Transfer| t.item == Item::Kv(l);
        let mut outgoing = Vec::new();
        let mut incoming = Vec::new();
        let meter = &self.mem.meter;
        let counted = |o: &Vec<(WorkerId, Buf)>, i: &Vec<(&Transfer, Buf)>| -> usize {
            o.iter().map(|(_, b)| b.len()).sum::<usize>()
                + i.iter().map(|(_, b)| b.len()).sum::<usize>()
        };
        let moved = (|| -> Result<()> {
            for t in f.kv_transfers.iter().filter(mine).filter(|t| t.src == me) {
                if t.dst == me {
                    let (o, n) = (old()?, new()?);
                    if !Arc::ptr_eq(o, n) {
                        device::kv_copy(dev, n, o, geom, spans, &t.region.rows)?;
                    }
                } else if bytes(t) > 0 {
                    let piece = device::kv_pack_buf(dev, old()?, geom, spans, &t.region.rows)?;
                    meter.alloc(piece.len());
                    outgoing.push((t.dst, piece));
                }
            }
            for t in f.kv_transfers.iter().filter(mine) {
                if t.dst == me && t.src != me && bytes(t) > 0 {
                    let b = dev.alloc(bytes(t))?;
                    meter.alloc(b.len());
                    incoming.push((t, b));
                }
            }
            let from: Vec<(WorkerId, &Buf)> = incoming.iter().map(|(t, b)| (t.src, b)).collect();
            trade_pieces(&self.comm, &*book.p2p(me)?, dev, tag, &outgoing, &from)?;
            for (t, b) in &incoming {
                device::kv_unpack_buf(dev, new()?, geom, spans, &t.region.rows, b)?;
            }
            Ok(())
        })();
        // (Freed after the stream's queued work: frees are stream-ordered.)
        meter.free(counted(&outgoing, &incoming));
        moved
    }

    /// [`Worker::flip`] on a device worker: the KV delta is packed and unpacked by the
    /// reshard kernels on this worker's (compute) stream, a local delta is copied
    /// device-to-device, then the staged device buffers replace the old ones. The
    /// compute stream first waits for the copy job's event (the staged buffers were
    /// filled on the copy stream); nothing here blocks the host: pieces go out marked
    /// ready, and the old buffers are freed after every stream's queued work.
    fn flip_device(
        &self,
        dc: &DeviceCompute,
        plan: &StepPlan,
        seg: Segment,
        f: &FlipInfo,
    ) -> Result<()> {
        let me = self.id;
        let dev = dc.device()?;
        let staged = self.mem.take_staged(seg);
        if f.new.contains(me) && staged.dev_shards.is_none() {
            return Err(self.err(format!("{seg} flipped before its shards were staged")));
        }
        if let Some(e) = &staged.ready {
            dev.wait(e)?;
        }
        let old_kv = match seg {
            Segment::Layer(l) => self.mem.dev_kv_of(l),
            _ => None,
        };
        if let Segment::Layer(l) = seg {
            // Every sequence's positions appended since the pre-copy, in plan order.
            let spans: Vec<device::KvSpan> = plan
                .seqs
                .iter()
                .map(|s| {
                    let from = f.precopied.get(&s.id).copied().unwrap_or(0);
                    (s.block_table.as_slice(), from..s.start_pos.max(from))
                })
                .collect();
            let tag = Tag::Reshard(f.job);
            let new_kv = || {
                staged
                    .dev_kv
                    .as_ref()
                    .ok_or_else(|| self.err("no staged KV"))
            };
            // Same-device: the packed bf16 buffer is the message (none when empty: both
            // sides know); host-staged: f32 host floats; workers on GPUs of their own:
            // one group of NCCL sends and receives.
            let same_device = dc.exchange() == Exchange::SameDevice;
            let empty =
                |t: &Transfer| device::kv_piece_elems(&spans, &t.region.rows, self.geom) == 0;
            let book = dc.collectives().filter(|_| same_device);
            for t in &f.kv_transfers {
                if book.is_some() {
                    break;
                }
                if t.src != me || t.item != Item::Kv(l) {
                    continue;
                }
                let old = old_kv.as_ref().ok_or_else(|| self.err("no KV to send"))?;
                if t.dst == me {
                    let new = new_kv()?;
                    if !Arc::ptr_eq(old, new) {
                        device::kv_copy(dev, new, old, self.geom, &spans, &t.region.rows)?;
                    }
                } else if same_device {
                    if empty(t) {
                        continue;
                    }
                    let mut piece =
                        device::kv_pack_buf(dev, old, self.geom, &spans, &t.region.rows)?;
                    // The receiver's stream waits for the packing before it reads.
                    mark_ready(dev, &mut piece)?;
                    // Device memory until the receiver has unpacked it (it frees the count).
                    let n = piece.len();
                    self.mem.meter.alloc(n);
                    // (A failed send drops the piece: its count goes with it.)
                    self.comm
                        .send_buf(t.dst.0, tag, piece)
                        .inspect_err(|_| self.mem.meter.free(n))?;
                } else {
                    let buf = device::kv_pack(dev, old, self.geom, &spans, &t.region.rows)?;
                    self.comm.send(t.dst.0, tag, buf)?;
                }
            }
            if let Some(book) = book {
                let old = old_kv.as_ref();
                let new = staged.dev_kv.as_ref();
                self.flip_deltas_through(book, dc, f, l, &spans, old, new)?;
            }
            for t in &f.kv_transfers {
                if book.is_some() {
                    break;
                }
                if t.dst != me || t.src == me || t.item != Item::Kv(l) {
                    continue;
                }
                if same_device {
                    if empty(t) {
                        continue;
                    }
                    let piece = self.comm.recv_buf(t.src.0, tag)?;
                    let unpacked = wait_ready(dev, &piece).and_then(|()| {
                        let new = new_kv()?;
                        device::kv_unpack_buf(dev, new, self.geom, &spans, &t.region.rows, &piece)
                    });
                    // (Freed after the unpack has run: frees are stream-ordered.)
                    self.mem.meter.free(piece.len());
                    drop(piece);
                    unpacked?;
                    continue;
                }
                let buf = self.comm.recv(t.src.0, tag)?;
                device::kv_unpack(dev, new_kv()?, self.geom, &spans, &t.region.rows, &buf)?;
            }
        }
        // Swap: the old buffers go unless kept (freed when the last reference drops).
        let meter = &self.mem.meter;
        {
            let mut shards = self
                .mem
                .dev_shards
                .write()
                .map_err(|_| self.err("poisoned"))?;
            let old = shards.remove(&seg);
            let old_bytes = old.as_ref().map_or(0, |o| o.bytes());
            match staged.dev_shards {
                Some(StagedDevShards::Kept(new)) => {
                    release(meter, old.as_ref(), Some(&new), DevShards::bytes);
                    shards.insert(seg, new);
                }
                Some(StagedDevShards::New(set)) => {
                    meter.free(old_bytes);
                    shards.insert(seg, Arc::new(set));
                }
                None => meter.free(old_bytes),
            }
        }
        if let Segment::Layer(l) = seg {
            let mut kvs = self.mem.dev_kv.write().map_err(|_| self.err("poisoned"))?;
            kvs.remove(&l);
            release(meter, old_kv.as_ref(), staged.dev_kv.as_ref(), DevKv::bytes);
            if let Some(n) = staged.dev_kv {
                kvs.insert(l, n);
            }
        }
        Ok(())
    }

    fn embed(&self, plan: &StepPlan, g: &Group, s: &ShardSet) -> Result<Vec<f32>> {
        let hdim = self.cfg.hidden_size;
        let vocab = TensorKind::Embed
            .region(&self.cfg, s.group_size, s.index)
            .rows;
        let w = s.get(TensorKind::Embed)?;
        let mut x = vec![0.0f32; plan.num_tokens() * hdim];
        let tokens = plan.seqs.iter().flat_map(|s| s.tokens.iter());
        for (row, &t) in x.chunks_exact_mut(hdim).zip(tokens) {
            let t = t as usize;
            if vocab.contains(&t) {
                let r = t - vocab.start;
                row.copy_from_slice(&w[r * hdim..(r + 1) * hdim]);
            }
        }
        // Exactly one member contributes a non-zero row per token, so the sum is exact.
        self.comm.all_reduce_sum(g.workers(), plan.step, &mut x)?;
        Ok(x)
    }

    fn layer(
        &self,
        plan: &StepPlan,
        l: LayerId,
        g: &Group,
        s: &ShardSet,
        x: &mut [f32],
    ) -> Result<()> {
        let cfg = &*self.cfg;
        let (hdim, hd) = (cfg.hidden_size, cfg.head_dim);
        let t = plan.num_tokens();
        let heads = HeadShard::new(cfg, s.group_size, s.index);
        let (nq, nkv) = (heads.q_heads.len(), heads.kv_heads.len());
        let opt = |k: TensorKind| s.tensors.get(&k).map(Vec::as_slice);

        // Attention block.
        let mut xn = vec![0.0f32; t * hdim];
        ops::rms_norm(
            x,
            s.get(TensorKind::InputNorm(l))?,
            cfg.rms_norm_eps,
            &mut xn,
        );
        let mut q = vec![0.0f32; t * nq * hd];
        let mut k = vec![0.0f32; t * nkv * hd];
        let mut v = vec![0.0f32; t * nkv * hd];
        ops::matmul_t(&xn, t, s.get(TensorKind::Q(l))?, nq * hd, &mut q);
        ops::matmul_t(&xn, t, s.get(TensorKind::K(l))?, nkv * hd, &mut k);
        ops::matmul_t(&xn, t, s.get(TensorKind::V(l))?, nkv * hd, &mut v);
        if let Some(b) = opt(TensorKind::QBias(l)) {
            ops::add_bias(&mut q, b);
        }
        if let Some(b) = opt(TensorKind::KBias(l)) {
            ops::add_bias(&mut k, b);
        }
        if let Some(b) = opt(TensorKind::VBias(l)) {
            ops::add_bias(&mut v, b);
        }
        let positions: Vec<usize> = plan
            .seqs
            .iter()
            .flat_map(|s| s.start_pos..s.start_pos + s.tokens.len())
            .collect();
        ops::rope(&mut q, nq, hd, &positions, &self.inv_freq);
        ops::rope(&mut k, nkv, hd, &positions, &self.inv_freq);

        let kv = self
            .mem
            .kv(l)
            .ok_or_else(|| self.err(format!("KV of layer {} not resident", l.0)))?;
        let mut attn = vec![0.0f32; t * nq * hd];
        {
            let mut kv = kv.lock().map_err(|_| self.err("KV lock poisoned"))?;
            if kv.kv_heads != heads.kv_heads {
                return Err(self.err(format!(
                    "layer {}: resident KV heads {:?}, placement needs {:?}",
                    l.0, kv.kv_heads, heads.kv_heads
                )));
            }
            let slot = kv.slot_len();
            let mut at = 0;
            for sw in &plan.seqs {
                for i in 0..sw.tokens.len() {
                    let off = kv.slot_offset(&sw.block_table, sw.start_pos + i);
                    kv.k[off..off + slot].copy_from_slice(&k[(at + i) * slot..(at + i + 1) * slot]);
                    kv.v[off..off + slot].copy_from_slice(&v[(at + i) * slot..(at + i + 1) * slot]);
                }
                self.attend(
                    sw,
                    &kv,
                    &heads,
                    &q[at * nq * hd..],
                    &mut attn[at * nq * hd..],
                );
                at += sw.tokens.len();
            }
        }
        let mut o = vec![0.0f32; t * hdim];
        ops::matmul_t(&attn, t, s.get(TensorKind::O(l))?, hdim, &mut o);
        self.comm.all_reduce_sum(g.workers(), plan.step, &mut o)?;
        if let Some(b) = opt(TensorKind::OBias(l)) {
            ops::add_bias(&mut o, b);
        }
        ops::add_into(x, &o);

        // MLP block.
        ops::rms_norm(
            x,
            s.get(TensorKind::PostNorm(l))?,
            cfg.rms_norm_eps,
            &mut xn,
        );
        let inter = TensorKind::Gate(l)
            .region(cfg, s.group_size, s.index)
            .rows
            .len();
        let mut gate = vec![0.0f32; t * inter];
        let mut up = vec![0.0f32; t * inter];
        ops::matmul_t(&xn, t, s.get(TensorKind::Gate(l))?, inter, &mut gate);
        ops::matmul_t(&xn, t, s.get(TensorKind::Up(l))?, inter, &mut up);
        if let Some(b) = opt(TensorKind::GateBias(l)) {
            ops::add_bias(&mut gate, b);
        }
        if let Some(b) = opt(TensorKind::UpBias(l)) {
            ops::add_bias(&mut up, b);
        }
        ops::silu_mul(&mut gate, &up);
        ops::matmul_t(&gate, t, s.get(TensorKind::Down(l))?, hdim, &mut o);
        self.comm.all_reduce_sum(g.workers(), plan.step, &mut o)?;
        if let Some(b) = opt(TensorKind::DownBias(l)) {
            ops::add_bias(&mut o, b);
        }
        ops::add_into(x, &o);
        Ok(())
    }

    /// Causal attention of one sequence's new tokens over its cached prefix.
    ///
    /// Per new token and per local KV head, the query heads of that GQA group are done
    /// together so each cached K/V row is read once for the group; positions are walked
    /// block by block (one block-table lookup per block, no division per position).
    fn attend(&self, sw: &SeqWork, kv: &LayerKv, heads: &HeadShard, q: &[f32], out: &mut [f32]) {
        let cfg = &*self.cfg;
        let hd = cfg.head_dim;
        let nq = heads.q_heads.len();
        let g = cfg.gqa_group();
        let bs = kv.geom.block_size;
        let slot = kv.slot_len();
        let scale = 1.0 / (hd as f32).sqrt();
        // Row offsets (in k/v) of positions lo..=pos for one KV head, block by block.
        let rows = |lo: usize, pos: usize, kvl: usize, f: &mut dyn FnMut(usize, usize)| {
            let mut p = lo;
            while p <= pos {
                let b = p / bs;
                let end = ((b + 1) * bs).min(pos + 1);
                let base = sw.block_table[b] as usize * bs;
                for pp in p..end {
                    f(pp - lo, (base + pp % bs) * slot + kvl * hd);
                }
                p = end;
            }
        };
        let mut scores: Vec<f32> = Vec::new();
        for i in 0..sw.tokens.len() {
            let pos = sw.start_pos + i;
            let lo = match cfg.sliding_window {
                Some(w) => (pos + 1).saturating_sub(w),
                None => 0,
            };
            let n = pos + 1 - lo;
            for kvl in 0..heads.kv_heads.len() {
                let kvh = heads.kv_heads.start + kvl;
                // This group's query heads among the local ones (local indices).
                let qs: Vec<usize> = (0..nq)
                    .filter(|&qi| (heads.q_heads.start + qi) / g == kvh)
                    .collect();
                if qs.is_empty() {
                    continue;
                }
                let ng = qs.len();
                scores.clear();
                scores.resize(ng * n, 0.0);
                rows(lo, pos, kvl, &mut |t, off| {
                    let krow = &kv.k[off..off + hd];
                    for (j, &qi) in qs.iter().enumerate() {
                        let qv = &q[(i * nq + qi) * hd..(i * nq + qi + 1) * hd];
                        scores[j * n + t] = ops::dot(qv, krow) * scale;
                    }
                });
                for j in 0..ng {
                    ops::softmax(&mut scores[j * n..(j + 1) * n]);
                }
                for &qi in &qs {
                    out[(i * nq + qi) * hd..(i * nq + qi + 1) * hd].fill(0.0);
                }
                rows(lo, pos, kvl, &mut |t, off| {
                    let vrow = &kv.v[off..off + hd];
                    for (j, &qi) in qs.iter().enumerate() {
                        let w = scores[j * n + t];
                        let o = &mut out[(i * nq + qi) * hd..(i * nq + qi + 1) * hd];
                        for (a, &b) in o.iter_mut().zip(vrow) {
                            *a += w * b;
                        }
                    }
                });
            }
        }
    }

    fn head(&self, plan: &StepPlan, s: &ShardSet, x: &[f32]) -> Result<()> {
        let cfg = &*self.cfg;
        let hdim = cfg.hidden_size;
        let rows = plan.logit_rows();
        let mut sel = Vec::with_capacity(rows.len() * hdim);
        for &r in &rows {
            sel.extend_from_slice(&x[r * hdim..(r + 1) * hdim]);
        }
        let mut xn = vec![0.0f32; sel.len()];
        ops::rms_norm(
            &sel,
            s.get(TensorKind::FinalNorm)?,
            cfg.rms_norm_eps,
            &mut xn,
        );
        let w = s.get(TensorKind::LmHead)?;
        let v_local = w.len() / hdim;
        let mut logits = vec![0.0f32; rows.len() * v_local];
        ops::matmul_t(&xn, rows.len(), w, v_local, &mut logits);
        let out = match plan.head {
            HeadOutput::Logits => logits,
            HeadOutput::Argmax => sampling::pick_rows(&logits, v_local),
        };
        self.comm
            .send(self.comm.driver(), Tag::Logits(plan.step), out)
    }
}

//! The reshard executor: one copy thread per worker (beside its compute thread, like a
//! copy stream beside a compute stream) and the controller that paces a switch.
//!
//! For each segment of a [`ReshardPlan`], in execution order and at most `window`
//! segments at a time, the controller registers a pending switch in the
//! [`LivePlacement`] and hands a [`SegmentJob`] to the copy thread of every worker in the
//! segment's old or new group. Each copy thread allocates its new buffers, sends the
//! pieces it is the source of over the *copy lane* of the communication layer (counted;
//! a piece already on its destination is a local copy), pre-copies the KV cache of every
//! live sequence up to the positions cached when the job started, receives its pieces,
//! and stages the result. When every copy thread of the job is done the segment is
//! marked ready; the next decider flips it (mid-step, see `live_placement`), the few KV
//! entries appended since the pre-copy move at the flip, the old buffers are freed, and
//! the controller starts the next segment. Extra memory is therefore bounded by the
//! window, not by the model.
//!
//! On device workers (bf16 shards and KV in device memory) the copy thread owns its own
//! device handle — on CUDA a second stream, the copy stream — and runs the same
//! transfers through `reshard::device`: pieces are packed by the reshard kernels into a
//! fresh bf16 buffer. With the same-device exchange (the default) that buffer is the
//! message: the sender marks it ready (an event on its copy stream, no host wait) and
//! hands it over with `Comm::send_buf` (2 bytes per element on the lane, as planned);
//! the receiver's copy stream waits for that event, then unpacks it device-to-device and
//! drops it (frees are ordered after every stream's queued work), or keeps it as the new
//! shard when it is one whole (its size is exactly the shard's). A job ends with an
//! event the compute stream's flip waits for (the flip never waits on the host for the
//! copy stream), and a synchronize of the copy stream only, so that a fault in its
//! kernels fails the job. With the host-staged exchange
//! the packed buffer is downloaded and sent as f32 (exact for bf16; 4 bytes per element,
//! as planned), then uploaded and unpacked by the receiver. Data that stays on a worker
//! is copied device-to-device into the new buffer during the job rather than cut in
//! place at the flip, so it counts as extra memory while the segment is in flight. The
//! KV delta at the flip moves the same way, packed and unpacked on the compute stream
//! (ordered by events, checked by the step's closing synchronize).
//!
//! Workers on GPUs of their own (`EngineConfig::gpus`) cannot hand buffers over: each
//! copy thread packs all its remote pieces of the job and allocates a buffer per piece
//! it receives (sizes from the plan), waits at the job's gate (`Controller::gate`:
//! all participants prepared, or none goes on, so no NCCL call ever waits for a peer
//! that gave up), then queues one NCCL group of all its sends and receives on the copy
//! stream and sends a counted notice per piece (`CopyWorker::exchange_pieces`). The KV
//! delta at the flip moves likewise, in one group on the compute stream.
//!
//! Memory on devices is counted when allocated: a new buffer by the worker that
//! allocates it, a same-device piece by its sender (a receiver that keeps it as a shard
//! counts nothing more; one that unpacks it frees the count when it drops the buffer).
//! Pieces an abort leaves undelivered are uncounted by the receiver that drops them:
//! its copy thread when it discards the aborted job (only that job's messages: a peer
//! may already have sent pieces of the next one), or a later job's receive that finds
//! them still queued ahead of its own.
//!
//! A failed copy (injected in tests) aborts the switch: pending segments are withdrawn,
//! staged buffers dropped; segments already flipped stay on their new groups. Every slot
//! still names a complete group, so the engine keeps serving on that (mixed) placement.

use crate::backend::collective::{trade_pieces, CommBook};
use crate::backend::comm::{Comm, Tag};
use crate::backend::cuda::nvtx;
use crate::backend::device::llama::{check_heads, DevKv, DevShards};
use crate::backend::device::{mark_ready, wait_ready, Buf, Device, Exchange};
use crate::error::{Error, Result};
use crate::model::ModelConfig;
use crate::parallel::shard::HeadShard;
use crate::parallel::{Region, Segment, TensorKind, WorkerId};
use crate::reshard::device;
use crate::reshard::planner::{Item, ReshardPlan, SegmentPlan, Transfer};
use crate::runtime::kv_cache::{kv_pack, kv_unpack, KvGeometry, LayerKv};
use crate::runtime::live_placement::{FlipInfo, LivePlacement};
use crate::runtime::trace;
use crate::runtime::worker::{
    segment_tensors, MemMeter, ShardSet, Staged, StagedDevShards, StagedShards, StepPlan, WorkerMem,
};
use crossbeam_channel::{Receiver, Sender};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A live sequence's KV as of the job's start: positions `0..len` are pre-copied.
#[derive(Debug, Clone)]
pub struct SnapSeq {
    pub id: u64,
    pub table: Arc<Vec<u32>>,
    pub len: usize,
}

/// One segment's copies, shared by the copy threads taking part.
pub struct SegmentJob {
    pub job: u64,
    pub plan: SegmentPlan,
    pub snapshot: Vec<SnapSeq>,
    /// Injected failure (tests): this worker's copy thread fails the job.
    #[doc(hidden)] // test hook, not part of the serving API
    pub fail_on: Option<WorkerId>,
    /// Injected failure (tests): this worker fails just after the job's gate.
    #[doc(hidden)] // test hook, not part of the serving API
    pub fail_after_gate: Option<WorkerId>,
    registered: Instant,
    /// Copy-thread CPU time spent on this job, in microseconds.
    cpu_us: AtomicU64,
    /// Workers that arrived at this job's gate ([`Controller::gate`]): a failure path
    /// arrives only if its worker has not.
    gated: Mutex<BTreeSet<WorkerId>>,
    remaining: AtomicUsize,
    failed: AtomicBool,
}

impl SegmentJob {
    fn participants(&self) -> BTreeSet<WorkerId> {
        self.plan
            .old_group
            .workers()
            .iter()
            .chain(self.plan.new_group.workers())
            .copied()
            .collect()
    }
}

pub enum CopyCmd {
    Run(Arc<SegmentJob>),
    /// Drop what was staged for segment `seg` of reshard job `job` (its switch was
    /// withdrawn), and that job's undelivered messages.
    Discard {
        seg: Segment,
        job: u64,
        /// Test hook ([`ReconfigOptions::late_discard`]): first wait for a message of a
        /// later job.
        late: bool,
    },
    Shutdown,
}

/// What happened during a switch, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum ReconfigEvent {
    Started {
        from: String,
        to: String,
        step: u64,
        bytes_planned: u64,
    },
    SegmentReady {
        segment: Segment,
        /// From the segment's registration until its last copy finished.
        copy_ms: f64,
        /// CPU time the copy threads spent on it, summed.
        copy_cpu_ms: f64,
    },
    Flipped {
        segment: Segment,
        step: u64,
    },
    Finished {
        to: String,
        step: u64,
        total_ms: f64,
        bytes_moved: u64,
        peak_extra_bytes: u64,
    },
    Aborted {
        step: u64,
        error: String,
        placement: String,
    },
}

/// Options of one switch.
#[derive(Debug, Clone, Default)]
pub struct ReconfigOptions {
    /// Segments in flight at once (0 = default 2). Bounds the extra memory.
    pub window: usize,
    /// Test hook: make this worker's copy of this segment fail.
    #[doc(hidden)] // test hook, not part of the serving API
    pub fail_at: Option<(Segment, WorkerId)>,
    /// Test hook: this worker fails the step in which this segment flips, where it
    /// would flip (its shard stays the old one while the placement moves on).
    #[doc(hidden)] // test hook, not part of the serving API
    pub fail_flip_at: Option<(Segment, WorkerId)>,
    /// Test hook (workers on several GPUs): this worker's copy of this segment fails
    /// just after the job's gate, before it queues its pieces (its peers have queued
    /// theirs).
    #[doc(hidden)] // test hook, not part of the serving API
    pub fail_after_gate_at: Option<(Segment, WorkerId)>,
    /// Test hook: if the switch aborts, this worker's copy thread discards it only once
    /// a message of the next switch has reached its copy lane (a peer that discarded
    /// first already sent it a piece of the next job), or after the comm timeout.
    #[doc(hidden)] // test hook, not part of the serving API
    pub late_discard: Option<WorkerId>,
    /// How many segments ahead of the running step a new copy starts; 0 = adaptive:
    /// the last segment's copy time over the time a step spends per segment, plus one.
    pub lookahead: usize,
}

/// A segment's position in execution order (embedding 0, layer l at l + 1, head last).
fn position(seg: Segment, num_layers: usize) -> usize {
    match seg {
        Segment::Embed => 0,
        Segment::Layer(l) => l.0 + 1,
        Segment::Head => num_layers + 1,
    }
}

struct Active {
    job: u64,
    to: String,
    /// Segments not started yet (by position in execution order).
    todo: Vec<Option<SegmentPlan>>,
    /// Where the step's walk is (position of the last flip): new copies start ahead of it.
    walk: usize,
    /// Fixed look-ahead, or 0 for adaptive.
    lookahead: usize,
    /// Wall time of the last segment's copies.
    last_copy_ms: Option<f64>,
    in_flight: HashMap<Segment, Arc<SegmentJob>>,
    window: usize,
    fail_at: Option<(Segment, WorkerId)>,
    fail_flip_at: Option<(Segment, WorkerId)>,
    fail_after_gate_at: Option<(Segment, WorkerId)>,
    late_discard: Option<WorkerId>,
    aborted: Option<String>,
    started: Instant,
    reshard_before: u64,
    /// Bytes resident on all workers when the switch started.
    resident_before: i64,
    last_step: u64,
}

/// Paces a switch; shared by the engine, the copy threads and the deciders.
pub struct Controller {
    st: Mutex<Option<Active>>,
    live: Arc<LivePlacement>,
    copy_tx: Vec<Sender<CopyCmd>>,
    meter: Arc<MemMeter>,
    stats: Arc<crate::backend::comm::CommStats>,
    /// The step being run (its sequences' cached lengths seed KV pre-copies).
    pub current_plan: Mutex<Option<Arc<StepPlan>>>,
    /// Discards of an aborted switch sent to copy threads and not processed yet: the
    /// switch is over (a new one may start), but its staged memory is released only as
    /// they run.
    discards: AtomicUsize,
    /// Test hook outcomes ([`ReconfigOptions::late_discard`]): waits that saw the next
    /// job's message, and waits that gave up at the comm timeout.
    late_discards: [AtomicUsize; 2],
    events: Mutex<Vec<ReconfigEvent>>,
    next_job: AtomicU64,
    /// Recent step time in ms (f64 bits).
    step_ms: AtomicU64,
    /// Per (switch, segment) job of workers on GPUs of their own: who has prepared its
    /// pieces ([`Controller::gate`]).
    gates: Mutex<HashMap<(u64, Segment), Gate>>,
    gate_cv: std::sync::Condvar,
}

/// One job's gate: the participants arrived so far, whether all of them prepared, and
/// how many have not left it yet.
struct Gate {
    arrived: BTreeSet<WorkerId>,
    ok: bool,
    left: usize,
}

impl Controller {
    pub fn new(
        live: Arc<LivePlacement>,
        copy_tx: Vec<Sender<CopyCmd>>,
        meter: Arc<MemMeter>,
        stats: Arc<crate::backend::comm::CommStats>,
    ) -> Self {
        Controller {
            st: Mutex::new(None),
            live,
            meter,
            stats,
            current_plan: Mutex::new(None),
            discards: AtomicUsize::new(0),
            late_discards: [AtomicUsize::new(0), AtomicUsize::new(0)],
            events: Mutex::new(Vec::new()),
            next_job: AtomicU64::new(1),
            step_ms: AtomicU64::new(0),
            gates: Mutex::new(HashMap::new()),
            gate_cv: std::sync::Condvar::new(),
            copy_tx,
        }
    }

    /// No switch runs and every copy thread has released what an aborted one staged
    /// (the memory meter then counts only what the workers hold).
    /// The late-discard hook's waits so far: (saw the next job's message, timed out).
    /// A test that relies on the interleaving checks it happened.
    pub fn late_discards(&self) -> (usize, usize) {
        let g = |i: usize| self.late_discards[i].load(Ordering::SeqCst);
        (g(0), g(1))
    }

    pub fn is_settled(&self) -> bool {
        !self.is_active() && self.discards.load(Ordering::SeqCst) == 0
    }

    pub fn is_active(&self) -> bool {
        self.st.lock().map(|s| s.is_some()).unwrap_or(false)
    }

    pub fn take_events(&self) -> Vec<ReconfigEvent> {
        self.events
            .lock()
            .map(|mut e| std::mem::take(&mut *e))
            .unwrap_or_default()
    }

    fn emit(&self, e: ReconfigEvent) {
        if let Ok(mut ev) = self.events.lock() {
            ev.push(e);
        }
    }

    /// Starts a switch along `plan`. Refused while another one runs.
    pub fn start(&self, plan: ReshardPlan, opts: &ReconfigOptions, step: u64) -> Result<()> {
        let mut st = self
            .st
            .lock()
            .map_err(|_| Error::Reconfig("controller poisoned".into()))?;
        if let Some(a) = st.as_ref() {
            return Err(Error::Reconfig(format!(
                "a switch to {} is in progress; wait for it to finish (Engine::reconfig_in_progress)",
                a.to
            )));
        }
        self.meter.reset_peak();
        let resident_before = self.meter.now();
        self.emit(ReconfigEvent::Started {
            from: plan.from.clone(),
            to: plan.to.clone(),
            step,
            bytes_planned: plan.bytes_moved,
        });
        let mut a = Active {
            job: self.next_job.fetch_add(1, Ordering::Relaxed),
            to: plan.to.clone(),
            todo: {
                let n = self.live.num_layers();
                let mut todo: Vec<Option<SegmentPlan>> = vec![None; n + 2];
                for s in plan.segments {
                    let i = position(s.segment, n);
                    todo[i] = Some(s);
                }
                todo
            },
            walk: 0,
            lookahead: opts.lookahead,
            last_copy_ms: None,
            in_flight: HashMap::new(),
            window: if opts.window == 0 { 2 } else { opts.window },
            fail_at: opts.fail_at,
            fail_after_gate_at: opts.fail_after_gate_at,
            fail_flip_at: opts.fail_flip_at,
            late_discard: opts.late_discard,
            aborted: None,
            started: Instant::now(),
            reshard_before: self.stats.reshard_bytes(),
            resident_before,
            last_step: step,
        };
        self.register_more(&mut a)?;
        if a.in_flight.is_empty() {
            // Nothing to move: the target is already in place.
            self.finish(&a, step);
        } else {
            *st = Some(a);
        }
        Ok(())
    }

    fn lookahead(&self, a: &Active, n: usize) -> usize {
        if a.lookahead > 0 {
            return a.lookahead;
        }
        let step_ms = f64::from_bits(self.step_ms.load(Ordering::Relaxed));
        match a.last_copy_ms {
            Some(c) if step_ms > 0.0 => {
                let per_segment = step_ms / n as f64;
                ((c / per_segment).ceil() as usize + 1).clamp(1, n)
            }
            _ => 3.min(n),
        }
    }

    /// The engine reports its recent step time (used by the adaptive look-ahead).
    pub fn set_step_ms(&self, ms: f64) {
        self.step_ms.store(ms.to_bits(), Ordering::Relaxed);
    }

    fn register_more(&self, a: &mut Active) -> Result<()> {
        while a.aborted.is_none() && a.in_flight.len() < a.window {
            // The first segment not started at least `lookahead` positions ahead of the
            // step's walk (cyclically): its copy then has the time the walk takes to get
            // there, so it can flip in the same step instead of waiting for the next.
            let n = a.todo.len();
            let start = a.walk + self.lookahead(a, n);
            let Some(i) = (0..n)
                .map(|d| (start + d) % n)
                .find(|&i| a.todo[i].is_some())
            else {
                break;
            };
            let Some(plan) = a.todo[i].take() else { break };
            let seg = plan.segment;
            let snapshot: Vec<SnapSeq> = self
                .current_plan
                .lock()
                .ok()
                .and_then(|p| p.clone())
                .map(|p| {
                    p.seqs
                        .iter()
                        .map(|s| SnapSeq {
                            id: s.id,
                            table: s.block_table.clone(),
                            len: s.start_pos,
                        })
                        .collect()
                })
                .unwrap_or_default();
            let kv_transfers: Vec<Transfer> = plan
                .transfers
                .iter()
                .filter(|t| matches!(t.item, Item::Kv(_)))
                .cloned()
                .collect();
            let info = Arc::new(FlipInfo {
                old: plan.old_group.clone(),
                new: plan.new_group.clone(),
                kv_transfers,
                precopied: snapshot.iter().map(|s| (s.id, s.len)).collect(),
                job: a.job,
                fail_on: a.fail_flip_at.filter(|(s, _)| *s == seg).map(|(_, w)| w),
            });
            let job = Arc::new(SegmentJob {
                job: a.job,
                fail_on: a.fail_at.filter(|(s, _)| *s == seg).map(|(_, w)| w),
                fail_after_gate: a
                    .fail_after_gate_at
                    .filter(|(s, _)| *s == seg)
                    .map(|(_, w)| w),
                snapshot,
                registered: Instant::now(),
                cpu_us: AtomicU64::new(0),
                gated: Mutex::new(BTreeSet::new()),
                remaining: AtomicUsize::new(0),
                failed: AtomicBool::new(false),
                plan,
            });
            let parts = job.participants();
            job.remaining.store(parts.len(), Ordering::SeqCst);
            self.live.register(seg, info)?;
            a.in_flight.insert(seg, job.clone());
            for w in parts {
                self.copy_tx[w.0]
                    .send(CopyCmd::Run(job.clone()))
                    .map_err(|_| Error::Reconfig(format!("copy thread of {w} is gone")))?;
            }
        }
        Ok(())
    }

    /// All or nothing for the collective transfers of `job` (workers on GPUs of their
    /// own): every participant arrives once, `ok` when it has prepared its pieces.
    /// Returns `true` only when all have arrived ok (then every one queues its NCCL
    /// group), `false` as soon as one arrived failed (then none does); an error when
    /// `timeout` passes first, which fails the gate for the late ones too. A second
    /// arrival of one worker (its failure path after it passed) returns `false` at once.
    pub(crate) fn gate(
        &self,
        job: &SegmentJob,
        me: WorkerId,
        ok: bool,
        timeout: std::time::Duration,
    ) -> Result<bool> {
        let key = (job.job, job.plan.segment);
        let n = job.participants().len();
        let poisoned = || Error::Reconfig("gate table poisoned".into());
        if !job.gated.lock().map_err(|_| poisoned())?.insert(me) {
            return Ok(false);
        }
        let mut gates = self.gates.lock().map_err(|_| poisoned())?;
        let g = gates.entry(key).or_insert_with(|| Gate {
            arrived: BTreeSet::new(),
            ok: true,
            left: n,
        });
        if !g.arrived.insert(me) {
            return Ok(false);
        }
        g.ok &= ok;
        self.gate_cv.notify_all();
        let deadline = Instant::now() + timeout;
        loop {
            let g = gates
                .get_mut(&key)
                .ok_or_else(|| Error::Reconfig(format!("gate of {} gone", key.1)))?;
            let outcome = if !g.ok {
                Some(Ok(false))
            } else if g.arrived.len() >= n {
                Some(Ok(true))
            } else if Instant::now() >= deadline {
                g.ok = false;
                Some(Err(Error::Reconfig(format!(
                    "{}: {} of {n} workers ready to move their pieces after {timeout:?}",
                    key.1,
                    g.arrived.len()
                ))))
            } else {
                None
            };
            if let Some(r) = outcome {
                g.left -= 1;
                if g.left == 0 {
                    gates.remove(&key);
                }
                self.gate_cv.notify_all();
                return r;
            }
            let wait = deadline.saturating_duration_since(Instant::now());
            gates = self
                .gate_cv
                .wait_timeout(gates, wait)
                .map_err(|_| poisoned())?
                .0;
        }
    }

    fn finish(&self, a: &Active, step: u64) {
        let moved = self.stats.reshard_bytes() - a.reshard_before;
        // Transient overhead: the peak above the larger of the two steady states (a
        // switch that adds KV replication ends higher than it started, one that
        // removes it lower; neither is "extra").
        let steady = a.resident_before.max(self.meter.now());
        let extra = (self.meter.peak() - steady).max(0) as u64;
        self.emit(ReconfigEvent::Finished {
            to: a.to.clone(),
            step,
            total_ms: a.started.elapsed().as_secs_f64() * 1e3,
            bytes_moved: moved,
            peak_extra_bytes: extra,
        });
    }

    /// A copy thread's part of `job` failed with `e`: the switch will abort, and the
    /// first failure noted is the reason it reports. The failing thread notes its own
    /// failure before it tells its peers (`notify_abort`), so their "got an abort"
    /// errors never stand in for the cause, however the threads are scheduled.
    pub fn note_failure(&self, job: &SegmentJob, e: &Error) {
        job.failed.store(true, Ordering::SeqCst);
        if let Ok(mut st) = self.st.lock() {
            if let Some(a) = st.as_mut().filter(|a| a.job == job.job) {
                a.aborted.get_or_insert_with(|| e.to_string());
            }
        }
    }

    /// A copy thread finished its part of `job`.
    pub fn on_copy_done(&self, job: &Arc<SegmentJob>, result: Result<()>) {
        if let Err(e) = &result {
            self.note_failure(job, e);
        }
        if job.remaining.fetch_sub(1, Ordering::SeqCst) != 1 {
            return;
        }
        let Ok(mut st) = self.st.lock() else { return };
        let Some(a) = st.as_mut().filter(|a| a.job == job.job) else {
            return;
        };
        let seg = job.plan.segment;
        if a.aborted.is_none() {
            let _ = self.live.set_ready(seg);
            let copy_ms = job.registered.elapsed().as_secs_f64() * 1e3;
            a.last_copy_ms = Some(copy_ms);
            self.emit(ReconfigEvent::SegmentReady {
                segment: seg,
                copy_ms,
                copy_cpu_ms: job.cpu_us.load(Ordering::SeqCst) as f64 / 1e3,
            });
            return;
        }
        // Aborting: once no copy of this switch is still running, withdraw what has not
        // flipped and drop its staged buffers.
        let busy = a
            .in_flight
            .values()
            .any(|j| j.remaining.load(Ordering::SeqCst) > 0);
        if busy {
            return;
        }
        self.abort_now(a);
        *st = None;
    }

    fn abort_now(&self, a: &mut Active) {
        for (seg, job) in a.in_flight.drain() {
            if self.live.cancel_pending(seg) {
                for w in job.participants() {
                    self.discards.fetch_add(1, Ordering::SeqCst);
                    let sent = self.copy_tx[w.0].send(CopyCmd::Discard {
                        seg,
                        job: job.job,
                        late: a.late_discard == Some(w),
                    });
                    if sent.is_err() {
                        self.discards.fetch_sub(1, Ordering::SeqCst);
                    }
                }
            }
        }
        self.emit(ReconfigEvent::Aborted {
            step: a.last_step,
            error: a.aborted.clone().unwrap_or_default(),
            placement: self.live.snapshot().describe(),
        });
    }

    /// Called by the decider when `seg` flipped in `step`.
    pub fn on_flip(&self, seg: Segment, step: u64) {
        let Ok(mut st) = self.st.lock() else { return };
        let Some(a) = st.as_mut() else { return };
        a.in_flight.remove(&seg);
        a.last_step = step;
        a.walk = position(seg, self.live.num_layers());
        self.emit(ReconfigEvent::Flipped { segment: seg, step });
        if let Err(e) = self.register_more(a) {
            a.aborted.get_or_insert(e.to_string());
        }
        if a.in_flight.is_empty() {
            if a.aborted.is_some() {
                self.abort_now(a);
            } else if a.todo.iter().all(Option::is_none) {
                self.finish(a, step);
            }
            *st = None;
        }
    }
}

/// Copies `region` (global coordinates) out of a buffer holding `held`.
fn extract(data: &[f32], held: &Region, region: &Region) -> Vec<f32> {
    let w = held.cols.len();
    let mut out = Vec::with_capacity(region.len());
    for r in region.rows.clone() {
        let at = (r - held.rows.start) * w + (region.cols.start - held.cols.start);
        out.extend_from_slice(&data[at..at + region.cols.len()]);
    }
    out
}

/// Writes `src` (the contents of `region`) into a buffer holding `held`.
fn insert(data: &mut [f32], held: &Region, region: &Region, src: &[f32]) -> Result<()> {
    if src.len() != region.len() {
        return Err(Error::Reconfig(format!(
            "piece of {} floats for a region of {}",
            src.len(),
            region.len()
        )));
    }
    let w = held.cols.len();
    let n = region.cols.len();
    for (i, r) in region.rows.clone().enumerate() {
        let at = (r - held.rows.start) * w + (region.cols.start - held.cols.start);
        data[at..at + n].copy_from_slice(&src[i * n..(i + 1) * n]);
    }
    Ok(())
}

/// CPU time of the calling thread in microseconds (0 where unavailable).
fn thread_cpu_us() -> u64 {
    #[cfg(target_os = "linux")]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into the timespec we own.
        if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } == 0 {
            return ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000;
        }
    }
    0
}

/// The source, when `me`'s new shard of `k` arrives as one piece covering all of `region`.
fn whole_piece(p: &SegmentPlan, me: WorkerId, k: TensorKind, region: &Region) -> Option<WorkerId> {
    let mut pieces = p
        .transfers
        .iter()
        .filter(|t| t.dst == me && t.item == Item::Weight(k));
    match (pieces.next(), pieces.next()) {
        (Some(t), None) if t.region == *region => Some(t.src),
        _ => None,
    }
}

/// Copies `region` from a buffer holding `src_held` into one holding `dst_held`.
fn copy_region(
    src: &[f32],
    src_held: &Region,
    dst: &mut [f32],
    dst_held: &Region,
    region: &Region,
) {
    let (sw, dw, n) = (src_held.cols.len(), dst_held.cols.len(), region.cols.len());
    for r in region.rows.clone() {
        let s = (r - src_held.rows.start) * sw + (region.cols.start - src_held.cols.start);
        let d = (r - dst_held.rows.start) * dw + (region.cols.start - dst_held.cols.start);
        dst[d..d + n].copy_from_slice(&src[s..s + n]);
    }
}

/// A worker's copy thread.
/// A job's remote pieces moved by [`CopyWorker::exchange_pieces`]: what this worker
/// sent (kept until the job's end) and what it received, per transfer. Every buffer
/// in it is counted in the meter; dropping it uncounts the ones still in it (the
/// received pieces taken out are the caller's to uncount or keep).
struct Exchanged<'j> {
    meter: Arc<MemMeter>,
    outgoing: Vec<(WorkerId, Buf)>,
    incoming: Vec<(&'j Transfer, Buf)>,
}

impl Drop for Exchanged<'_> {
    fn drop(&mut self) {
        let n: usize = self.outgoing.iter().map(|(_, b)| b.len()).sum::<usize>()
            + self.incoming.iter().map(|(_, b)| b.len()).sum::<usize>();
        self.meter.free(n);
    }
}

pub struct CopyWorker {
    pub id: WorkerId,
    pub cfg: Arc<ModelConfig>,
    pub mem: Arc<WorkerMem>,
    pub comm: Comm,
    pub geom: KvGeometry,
    pub ctrl: Arc<Controller>,
    /// The copy thread's own handle on a device worker's device (on CUDA its own
    /// stream: the copy stream beside the compute stream); `None` on the CPU backend.
    pub dev: Option<Box<dyn Device>>,
    /// How pieces travel between device workers: as device buffers (same-device) or as
    /// host f32 (host-staged). Ignored on the CPU backend.
    pub exchange: Exchange,
    /// Workers on GPUs of their own (with the same-device exchange): the copy lane's
    /// communicators, through which remote pieces move instead.
    pub coll: Option<Arc<CommBook>>,
}

impl CopyWorker {
    pub fn run(self, cmds: Receiver<CopyCmd>) {
        while let Ok(cmd) = cmds.recv() {
            match cmd {
                CopyCmd::Run(job) => {
                    let t = thread_cpu_us();
                    let r = crate::error::no_panic(|| self.run_job(&job), |m| self.err(m));
                    if let Err(e) = &r {
                        self.ctrl.note_failure(&job, e);
                        self.notify_abort(&job);
                        let arrived = job.gated.lock().map_or(true, |g| g.contains(&self.id));
                        if self.coll.is_some() && !arrived {
                            // (Failed before its gate: the peers waiting there give up.)
                            let _ = self.ctrl.gate(&job, self.id, false, Default::default());
                        }
                    }
                    job.cpu_us.fetch_add(thread_cpu_us() - t, Ordering::SeqCst);
                    self.ctrl.on_copy_done(&job, r);
                }
                CopyCmd::Discard { seg, job, late } => {
                    if late {
                        let seen = self
                            .comm
                            .wait_queued(|t| t.reshard_job().is_some_and(|n| n > job));
                        self.ctrl.late_discards[usize::from(!seen)].fetch_add(1, Ordering::SeqCst);
                    }
                    self.discard(seg, job);
                    self.ctrl.discards.fetch_sub(1, Ordering::SeqCst);
                }
                CopyCmd::Shutdown => break,
            }
        }
    }

    fn err(&self, msg: impl Into<String>) -> Error {
        Error::Reconfig(format!("copy thread of {}: {}", self.id, msg.into()))
    }

    fn discard(&self, seg: Segment, job: u64) {
        let staged = self.mem.take_staged(seg);
        if let Some(StagedShards::New { set, .. }) = staged.shards {
            self.mem.meter.free(set.bytes());
        }
        if let Some(s) = &staged.dev_shards {
            self.mem.meter.free(s.new_bytes());
        }
        if let (Segment::Layer(l), Some(kv)) = (seg, &staged.dev_kv) {
            let cur = self.mem.dev_kv_of(l);
            if !cur.is_some_and(|c| Arc::ptr_eq(&c, kv)) {
                self.mem.meter.free(kv.bytes());
            }
        }
        if let (Segment::Layer(l), Some(kv)) = (seg, staged.kv) {
            let cur = self.mem.kv(l);
            if !cur.is_some_and(|c| Arc::ptr_eq(&c, &kv)) {
                self.mem
                    .meter
                    .free(kv.lock().map(|k| k.bytes()).unwrap_or(0));
            }
        }
        // Only this job's messages: a peer that discarded first may already have sent
        // this worker pieces of the next job. The device pieces dropped (and any a
        // receive skipped as stale) were counted by their senders.
        let dropped = self.comm.drain_where(|t| t.reshard_job() == Some(job));
        self.free_dropped(dropped.dev_bytes);
    }

    /// Uncounts `bytes` of dropped same-device pieces, plus those the receives on the
    /// copy lane dropped as stale.
    fn free_dropped(&self, bytes: usize) {
        let n = bytes + self.comm.take_dropped_bytes();
        if n > 0 {
            self.mem.meter.free(n);
        }
    }

    /// Hands a packed same-device piece to `to` (marked ready by its producer's stream,
    /// see [`mark_ready`]), counted in the meter until its receiver frees or keeps it.
    fn send_piece(&self, to: WorkerId, tag: Tag, piece: Buf) -> Result<()> {
        let n = piece.len();
        self.mem.meter.alloc(n);
        self.comm.send_buf(to.0, tag, piece).inspect_err(|_| {
            // Dropped with the failed message.
            self.mem.meter.free(n);
        })
    }

    /// Receives a same-device piece from `from`; it is this worker's (counted) from now.
    fn recv_piece(&self, from: WorkerId, tag: Tag) -> Result<Buf> {
        let piece = self.comm.recv_buf(from.0, tag);
        self.free_dropped(0);
        piece
    }

    /// Receives a host piece from `from` (stale device pieces it skips are uncounted).
    fn recv_host(&self, from: WorkerId, tag: Tag) -> Result<Vec<f32>> {
        let data = self.comm.recv(from.0, tag);
        self.free_dropped(0);
        data
    }

    /// Drops a received piece and its count. No wait for the kernels `_dev` queued on
    /// it: the free is ordered after every stream's queued work.
    fn done_with_piece(&self, _dev: &dyn Device, piece: Buf) -> Result<()> {
        let n = piece.len();
        drop(piece);
        self.mem.meter.free(n);
        Ok(())
    }

    /// After any failure of this worker's part of `job` (an allocation, a kernel, a
    /// peer), tells every worker it owed pieces to give up at once rather than wait for
    /// the communication timeout: the abort message is where their next piece would
    /// be. Whatever it leaves unread is drained when the controller discards the switch.
    fn notify_abort(&self, job: &SegmentJob) {
        let me = self.id;
        let dsts: BTreeSet<WorkerId> = job
            .plan
            .transfers
            .iter()
            .filter(|t| t.src == me && t.dst != me)
            .map(|t| t.dst)
            .collect();
        for d in dsts {
            let _ = self.comm.send(d.0, Tag::ReshardAbort(job.job), Vec::new());
        }
    }

    fn run_job(&self, job: &SegmentJob) -> Result<()> {
        let me = self.id;
        let p = &job.plan;
        let seg = p.segment;
        let _nvtx = nvtx::range_with(|| {
            format!(
                "reshard {seg}: {} -> {} (switch {})",
                p.old_group, p.new_group, job.job
            )
        });
        if job.fail_on == Some(me) {
            return Err(self.err(format!("injected failure while moving {seg}")));
        }
        if let Some(dev) = &self.dev {
            trace::begin();
            let r = self.run_job_device(job, dev.as_ref());
            trace::end(|| format!("reshard {seg} on {me} (switch {})", job.job));
            return r;
        }
        let cfg = &*self.cfg;
        let tag = Tag::Reshard(job.job);
        let old_idx = p.old_group.position(me);
        let new_idx = p.new_group.position(me);
        let cur = if old_idx.is_some() {
            Some(
                self.mem
                    .shard(seg)
                    .ok_or_else(|| self.err(format!("{seg} not resident")))?,
            )
        } else {
            None
        };
        let cur_kv = match seg {
            Segment::Layer(l) if old_idx.is_some() => self.mem.kv(l),
            _ => None,
        };

        let old_region = |k: TensorKind| -> Result<Region> {
            let i = old_idx.ok_or_else(|| self.err("not an old member"))?;
            Ok(k.region(cfg, p.old_group.len(), i))
        };
        // 1. New buffers (kept as they are when this worker's shard does not change).
        let keep = new_idx.is_some() && p.unchanged_members().contains(&me);
        let mut fresh: HashMap<TensorKind, Vec<f32>> = HashMap::new();
        let mut in_place: Vec<(TensorKind, Region, Region)> = Vec::new();
        let mut fresh_kv: Option<LayerKv> = None;
        let mut kept_kv: Option<Arc<std::sync::Mutex<LayerKv>>> = None;
        if let Some(j) = new_idx {
            if !keep {
                // A tensor that arrives as one piece covering its whole new region is
                // built from that piece directly (the received buffer, or one copy out of
                // the old buffer); the others get a zeroed buffer filled piece by piece.
                for k in segment_tensors(cfg, seg) {
                    let region = k.region(cfg, p.new_group.len(), j);
                    match whole_piece(p, me, k, &region) {
                        // All of it is already here: cut out of the old buffer at the flip.
                        Some(src) if src == me => in_place.push((k, old_region(k)?, region)),
                        Some(_) => {}
                        None => {
                            fresh.insert(k, vec![0.0; region.len()]);
                        }
                    }
                }
            }
            if let Segment::Layer(_) = seg {
                let heads = HeadShard::new(cfg, p.new_group.len(), j).kv_heads;
                match &cur_kv {
                    Some(kv) if kv.lock().map(|k| k.kv_heads == heads).unwrap_or(false) => {
                        kept_kv = Some(kv.clone());
                    }
                    _ => {
                        let kv = LayerKv::new(heads, self.geom);
                        self.mem.meter.alloc(kv.bytes());
                        fresh_kv = Some(kv);
                    }
                }
            }
        }
        let new_region = |k: TensorKind| -> Result<Region> {
            let j = new_idx.ok_or_else(|| self.err("not a new member"))?;
            Ok(k.region(cfg, p.new_group.len(), j))
        };
        let pack_kv = |t: &Transfer| -> Result<Vec<f32>> {
            let kv = cur_kv.as_ref().ok_or_else(|| self.err("no KV to send"))?;
            let kv = kv.lock().map_err(|_| self.err("KV poisoned"))?;
            let mut buf = Vec::new();
            for s in &job.snapshot {
                kv_pack(&kv, &s.table, 0..s.len, &t.region.rows, &mut buf);
            }
            Ok(buf)
        };
        let unpack_kv = |kv: &mut LayerKv, t: &Transfer, data: &[f32]| -> Result<()> {
            let mut at = 0;
            for s in &job.snapshot {
                at += kv_unpack(kv, &s.table, 0..s.len, &t.region.rows, &data[at..]);
            }
            if at != data.len() {
                return Err(self.err(format!("KV piece of {} floats, used {at}", data.len())));
            }
            Ok(())
        };
        let piece = |t: &Transfer| -> Result<Vec<f32>> {
            match t.item {
                Item::Weight(k) => {
                    let c = cur.as_ref().ok_or_else(|| self.err("no shard to send"))?;
                    Ok(extract(c.get(k)?, &old_region(k)?, &t.region))
                }
                Item::Kv(_) => pack_kv(t),
            }
        };

        let kv_kept = fresh_kv.is_none();
        // 2. Sends first (channels never block), then local copies, then receives.
        for t in p.transfers.iter().filter(|t| t.src == me && t.dst != me) {
            self.comm.send(t.dst.0, tag, piece(t)?)?;
        }
        let place = |fresh: &mut HashMap<TensorKind, Vec<f32>>,
                     fresh_kv: &mut Option<LayerKv>,
                     t: &Transfer,
                     data: Vec<f32>|
         -> Result<()> {
            match t.item {
                Item::Weight(k) => {
                    if keep {
                        return Ok(());
                    }
                    match fresh.get_mut(&k) {
                        Some(buf) => insert(buf, &new_region(k)?, &t.region, &data),
                        None => {
                            if data.len() != t.region.len() {
                                return Err(self.err("piece size mismatch"));
                            }
                            fresh.insert(k, data);
                            Ok(())
                        }
                    }
                }
                Item::Kv(_) => match fresh_kv.as_mut() {
                    Some(kv) => unpack_kv(kv, t, &data),
                    None => Ok(()), // kept in place
                },
            }
        };
        // (`place` skips pieces whose buffer is kept in place.)
        for t in p.transfers.iter().filter(|t| t.src == me && t.dst == me) {
            let kept = match t.item {
                Item::Weight(k) => keep || in_place.iter().any(|(x, _, _)| *x == k),
                Item::Kv(_) => kv_kept,
            };
            if kept {
                continue;
            }
            match t.item {
                Item::Weight(k) => {
                    // Straight from the old buffer into the new one: one copy.
                    let c = cur.as_ref().ok_or_else(|| self.err("no shard"))?;
                    match fresh.get_mut(&k) {
                        Some(buf) => {
                            copy_region(c.get(k)?, &old_region(k)?, buf, &new_region(k)?, &t.region)
                        }
                        None => {
                            fresh.insert(k, extract(c.get(k)?, &old_region(k)?, &t.region));
                        }
                    }
                }
                Item::Kv(_) => {
                    let data = piece(t)?;
                    place(&mut fresh, &mut fresh_kv, t, data)?;
                }
            }
        }
        for t in p.transfers.iter().filter(|t| t.dst == me && t.src != me) {
            let data = self.recv_host(t.src, tag)?;
            place(&mut fresh, &mut fresh_kv, t, data)?;
        }

        // 3. Stage for the flip.
        if let Some(j) = new_idx {
            let shards = if keep {
                StagedShards::Kept(cur.clone().ok_or_else(|| self.err("kept shard missing"))?)
            } else {
                let set = ShardSet {
                    group_size: p.new_group.len(),
                    index: j,
                    tensors: fresh,
                };
                self.mem.meter.alloc(set.bytes());
                StagedShards::New { set, in_place }
            };
            let kv = match (fresh_kv, kept_kv) {
                (Some(f), _) => Some(Arc::new(std::sync::Mutex::new(f))),
                (None, k) => k,
            };
            self.mem
                .staged
                .lock()
                .map_err(|_| self.err("staged poisoned"))?
                .insert(
                    seg,
                    Staged {
                        shards: Some(shards),
                        kv,
                        ..Default::default()
                    },
                );
        }
        Ok(())
    }

    /// [`CopyWorker::run_job`] on a device worker: the same transfers, packed out of and
    /// unpacked into bf16 device buffers by the reshard kernels on this thread's own
    /// device handle; bf16 device buffers on the wire (same-device exchange) or f32 host
    /// floats (host-staged). Data that stays on this worker is copied device-to-device
    /// into the new buffers now (nothing is cut in place at the flip), so the new buffers
    /// are whole when staged. Every new buffer is counted in the meter when allocated
    /// (a received piece kept as a shard by its sender).
    fn run_job_device(&self, job: &SegmentJob, dev: &dyn Device) -> Result<()> {
        let me = self.id;
        let p = &job.plan;
        let seg = p.segment;
        let cfg = &*self.cfg;
        let old_idx = p.old_group.position(me);
        let new_idx = p.new_group.position(me);
        let cur = match old_idx {
            Some(_) => Some(
                self.mem
                    .dev_shard(seg)
                    .ok_or_else(|| self.err(format!("{seg} not resident on the device")))?,
            ),
            None => None,
        };
        let cur_kv = match seg {
            Segment::Layer(l) if old_idx.is_some() => self.mem.dev_kv_of(l),
            _ => None,
        };
        let keep = new_idx.is_some() && p.unchanged_members().contains(&me);
        let mut fresh: HashMap<TensorKind, Buf> = HashMap::new();
        let mut fresh_kv: Option<DevKv> = None;
        let mut kept_kv: Option<Arc<DevKv>> = None;
        if let Some(j) = new_idx {
            if let Segment::Layer(_) = seg {
                // The attention kernels need whole GQA groups per rank.
                check_heads(cfg, p.new_group.len(), j)?;
            }
            if !keep {
                // A tensor arriving from another worker as one piece becomes that piece
                // (the received buffer, or its upload); the others get a buffer filled
                // piece by piece.
                for k in segment_tensors(cfg, seg) {
                    let region = k.region(cfg, p.new_group.len(), j);
                    match whole_piece(p, me, k, &region) {
                        Some(src) if src != me => {}
                        _ => match dev.alloc(region.len() * 2) {
                            Ok(b) => {
                                self.mem.meter.alloc(b.len());
                                fresh.insert(k, b);
                            }
                            Err(e) => {
                                self.mem.meter.free(fresh.values().map(Buf::len).sum());
                                return Err(e);
                            }
                        },
                    }
                }
            }
            if let Segment::Layer(_) = seg {
                let heads = HeadShard::new(cfg, p.new_group.len(), j).kv_heads;
                match &cur_kv {
                    Some(kv) if kv.kv_heads == heads => kept_kv = Some(kv.clone()),
                    _ => match DevKv::new(dev, heads, self.geom) {
                        Ok(kv) => {
                            self.mem.meter.alloc(kv.bytes());
                            fresh_kv = Some(kv);
                        }
                        Err(e) => {
                            self.mem.meter.free(fresh.values().map(Buf::len).sum());
                            return Err(e);
                        }
                    },
                }
            }
        }
        trace::mark("alloc");
        let moved = self.device_transfers(
            job,
            dev,
            cur.as_deref(),
            cur_kv.as_deref(),
            keep,
            &mut fresh,
            fresh_kv.as_ref(),
        );
        if let Err(e) = moved {
            if let Some(kv) = &fresh_kv {
                self.mem.meter.free(kv.bytes());
            }
            self.mem.meter.free(fresh.values().map(Buf::len).sum());
            return Err(e);
        }

        // Stage for the flip.
        if let Some(j) = new_idx {
            let shards = if keep {
                StagedDevShards::Kept(cur.ok_or_else(|| self.err("kept shard missing"))?)
            } else {
                // (Counted already, buffer by buffer.)
                StagedDevShards::New(DevShards {
                    group_size: p.new_group.len(),
                    index: j,
                    tensors: fresh,
                })
            };
            let staged = Staged {
                dev_shards: Some(shards),
                dev_kv: fresh_kv.map(Arc::new).or(kept_kv),
                // The compute stream's flip waits for everything this stream queued.
                ready: Some(dev.record()?),
                ..Default::default()
            };
            self.mem
                .staged
                .lock()
                .map_err(|_| self.err("staged poisoned"))?
                .insert(seg, staged);
        }
        Ok(())
    }

    /// Workers on GPUs of their own: packs every remote piece this worker sends in
    /// `job` (`pack`: `None` for an empty one) and allocates one buffer for every piece
    /// it receives (`expect`: its bytes, which both sides know from the plan), then
    /// passes the job's gate (every worker with remote pieces in the job has prepared,
    /// or none queues anything: a peer that never queues its side would hang the
    /// others' NCCL calls), then notices through the counted Comm layer (one per piece,
    /// its bytes) and ONE group of sends and receives on this stream (ungrouped, two
    /// workers sending each other pieces deadlock). Every buffer is counted in the
    /// meter until the caller is done with it; the receives land before anything
    /// queued after this on the stream.
    fn exchange_pieces<'j>(
        &self,
        job: &'j SegmentJob,
        dev: &dyn Device,
        book: &CommBook,
        pack: &dyn Fn(&Transfer) -> Result<Option<Buf>>,
        expect: &dyn Fn(&Transfer) -> usize,
    ) -> Result<Exchanged<'j>> {
        let me = self.id;
        let p = &job.plan;
        let tag = Tag::Reshard(job.job);
        // (Its drop uncounts what it holds on every early return below.)
        let mut x = Exchanged {
            meter: self.mem.meter.clone(),
            outgoing: Vec::new(),
            incoming: Vec::new(),
        };
        let mut prepare = || -> Result<()> {
            for t in p.transfers.iter().filter(|t| t.src == me && t.dst != me) {
                if let Some(piece) = pack(t)? {
                    self.mem.meter.alloc(piece.len());
                    x.outgoing.push((t.dst, piece));
                }
            }
            for t in p.transfers.iter().filter(|t| t.dst == me && t.src != me) {
                let bytes = expect(t);
                if bytes > 0 {
                    let b = dev.alloc(bytes)?;
                    self.mem.meter.alloc(b.len());
                    x.incoming.push((t, b));
                }
            }
            Ok(())
        };
        // (Everything that can fail comes before the gate: after it, every participant
        // queues its group.)
        let prepared = prepare().and_then(|()| book.copy(me));
        let gate = self
            .ctrl
            .gate(job, me, prepared.is_ok(), self.comm.timeout());
        let c = match (prepared, gate) {
            (Ok(c), Ok(true)) => c,
            (Err(e), _) | (Ok(_), Err(e)) => return Err(e),
            (Ok(_), Ok(false)) => {
                return Err(self.err(format!(
                    "{}: a peer could not prepare its pieces; nothing was sent",
                    p.segment
                )))
            }
        };
        let incoming: Vec<(WorkerId, &Buf)> = x.incoming.iter().map(|(t, b)| (t.src, b)).collect();
        // Past the gate every peer queues its group: a failure here may leave theirs
        // waiting for this one on their GPUs, which only an abort ends (the engine then
        // refuses work until a restart). (The buffers are freed after the stream's
        // queued work, the group included.)
        let traded = match job.fail_after_gate {
            Some(w) if w == me => {
                Err(self.err(format!("injected failure after {}'s gate", p.segment)))
            }
            _ => trade_pieces(&self.comm, &c, dev, tag, &x.outgoing, &incoming),
        };
        if let Err(e) = &traded {
            book.abort_all(&format!(
                "{}'s reshard pieces on {me} failed after the job's gate ({e})",
                p.segment
            ));
        }
        traded?;
        drop(incoming);
        Ok(x)
    }

    /// The sends, local copies and receives of a device job (sends first: channels
    /// never block), into `fresh` / `fresh_kv`; returns once the device is done.
    #[allow(clippy::too_many_arguments)]
    fn device_transfers(
        &self,
        job: &SegmentJob,
        dev: &dyn Device,
        cur: Option<&DevShards>,
        cur_kv: Option<&DevKv>,
        keep: bool,
        fresh: &mut HashMap<TensorKind, Buf>,
        fresh_kv: Option<&DevKv>,
    ) -> Result<()> {
        let me = self.id;
        let p = &job.plan;
        let cfg = &*self.cfg;
        let tag = Tag::Reshard(job.job);
        let geom = self.geom;
        let same_device = self.exchange == Exchange::SameDevice;
        let held = |g: &crate::parallel::Group, k: TensorKind| -> Result<Region> {
            let i = g
                .position(me)
                .ok_or_else(|| self.err(format!("not a member of {g:?}")))?;
            Ok(k.region(cfg, g.len(), i))
        };
        let cur = || cur.ok_or_else(|| self.err("no shard to send"));
        let cur_kv = || cur_kv.ok_or_else(|| self.err("no KV to send"));
        // Pre-copy: every live sequence's positions cached when the job started.
        let spans: Vec<device::KvSpan> = job
            .snapshot
            .iter()
            .map(|s| (s.table.as_slice(), 0..s.len))
            .collect();
        // Same-device KV pieces with nothing in them are not sent (both sides know).
        let kv_empty = |t: &Transfer| device::kv_piece_elems(&spans, &t.region.rows, geom) == 0;
        let pack = |t: &Transfer| -> Result<Option<Buf>> {
            Ok(Some(match t.item {
                Item::Weight(k) => device::pack_region_buf(
                    dev,
                    cur()?.get(k)?,
                    &held(&p.old_group, k)?,
                    &t.region,
                )?,
                Item::Kv(_) if kv_empty(t) => return Ok(None),
                Item::Kv(_) => device::kv_pack_buf(dev, cur_kv()?, geom, &spans, &t.region.rows)?,
            }))
        };
        // Workers on GPUs of their own: every remote piece of the job in one group of
        // sends and receives on the copy lane's communicator (see `exchange_pieces`).
        let exchanged = match &self.coll {
            Some(book) => Some(
                self.exchange_pieces(job, dev, book, &pack, &|t: &Transfer| match t.item {
                    Item::Weight(_) => t.region.len() * 2,
                    Item::Kv(_) => device::kv_piece_elems(&spans, &t.region.rows, geom) * 2,
                })?,
            ),
            None => None,
        };
        for t in p.transfers.iter().filter(|t| t.src == me && t.dst != me) {
            if exchanged.is_some() {
                break;
            }
            if same_device {
                let Some(mut piece) = pack(t)? else {
                    continue;
                };
                // The receiver's stream waits for the packing before it reads.
                mark_ready(dev, &mut piece)?;
                trace::mark("piece ready");
                self.send_piece(t.dst, tag, piece)?;
                trace::mark("piece sent");
                continue;
            }
            let data = match t.item {
                Item::Weight(k) => {
                    device::pack_region(dev, cur()?.get(k)?, &held(&p.old_group, k)?, &t.region)?
                }
                Item::Kv(_) => device::kv_pack(dev, cur_kv()?, geom, &spans, &t.region.rows)?,
            };
            self.comm.send(t.dst.0, tag, data)?;
        }
        trace::mark("sends");
        for t in p.transfers.iter().filter(|t| t.src == me && t.dst == me) {
            match t.item {
                Item::Weight(_) if keep => {}
                Item::Weight(k) => {
                    let dst = fresh
                        .get(&k)
                        .ok_or_else(|| self.err(format!("no new buffer for {k:?}")))?;
                    let (src, src_held) = (cur()?.get(k)?, held(&p.old_group, k)?);
                    device::copy_region(
                        dev,
                        dst,
                        &held(&p.new_group, k)?,
                        src,
                        &src_held,
                        &t.region,
                    )?;
                }
                Item::Kv(_) => {
                    // (No fresh cache: the resident one is kept as it is.)
                    if let Some(new) = fresh_kv {
                        device::kv_copy(dev, new, cur_kv()?, geom, &spans, &t.region.rows)?;
                    }
                }
            }
        }
        trace::mark("local");
        // A received bf16 piece (counted in the meter) into the new buffers: unpacked and
        // dropped, or kept as a whole new shard.
        let use_piece =
            |t: &Transfer, piece: Buf, fresh: &mut HashMap<TensorKind, Buf>| -> Result<()> {
                let used = match t.item {
                    Item::Weight(_) if keep => Ok(()),
                    Item::Weight(k) => match fresh.get(&k) {
                        Some(buf) => held(&p.new_group, k).and_then(|h| {
                            device::unpack_region_buf(dev, buf, &h, &t.region, &piece)
                        }),
                        // A whole new shard: the received buffer is it (counted already),
                        // when its size is exactly the shard's.
                        None if piece.len() == t.region.len() * 2 => {
                            fresh.insert(k, piece);
                            return Ok(());
                        }
                        None => Err(self.err(format!(
                            "piece of {} B for a shard of {} elements",
                            piece.len(),
                            t.region.len()
                        ))),
                    },
                    Item::Kv(_) => match fresh_kv {
                        Some(new) => {
                            device::kv_unpack_buf(dev, new, geom, &spans, &t.region.rows, &piece)
                        }
                        None => Ok(()),
                    },
                };
                self.done_with_piece(dev, piece).and(used)
            };
        if let Some(mut x) = exchanged {
            // (The group's receives are queued on this stream before the unpacks; the
            // sent pieces and any piece left by a failed unpack go with `x`.)
            while let Some((t, piece)) = x.incoming.pop() {
                use_piece(t, piece, fresh)?;
            }
            drop(x);
            return dev.synchronize();
        }
        for t in p.transfers.iter().filter(|t| t.dst == me && t.src != me) {
            if same_device {
                if matches!(t.item, Item::Kv(_)) && kv_empty(t) {
                    continue;
                }
                let piece = self.recv_piece(t.src, tag)?;
                trace::mark("piece received");
                // This stream reads it after the sender's packing (and a piece kept as
                // a shard is covered for the compute stream by the job's event).
                if let Err(e) = wait_ready(dev, &piece) {
                    self.done_with_piece(dev, piece)?;
                    return Err(e);
                }
                use_piece(t, piece, fresh)?;
                trace::mark("piece used");
                continue;
            }
            let data = self.recv_host(t.src, tag)?;
            match t.item {
                Item::Weight(_) if keep => {}
                Item::Weight(k) => match fresh.get(&k) {
                    Some(buf) => {
                        device::unpack_region(dev, buf, &held(&p.new_group, k)?, &t.region, &data)?
                    }
                    None => {
                        if data.len() != t.region.len() {
                            return Err(self.err("piece size mismatch"));
                        }
                        let b = device::upload_piece(dev, &data)?;
                        self.mem.meter.alloc(b.len());
                        fresh.insert(k, b);
                    }
                },
                Item::Kv(_) => {
                    if let Some(new) = fresh_kv {
                        device::kv_unpack(dev, new, geom, &spans, &t.region.rows, &data)?;
                    }
                }
            }
        }
        trace::mark("recvs");
        // The compute stream reads these buffers after the flip, ordered by the job's
        // event; this wait (on the copy thread, not the compute thread) reports a fault
        // in the job's kernels as the job's failure, which aborts the switch.
        let synced = dev.synchronize();
        trace::mark("sync");
        synced
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::comm::fabric;
    use crate::backend::device::emu::EmuDevice;
    use crate::model::random::tiny_config;
    use crate::parallel::{Placement, Topology};
    use std::time::Duration;

    /// Copy threads' state for `n` emulated device workers (no threads: the test plays
    /// their commands), sharing one meter.
    fn copy_workers(n: usize) -> (Vec<CopyWorker>, Arc<MemMeter>) {
        let cfg = Arc::new(tiny_config());
        let timeout = Duration::from_millis(100);
        let (_, copy, stats) = fabric(n, timeout);
        let placement = Placement::static_topology(Topology::new(1, 1), &cfg).unwrap();
        let live = Arc::new(LivePlacement::new(&placement, timeout));
        let meter = Arc::new(MemMeter::default());
        let copy_tx = (0..n).map(|_| crossbeam_channel::unbounded().0).collect();
        let ctrl = Arc::new(Controller::new(live, copy_tx, meter.clone(), stats));
        let geom = KvGeometry {
            num_blocks: 4,
            block_size: 4,
            head_dim: cfg.head_dim,
        };
        let workers = copy
            .into_iter()
            .take(n)
            .enumerate()
            .map(|(w, comm)| CopyWorker {
                id: WorkerId(w),
                cfg: cfg.clone(),
                mem: Arc::new(WorkerMem {
                    meter: meter.clone(),
                    ..Default::default()
                }),
                comm,
                geom,
                ctrl: ctrl.clone(),
                dev: Some(Box::new(EmuDevice::new())),
                exchange: Exchange::SameDevice,
                coll: None,
            })
            .collect();
        (workers, meter)
    }

    /// The race of an abort followed at once by a new switch: a peer that already
    /// discarded job 1 sends its piece of job 2 before this worker discards job 1. The
    /// discard drops (and uncounts) job 1's leftovers only; job 2's piece is received.
    /// The gate of a job moved through collectives: open only when every participant
    /// arrived ok; closed for all as soon as one failed or timed out; a participant's
    /// second arrival (its failure path after it passed) opens nothing.
    #[test]
    fn gate_is_all_or_nothing() {
        let cfg = tiny_config();
        let from = Placement::static_topology(Topology::new(1, 1), &cfg).unwrap();
        let kv = vec![0; cfg.num_layers];
        let (_, plan) =
            crate::reshard::planner::plan_topology(&cfg, &from, Topology::new(2, 1), 2, 2, &kv)
                .unwrap();
        let job = |n: u64| SegmentJob {
            job: n,
            plan: plan.segments[0].clone(),
            snapshot: Vec::new(),
            fail_on: None,
            fail_after_gate: None,
            registered: Instant::now(),
            cpu_us: AtomicU64::new(0),
            gated: Mutex::new(BTreeSet::new()),
            remaining: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
        };
        assert_eq!(job(0).participants().len(), 2);
        let (w, _) = copy_workers(1);
        let ctrl = &w[0].ctrl;
        let t = Duration::from_secs(10);
        let (a, b) = (WorkerId(0), WorkerId(1));
        let both = |j: &SegmentJob, ok_a: bool, ok_b: bool| {
            std::thread::scope(|s| {
                let h = s.spawn(|| ctrl.gate(j, b, ok_b, t).unwrap());
                (ctrl.gate(j, a, ok_a, t).unwrap(), h.join().unwrap())
            })
        };
        let j1 = job(1);
        assert_eq!(both(&j1, true, true), (true, true));
        assert_eq!(both(&job(2), true, false), (false, false));
        assert_eq!(both(&job(3), false, true), (false, false));
        // Passed, then failed later: the second arrival is refused, no new gate.
        assert!(!ctrl.gate(&j1, a, false, t).unwrap());
        // A peer that never comes: an error at the timeout, and the late one is refused.
        let j = job(4);
        assert!(ctrl.gate(&j, a, true, Duration::from_millis(20)).is_err());
        assert!(!ctrl.gate(&j, b, true, t).unwrap());
        let gates = ctrl.gates.lock().unwrap();
        assert!(gates.is_empty(), "gates left open");
    }

    #[test]
    fn discard_keeps_the_next_jobs_pieces_and_uncounts_its_own() {
        let (w, meter) = copy_workers(3);
        let dev = w[0].dev.as_deref().unwrap();
        let seg = Segment::Layer(crate::parallel::LayerId(0));
        // Job 1 (aborted): pieces from workers 0 and 2 that worker 1 never received.
        w[0].send_piece(WorkerId(1), Tag::Reshard(1), dev.alloc(64).unwrap())
            .unwrap();
        w[2].send_piece(WorkerId(1), Tag::Reshard(1), dev.alloc(128).unwrap())
            .unwrap();
        w[2].comm.send(1, Tag::ReshardAbort(1), Vec::new()).unwrap();
        // Worker 0 discarded job 1 and ran job 2 already.
        w[0].discard(seg, 1);
        w[0].send_piece(WorkerId(1), Tag::Reshard(2), dev.alloc(32).unwrap())
            .unwrap();
        assert_eq!(meter.now(), 64 + 128 + 32);
        w[1].discard(seg, 1);
        assert_eq!(
            meter.now(),
            32,
            "job 1's pieces uncounted, job 2's still counted"
        );
        let piece = w[1].recv_piece(WorkerId(0), Tag::Reshard(2)).unwrap();
        assert_eq!(piece.len(), 32);
        w[1].done_with_piece(dev, piece).unwrap();
        assert_eq!(meter.now(), 0);
        // Worker 2's copy lane was untouched by the others' discards.
        w[2].discard(seg, 1);
        assert_eq!(meter.now(), 0);
    }

    /// Job 1's pieces still queued when job 2 receives (no discard reached them) are
    /// skipped and uncounted by the receive.
    #[test]
    fn receive_skips_and_uncounts_stale_pieces() {
        let (w, meter) = copy_workers(2);
        let dev = w[0].dev.as_deref().unwrap();
        w[0].send_piece(WorkerId(1), Tag::Reshard(1), dev.alloc(48).unwrap())
            .unwrap();
        w[0].send_piece(WorkerId(1), Tag::Reshard(2), dev.alloc(16).unwrap())
            .unwrap();
        let piece = w[1].recv_piece(WorkerId(0), Tag::Reshard(2)).unwrap();
        assert_eq!((piece.len(), meter.now()), (16, 16));
        w[1].done_with_piece(dev, piece).unwrap();
        assert_eq!(meter.now(), 0);
    }
}

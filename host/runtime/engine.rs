//! The engine: the API a serving system embeds.
//!
//! ```text
//!  add_request ──► waiting ──(blocks free)──► running ──(EOS / length / cancel)──► done
//!                                 │ each step(): prefill of newly admitted requests and
//!                                 │ one decode token of every running one, in one batch
//! ```
//! The engine's thread is the *driver*: it schedules, sends the step to every worker of
//! the current placement, receives the gathered logits through the communication layer,
//! and samples. Workers (one thread each) hold the weights and KV cache.
//!
//! Admission and batching are the [`super::scheduler`]'s: KV blocks for a request's whole
//! budget are reserved when it is admitted; a request that does not fit waits in the
//! queue, and one that could never fit is refused at `add_request`.

use crate::backend::collective::Collectives;
use crate::backend::comm::{fabric, Comm, CommStats, Lane, Tag};
use crate::backend::cuda::{nvtx, CudaDevice};
use crate::backend::device::emu::EmuDevice;
use crate::backend::device::graph::{GraphCounts, GraphStats};
use crate::backend::device::llama::{check_heads, DeviceCompute};
use crate::backend::device::mailbox::Mailboxes;
use crate::backend::device::{Device, Exchange};
use crate::error::{Error, Result};
use crate::model::{Model, ModelConfig, TensorSource, Tokenizer};
use crate::parallel::devices::{DeviceId, DeviceMap};
use crate::parallel::{Placement, Segment, Topology, WorkerId};
use crate::reshard::executor::{Controller, CopyCmd, CopyWorker, ReconfigEvent, ReconfigOptions};
use crate::reshard::planner::{plan_topology, ReshardPlan};
use crate::runtime::kv_cache::{BlockAllocator, KvGeometry};
use crate::runtime::live_placement::{FlipHook, LivePlacement};
use crate::runtime::sampling::{merge_picks, sample, Rng, Sampling};
use crate::runtime::scheduler::{Scheduler, Seq};
use crate::runtime::worker::{
    Cmd, HeadOutput, MemMeter, Reply, SeqWork, StepDelay, StepPlan, Worker, WorkerMem,
};
use crossbeam_channel::{unbounded, Receiver, Sender};
use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub topology: Topology,
    /// Worker threads to start (at least `topology.world_size()`); more lets a later
    /// reconfiguration grow onto them. Default: the topology's world size.
    pub workers: Option<usize>,
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks per layer (every sequence's blocks come from this pool).
    pub kv_blocks: usize,
    /// Prompt tokens admitted per step (a longer single prompt is still admitted alone).
    pub max_prefill_tokens: usize,
    /// Requests running at once.
    pub max_running: usize,
    /// How long a worker waits for a peer before reporting a communication error.
    pub comm_timeout: Duration,
    /// Where the workers compute.
    pub device: DeviceKind,
    /// How device workers exchange partial sums and hidden states (ignored on the CPU).
    pub exchange: Exchange,
    /// GPUs the device workers spread over (worker `w` on GPU `w % gpus`; default 1,
    /// every worker on GPU 0). With more than one, each worker needs a GPU of its own
    /// (NCCL's rule: at most `gpus` workers) under the same-device exchange, whose
    /// partials, hand-offs and reshard pieces then go through communicators (NCCL on
    /// CUDA, its emulated twin on the emulator); the host-staged exchange takes any
    /// number of workers. On the emulator the GPUs
    /// are emulated too (each worker's memory is its own either way).
    pub gpus: usize,
    /// Device workers record each segment's launches and replay repeated runs as
    /// graphs (CUDA graphs on a GPU; see [`crate::backend::device::graph`]); ignored on
    /// the CPU. Off in [`EngineConfig::new`] (whose device is the CPU): set it with the
    /// device, [`DeviceKind::graphs_by_default`] says what the `remp` CLI does (on for
    /// CUDA).
    pub graphs: bool,
    /// Device workers launch with programmatic dependent launch (Hopper and later: a
    /// kernel's blocks start, and its weights stream into L2, while the previous kernel
    /// finishes; see `CudaDevice::set_pdl`). Off by default until a GPU run measures it;
    /// an error at engine start on a GPU older than compute capability 9.0 or on the
    /// CPU. The emulator accepts it (nothing changes there).
    pub pdl: bool,
    /// Device workers that share one device exchange the all-reduces of decode-sized
    /// steps through mailboxes (see [`crate::backend::device::mailbox`]): one buffer
    /// per group, allocated once, instead of a buffer handed to the peers at every
    /// exchange. On by default; off gives the hand-over path, the baseline
    /// `bench-decode --exchange same-device-copies` measures. Same bits either way.
    pub mailboxes: bool,
    /// Test hook: one worker runs one step late (see [`StepDelay`]).
    #[doc(hidden)] // test hook, not part of the serving API
    pub step_delay: Option<StepDelay>,
}

/// Where the workers compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceKind {
    /// f32 reference ops on worker threads (the default).
    #[default]
    Cpu,
    /// The GPU kernels (bf16) on the host emulator: the CUDA code path without a GPU.
    /// Slow; for tests and small demos.
    Emulated,
    /// The GPU kernels on CUDA device 0 (every worker on it, each with its own stream).
    Cuda,
}

impl DeviceKind {
    /// Whether [`EngineConfig::graphs`] should be on for this device unless asked
    /// otherwise: on CUDA, yes. On an H200 (docs/gpu-results.md, run 8) graphs cut the
    /// 1.1B decode step 8-10% at batch 1 and 16 on one rank and 31% on tp2pp2, and an
    /// online switch's largest gap stayed the same (17.8 ms against 17.6; the
    /// recorder builds nothing while a switch is in flight). On the emulator replays
    /// save nothing (launches are function calls) and on the CPU there are none.
    pub fn graphs_by_default(self) -> bool {
        self == DeviceKind::Cuda
    }

    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Emulated => "emu",
            DeviceKind::Cuda => "cuda",
        }
    }

    /// The kernel path of one worker (`None` on the CPU); with `graphs`, recording
    /// into graphs counted in that.
    fn open(
        self,
        gpu: DeviceId,
        cfg: &Arc<ModelConfig>,
        exchange: Exchange,
        graphs: Option<&Arc<GraphStats>>,
        pdl: bool,
    ) -> Result<Option<DeviceCompute>> {
        if pdl && self == DeviceKind::Cpu {
            return Err(Error::Unsupported(
                "programmatic dependent launch (pdl) is for the device kernel path: it needs \
                 the cuda (or emu) device"
                    .into(),
            ));
        }
        let Some(dev) = self.open_handle(gpu)? else {
            return Ok(None);
        };
        // the compute handle only: copy handles launch reshard kernels one by one
        dev.set_pdl(pdl).map_err(|e| on_gpu(gpu, e))?;
        let dc = DeviceCompute::new(dev, cfg.clone())?.with_exchange(exchange);
        Ok(Some(match graphs {
            // A few runs per segment: every layer's, for a few batch shapes at once.
            Some(st) => dc.with_graphs(4 * (cfg.num_layers + 2), st.clone()),
            None => dc,
        }))
    }

    /// A handle of its own on GPU `gpu` (`None` on the CPU): each worker's compute
    /// thread has one, and its copy thread another (on CUDA a second stream, so reshard
    /// copies overlap the compute stream's steps).
    fn open_handle(self, gpu: DeviceId) -> Result<Option<Box<dyn Device>>> {
        Ok(match self {
            DeviceKind::Cpu => None,
            DeviceKind::Emulated => Some(Box::new(EmuDevice::on_gpu(gpu.0))),
            DeviceKind::Cuda => {
                // Test hook: every logical GPU on GPU 0 (with NCCL 2.31 or later and
                // NCCL_MULTI_RANK_GPU_ENABLE=1 the communicators still form), so a
                // one-GPU machine runs the multi-GPU path.
                let physical = match std::env::var("REMP_CUDA_GPUS_ON_ONE").as_deref() {
                    Ok("1") => 0,
                    _ => gpu.0,
                };
                Some(Box::new(
                    CudaDevice::open(physical).map_err(|e| on_gpu(gpu, e))?,
                ))
            }
        })
    }
}

/// A device error with the GPU it happened on (one "device:" prefix, not two).
fn on_gpu(gpu: DeviceId, e: Error) -> Error {
    match e {
        Error::Device(msg) => Error::Device(format!("GPU {}: {msg}", gpu.0)),
        other => Error::Device(format!("GPU {}: {other}", gpu.0)),
    }
}

impl std::str::FromStr for DeviceKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(DeviceKind::Cpu),
            "emu" => Ok(DeviceKind::Emulated),
            "cuda" => Ok(DeviceKind::Cuda),
            other => Err(Error::Request(format!(
                "unknown device `{other}` (supported: cpu, cuda, emu)"
            ))),
        }
    }
}

impl EngineConfig {
    pub fn new(topology: Topology) -> Self {
        EngineConfig {
            topology,
            workers: None,
            block_size: 16,
            kv_blocks: 512,
            max_prefill_tokens: 4096,
            max_running: 64,
            comm_timeout: Duration::from_secs(60),
            device: DeviceKind::Cpu,
            exchange: Exchange::default(),
            gpus: 1,
            graphs: false,
            pdl: false,
            mailboxes: true,
            step_delay: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Keep generating past EOS tokens (until `max_new_tokens`).
    pub ignore_eos: bool,
    /// Return the logits of every position (prompt and generated) with the tokens.
    pub return_logits: bool,
}

impl Request {
    pub fn greedy(prompt: Vec<u32>, max_new_tokens: usize) -> Self {
        Request {
            prompt,
            max_new_tokens,
            sampling: Sampling::Greedy,
            ignore_eos: false,
            return_logits: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Eos,
    Length,
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// Refuses a KV cache the engine cannot hold, before anything is allocated: more token
/// slots than the `u32` slot ids address (`u32::MAX` is the kernels' "skip" marker), or,
/// on the host (the CPU backend and the emulator keep the cache in host memory), more
/// bytes than the host has available (`MemAvailable` of /proc/meminfo, where readable).
/// A CUDA cache is sized from free device memory by the caller and fails its
/// allocation cleanly otherwise.
fn check_kv_size(cfg: &ModelConfig, topo: Topology, econf: &EngineConfig) -> Result<()> {
    let (blocks, bs) = (econf.kv_blocks, econf.block_size);
    let max_blocks = crate::parallel::devices::kv_blocks_addressable(bs);
    if blocks > max_blocks {
        return Err(Error::Request(format!(
            "kv_blocks {blocks}: at most {max_blocks} blocks of {bs} tokens (token slots are 32-bit)"
        )));
    }
    if econf.device == DeviceKind::Cuda {
        return Ok(());
    }
    // The CPU backend holds K and V in f32 (twice the bf16 bytes counted here); the
    // emulator in bf16.
    let elem_factor = if econf.device == DeviceKind::Cpu {
        2
    } else {
        1
    };
    let per_block = crate::parallel::devices::kv_bytes_per_block(cfg, topo, bs)?;
    let bytes = per_block
        .checked_mul(blocks as u64)
        .and_then(|b| b.checked_mul(elem_factor));
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    match (bytes, host_available_bytes()) {
        (None, _) => Err(Error::Request(format!(
            "kv_blocks {blocks}: the KV cache's size overflows 64 bits"
        ))),
        (Some(b), Some(avail)) if b > avail => Err(Error::Request(format!(
            "kv_blocks {blocks}: the KV cache needs {:.2} GiB of host memory for {topo}, {:.2} GiB are available; use fewer blocks",
            gib(b),
            gib(avail)
        ))),
        _ => Ok(()),
    }
}

/// A row of logits that is all NaN (a broken checkpoint or overflow in the forward pass)
/// is an error rather than token 0, as on the greedy path ([`merge_picks`]).
fn check_logits(logits: &[f32], vocab: usize) -> Result<()> {
    match logits
        .chunks_exact(vocab.max(1))
        .position(|row| row.iter().all(|v| v.is_nan()))
    {
        Some(r) => Err(Error::Numerics(format!("row {r}: every logit is NaN"))),
        None => Ok(()),
    }
}

/// `MemAvailable` from /proc/meminfo in bytes (`None` where it cannot be read).
fn host_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// What the driver gathered from a step's LM head (see [`HeadOutput`]).
enum HeadResult {
    /// `[rows, vocab]` in vocabulary order.
    Logits(Vec<f32>),
    /// One greedy token per row.
    Tokens(Vec<u32>),
}

/// What a step produced, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A new token; `logits` holds `[rows, vocab]` for the positions processed this step
    /// when the request asked for them (the prompt's rows at prefill, one row after).
    Token {
        id: RequestId,
        token: u32,
        logits: Option<Vec<f32>>,
    },
    Finished {
        id: RequestId,
        reason: FinishReason,
    },
}

/// A request's result so far.
#[derive(Debug, Clone)]
pub struct RequestOutput {
    pub prompt: Vec<u32>,
    pub output: Vec<u32>,
    pub finish: Option<FinishReason>,
}

/// Timing of one step, for benches and the reconfiguration report.
#[derive(Debug, Clone, Copy)]
pub struct StepRecord {
    pub step: u64,
    pub start: Instant,
    pub end: Instant,
    pub tokens: usize,
}

/// The worker pool: compute threads, copy threads, the fabric between them, and the
/// live placement they execute. Rebuilt only by a restart.
struct Pool {
    cmd: Vec<Sender<Cmd>>,
    copy_cmd: Vec<Sender<CopyCmd>>,
    replies: Receiver<Reply>,
    driver: Comm,
    mems: Vec<Arc<WorkerMem>>,
    stats: Arc<CommStats>,
    live: Arc<LivePlacement>,
    ctrl: Arc<Controller>,
    meter: Arc<MemMeter>,
    /// Graph counters of every device worker (all zero without graphs).
    graphs: Arc<GraphStats>,
    /// Workers on GPUs of their own: the world communicator and its splits.
    coll: Option<Collectives>,
    /// Workers sharing one device: their mailboxes ([`EngineConfig::mailboxes`]).
    mail: Option<Arc<Mailboxes>>,
    threads: Vec<JoinHandle<()>>,
}

/// Which GPU each worker runs on, checked against the exchange: under the same-device
/// exchange, workers on several GPUs need one each (NCCL takes one rank per GPU, and a
/// device buffer cannot pass between GPUs).
fn device_map(n_workers: usize, econf: &EngineConfig) -> Result<DeviceMap> {
    let gpus = econf.gpus;
    if gpus == 0 {
        return Err(Error::Request("gpus must be at least 1".into()));
    }
    if gpus > 1 && econf.device == DeviceKind::Cpu {
        return Err(Error::Request(
            "gpus spreads device workers over GPUs: it needs the cuda or emu device".into(),
        ));
    }
    if gpus > 1 && econf.exchange == Exchange::SameDevice && n_workers > gpus {
        return Err(Error::Request(format!(
            "{n_workers} workers on {gpus} GPUs: the same-device exchange needs a GPU per \
             worker when there are several GPUs (NCCL takes one rank per GPU); use at most \
             {gpus} workers, or the host-staged exchange"
        )));
    }
    DeviceMap::round_robin(n_workers, gpus)
}

impl Pool {
    fn spawn(
        cfg: &Arc<ModelConfig>,
        source: &Arc<dyn TensorSource>,
        n_workers: usize,
        geom: KvGeometry,
        placement: &Placement,
        econf: &EngineConfig,
    ) -> Result<Self> {
        let (timeout, device, exchange) = (econf.comm_timeout, econf.device, econf.exchange);
        let devices = device_map(n_workers, econf)?;
        let (compute, copy, stats) = fabric(n_workers, timeout);
        let mut compute: Vec<Option<Comm>> = compute.into_iter().map(Some).collect();
        let mut copy: Vec<Option<Comm>> = copy.into_iter().map(Some).collect();
        let driver = compute[n_workers]
            .take()
            .ok_or_else(|| Error::Comm("no driver endpoint".into()))?;
        let live = Arc::new(LivePlacement::new(placement, timeout));
        let meter = Arc::new(MemMeter::default());
        let graph_stats = Arc::new(GraphStats::default());
        let (reply_tx, replies) = unbounded();
        let mut cmd = Vec::new();
        let mut copy_cmd = Vec::new();
        let mut copy_rx = Vec::new();
        let mut mems = Vec::new();
        for _ in 0..n_workers {
            let (tx, rx) = unbounded();
            copy_cmd.push(tx);
            copy_rx.push(rx);
            mems.push(Arc::new(WorkerMem {
                meter: meter.clone(),
                ..Default::default()
            }));
        }
        let ctrl = Arc::new(Controller::new(
            live.clone(),
            copy_cmd.clone(),
            meter.clone(),
            stats.clone(),
        ));
        let hook_ctrl = ctrl.clone();
        let hook: Arc<FlipHook> = Arc::new(Box::new(move |seg, step| hook_ctrl.on_flip(seg, step)));
        live.set_flip_hook(Some(hook));
        let mut threads = Vec::new();
        let spawn_err = |w: usize, e: std::io::Error| Error::Worker {
            worker: w,
            msg: format!("cannot start thread: {e}"),
        };
        let graphs = econf.graphs.then_some(&graph_stats);
        let mut dcs = Vec::new();
        for w in 0..n_workers {
            dcs.push(device.open(
                devices.device(WorkerId(w)),
                cfg,
                exchange,
                graphs,
                econf.pdl,
            )?);
        }
        // Workers on GPUs of their own exchange through communicators: the world's, split
        // per group (compute) and once more for the copy threads' reshard pieces.
        let mut coll: Option<Collectives> = None;
        if econf.gpus > 1 && exchange == Exchange::SameDevice {
            let handles: Option<Vec<&dyn Device>> = dcs
                .iter()
                .map(|d| d.as_ref().and_then(|d| d.device().ok()))
                .collect();
            let handles =
                handles.ok_or_else(|| Error::Device("a worker without a device".into()))?;
            let c = Collectives::new(&handles, devices.clone(), placement, timeout)?;
            for d in dcs.iter_mut() {
                *d = d.take().map(|d| d.with_collectives(c.book().clone()));
            }
            coll = Some(c);
        }
        // Workers sharing one device: decode-sized all-reduces through mailboxes.
        let mut mail = None;
        if coll.is_none() && exchange == Exchange::SameDevice && econf.mailboxes {
            let m = Arc::new(Mailboxes::new(cfg.hidden_size));
            for d in dcs.iter_mut() {
                *d = d.take().map(|d| d.with_mailboxes(m.clone()));
            }
            mail = Some(m);
        }
        for ((w, rx), dc) in copy_rx.into_iter().enumerate().zip(dcs) {
            let comm = compute[w]
                .take()
                .ok_or_else(|| Error::Comm("endpoint taken".into()))?;
            let mut worker = Worker::new(
                WorkerId(w),
                cfg.clone(),
                source.clone(),
                mems[w].clone(),
                comm,
                geom,
            );
            if let Some(dc) = dc {
                worker = worker.with_device(dc);
            }
            worker = worker.with_step_delay(econf.step_delay);
            let (tx, crx) = unbounded();
            let rtx = reply_tx.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("remp-worker-{w}"))
                    .spawn(move || {
                        nvtx::name_current_thread();
                        worker.run(crx, rtx)
                    })
                    .map_err(|e| spawn_err(w, e))?,
            );
            cmd.push(tx);
            let copier = CopyWorker {
                id: WorkerId(w),
                cfg: cfg.clone(),
                mem: mems[w].clone(),
                comm: copy[w]
                    .take()
                    .ok_or_else(|| Error::Comm("endpoint taken".into()))?,
                geom,
                ctrl: ctrl.clone(),
                dev: device.open_handle(devices.device(WorkerId(w)))?,
                exchange,
                coll: coll.as_ref().map(|c| c.book().clone()),
            };
            threads.push(
                std::thread::Builder::new()
                    .name(format!("remp-copy-{w}"))
                    .spawn(move || {
                        nvtx::name_current_thread();
                        copier.run(rx)
                    })
                    .map_err(|e| spawn_err(w, e))?,
            );
        }
        let pool = Pool {
            cmd,
            copy_cmd,
            replies,
            driver,
            mems,
            stats,
            live,
            ctrl,
            meter,
            graphs: graph_stats,
            coll,
            mail,
            threads,
        };
        let placement = Arc::new(placement.clone());
        for (w, tx) in pool.cmd.iter().enumerate() {
            tx.send(Cmd::Load(placement.clone()))
                .map_err(|_| Error::Worker {
                    worker: w,
                    msg: "worker exited".into(),
                })?;
        }
        pool.collect_replies(n_workers, true)?;
        Ok(pool)
    }

    /// Splits for the groups of `placement` not split yet (workers on GPUs of their
    /// own), before any of its layers can flip.
    fn add_communicators(&mut self, placement: &Placement) -> Result<()> {
        match &mut self.coll {
            Some(c) => c.add_placement(placement),
            None => Ok(()),
        }
    }

    fn collect_replies(&self, n: usize, load: bool) -> Result<()> {
        let mut first_err = None;
        for _ in 0..n {
            let r = self.replies.recv().map_err(|_| Error::Worker {
                worker: usize::MAX,
                msg: "all workers exited".into(),
            })?;
            let res = match r {
                Reply::Loaded(_, r) if load => r,
                Reply::StepDone(_, r) if !load => r,
                _ => Err(Error::Worker {
                    worker: usize::MAX,
                    msg: "unexpected reply".into(),
                }),
            };
            if let Err(e) = res {
                // Workers on GPUs of their own: a failed worker may have left a peer's
                // stream waiting on its GPU for a collective it never queued (its
                // reply would never come, nor its stream ever drain): abort them all.
                if let (false, Some(c), None) = (load, &self.coll, &first_err) {
                    c.abort_all(&format!("a step failed ({e})"));
                }
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn shutdown(&mut self) {
        for tx in &self.cmd {
            let _ = tx.send(Cmd::Shutdown);
        }
        for tx in &self.copy_cmd {
            let _ = tx.send(CopyCmd::Shutdown);
        }
        self.live.set_flip_hook(None);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

pub struct Engine {
    cfg: Arc<ModelConfig>,
    econf: EngineConfig,
    name: String,
    tokenizer: Arc<Tokenizer>,
    source: Arc<dyn TensorSource>,
    geom: KvGeometry,
    n_workers: usize,
    pool: Pool,
    sched: Scheduler,
    outputs: HashMap<RequestId, RequestOutput>,
    next_id: u64,
    step_no: u64,
    history: Vec<StepRecord>,
    reconfig_log: Vec<ReconfigEvent>,
    /// Why the engine can no longer serve: a failed step left a worker's resident shard
    /// different from the placement (a flip it did not complete; the placement has
    /// moved on and the KV delta is lost), so every later step would fail. Cleared by
    /// [`Engine::restart`].
    broken: Option<String>,
}

impl Engine {
    /// Starts the workers and loads each one's shards of `econf.topology`.
    pub fn new(model: &Model, econf: EngineConfig) -> Result<Self> {
        let cfg = Arc::new(model.config.clone());
        let topo = econf.topology;
        topo.validate(&cfg)?;
        let n_workers = econf.workers.unwrap_or(topo.world_size());
        if n_workers < topo.world_size() {
            return Err(Error::Topology(format!(
                "{topo} needs {} workers, engine configured with {n_workers}",
                topo.world_size()
            )));
        }
        if econf.block_size == 0 || econf.kv_blocks == 0 || econf.max_running == 0 {
            return Err(Error::Request(
                "block_size, kv_blocks and max_running must be positive".into(),
            ));
        }
        check_kv_size(&cfg, topo, &econf)?;
        let placement = Placement::static_topology(topo, &cfg)?;
        let geom = KvGeometry {
            num_blocks: econf.kv_blocks,
            block_size: econf.block_size,
            head_dim: cfg.head_dim,
        };
        let pool = Pool::spawn(&cfg, &model.source, n_workers, geom, &placement, &econf)?;
        Ok(Engine {
            cfg,
            name: model.name.clone(),
            tokenizer: model.tokenizer.clone(),
            source: model.source.clone(),
            geom,
            n_workers,
            pool,
            sched: Scheduler::new(
                BlockAllocator::new(econf.kv_blocks),
                geom,
                econf.max_running,
                econf.max_prefill_tokens,
            ),
            econf,
            outputs: HashMap::new(),
            next_id: 0,
            step_no: 0,
            history: Vec::new(),
            reconfig_log: Vec::new(),
            broken: None,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn model_name(&self) -> &str {
        &self.name
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The current placement (every segment's current group).
    pub fn placement(&self) -> Placement {
        self.pool.live.snapshot()
    }

    /// The current placement's name (`tp2pp2`, or `mixed[...]` mid-switch).
    pub fn topology_name(&self) -> String {
        self.placement().describe()
    }

    pub fn num_workers(&self) -> usize {
        self.n_workers
    }

    pub fn comm_stats(&self) -> &Arc<CommStats> {
        &self.pool.stats
    }

    /// Bytes sent between endpoints on the compute lane so far.
    pub fn compute_bytes(&self) -> u64 {
        self.pool.stats.total(Lane::Compute)
    }

    /// Per-worker resident bytes (weights + KV).
    pub fn worker_bytes(&self) -> Vec<usize> {
        self.pool.mems.iter().map(|m| m.bytes()).collect()
    }

    /// Bytes resident on all workers now (weights + KV, staged buffers included).
    pub fn resident_bytes(&self) -> i64 {
        self.pool.meter.now()
    }

    pub fn steps(&self) -> u64 {
        self.step_no
    }

    pub fn history(&self) -> &[StepRecord] {
        &self.history
    }

    pub fn kv_geometry(&self) -> KvGeometry {
        self.geom
    }

    pub fn free_blocks(&self) -> usize {
        self.sched.free_blocks()
    }

    /// Queues a request. Refused (typed error) when it is malformed or can never fit.
    pub fn add_request(&mut self, req: Request) -> Result<RequestId> {
        let cfg = &self.cfg;
        if req.prompt.is_empty() {
            return Err(Error::Request("empty prompt".into()));
        }
        if let Some(&bad) = req.prompt.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(Error::Request(format!(
                "token id {bad} out of range (vocab_size {})",
                cfg.vocab_size
            )));
        }
        let ctx = cfg.max_position_embeddings;
        if req.prompt.len() >= ctx {
            return Err(Error::Request(format!(
                "prompt of {} tokens does not fit the context of {ctx} (room is needed for at least one new token)",
                req.prompt.len()
            )));
        }
        if req.max_new_tokens == 0 {
            return Err(Error::Request("max_new_tokens must be at least 1".into()));
        }
        if let Sampling::Random {
            temperature, top_p, ..
        } = req.sampling
        {
            if !(temperature > 0.0 && temperature.is_finite() && top_p > 0.0 && top_p <= 1.0) {
                return Err(Error::Request(format!(
                    "sampling needs temperature > 0 and 0 < top_p <= 1 (got {temperature}, {top_p})"
                )));
            }
        }
        let max_new = req.max_new_tokens.min(ctx - req.prompt.len());
        let need = self.geom.blocks_for(req.prompt.len() + max_new);
        if need > self.sched.total_blocks() {
            return Err(Error::Request(format!(
                "request needs {need} KV blocks ({} tokens), the cache has {} in all",
                req.prompt.len() + max_new,
                self.sched.total_blocks()
            )));
        }
        let id = RequestId(self.next_id);
        self.next_id += 1;
        let seed = match req.sampling {
            Sampling::Random { seed, .. } => seed,
            Sampling::Greedy => 0,
        };
        self.outputs.insert(
            id,
            RequestOutput {
                prompt: req.prompt.clone(),
                output: Vec::new(),
                finish: None,
            },
        );
        self.sched.enqueue(Seq {
            id,
            tokens: req.prompt.clone(),
            cached: 0,
            blocks: Arc::new(Vec::new()),
            rng: Rng::new(seed),
            max_new,
            req,
        });
        Ok(id)
    }

    /// Cancels a waiting or running request; returns whether it was live.
    pub fn cancel(&mut self, id: RequestId) -> bool {
        let live = self.sched.remove(id);
        if live {
            if let Some(o) = self.outputs.get_mut(&id) {
                o.finish = Some(FinishReason::Cancelled);
            }
        }
        live
    }

    pub fn output(&self, id: RequestId) -> Option<&RequestOutput> {
        self.outputs.get(&id)
    }

    /// Whether any request is waiting or running.
    pub fn has_work(&self) -> bool {
        !self.sched.waiting.is_empty() || !self.sched.running.is_empty()
    }

    pub fn num_running(&self) -> usize {
        self.sched.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.sched.waiting.len()
    }

    /// Runs one step: admits what fits, prefills new requests and decodes one token of
    /// every running one. Returns the tokens produced and the requests finished.
    /// While a reconfiguration is in flight, a step runs even with no request so that
    /// its layers can flip.
    pub fn step(&mut self) -> Result<Vec<Event>> {
        self.note_aborted_communicators();
        self.serving()?;
        self.sched.admit();
        if self.sched.running.is_empty() && !self.pool.ctrl.is_active() {
            self.collect_reconfig_events();
            return Ok(Vec::new());
        }
        let start = Instant::now();
        let seqs: Vec<SeqWork> = self
            .sched
            .running
            .iter()
            .map(|s| SeqWork {
                id: s.id.0,
                tokens: s.tokens[s.cached..].to_vec(),
                start_pos: s.cached,
                block_table: s.blocks.clone(),
                all_logits: s.req.return_logits,
            })
            .collect();
        // Greedy steps that return no logits get each row's pick from the head instead of
        // its logits; a step with any other request gathers all logits.
        let head = if self
            .sched
            .running
            .iter()
            .all(|s| s.req.sampling == Sampling::Greedy && !s.req.return_logits)
        {
            HeadOutput::Argmax
        } else {
            HeadOutput::Logits
        };
        let plan = Arc::new(StepPlan {
            step: self.step_no,
            live: self.pool.live.clone(),
            seqs,
            head,
            switching: self.pool.ctrl.is_active(),
        });
        let _nvtx = nvtx::range_with(|| {
            let (n, t) = (plan.seqs.len(), plan.num_tokens());
            format!("step {}: batch {n}, {t} tokens", plan.step)
        });
        // A failed step still consumes its number: the placement's per-step decisions
        // (flips included) are never replayed under the same number.
        let out = self.run_plan(&plan).inspect_err(|_| self.step_no += 1)?;
        let vocab = self.cfg.vocab_size;

        let mut events = Vec::new();
        let mut row = 0;
        let mut finished = Vec::new();
        for (i, s) in self.sched.running.iter_mut().enumerate() {
            let n = plan.seqs[i].tokens.len();
            let rows = if s.req.return_logits { n } else { 1 };
            let (tok, logits) = match &out {
                HeadResult::Tokens(t) => {
                    let tok = *t.get(row).ok_or_else(|| {
                        Error::Comm(format!("step {}: no greedy pick for row {row}", plan.step))
                    })?;
                    (tok, None)
                }
                HeadResult::Logits(l) => {
                    let mine = &l[row * vocab..(row + rows) * vocab];
                    let last = &mine[(rows - 1) * vocab..];
                    let tok = sample(last, &s.req.sampling, &mut s.rng);
                    (tok, s.req.return_logits.then(|| mine.to_vec()))
                }
            };
            row += rows;
            s.cached = s.tokens.len();
            s.tokens.push(tok);
            let out = self
                .outputs
                .get_mut(&s.id)
                .ok_or_else(|| Error::Request("lost".into()))?;
            out.output.push(tok);
            events.push(Event::Token {
                id: s.id,
                token: tok,
                logits,
            });
            let eos = !s.req.ignore_eos && self.cfg.eos_token_ids.contains(&tok);
            let reason = if eos {
                Some(FinishReason::Eos)
            } else if out.output.len() >= s.max_new {
                Some(FinishReason::Length)
            } else {
                None
            };
            if let Some(r) = reason {
                out.finish = Some(r);
                events.push(Event::Finished {
                    id: s.id,
                    reason: r,
                });
                finished.push(i);
            }
        }
        self.sched.retire(&finished);
        self.history.push(StepRecord {
            step: self.step_no,
            start,
            end: Instant::now(),
            tokens: plan.num_tokens(),
        });
        self.step_no += 1;
        self.collect_reconfig_events();
        Ok(events)
    }

    /// Sends `plan` to every worker and gathers what the head sends: the logits
    /// `[rows, vocab]` in vocab order, or each row's greedy token.
    fn run_plan(&mut self, plan: &Arc<StepPlan>) -> Result<HeadResult> {
        let pool = &self.pool;
        if let Ok(mut cur) = pool.ctrl.current_plan.lock() {
            *cur = Some(plan.clone());
        }
        if let Some(last) = self.history.last() {
            pool.ctrl
                .set_step_ms(last.end.duration_since(last.start).as_secs_f64() * 1e3);
        }
        // Logits of earlier steps that failed (here or in a worker) are stale; none can
        // still come, as every worker replied to those steps.
        pool.driver.drop_steps_before(plan.step);
        // The driver decides the embedding's group; workers decide the rest as they go.
        pool.live.group_for(plan.step, Segment::Embed, true)?;
        for (w, tx) in pool.cmd.iter().enumerate() {
            tx.send(Cmd::Step(plan.clone()))
                .map_err(|_| Error::Worker {
                    worker: w,
                    msg: "worker exited".into(),
                })?;
        }
        if let Err(e) = pool.collect_replies(pool.cmd.len(), false) {
            if let Some(first) = pool.coll.as_ref().and_then(Collectives::aborted) {
                let why = format!(
                    "step {} failed with workers on several GPUs ({e}); their communicators \
                     were aborted ({first}; a peer could otherwise wait on its GPU forever), \
                     so the engine cannot serve until Engine::restart",
                    plan.step
                );
                self.broken = Some(why.clone());
                return Err(Error::Device(why));
            }
            if let Some(m) = self.shard_mismatch() {
                let why = format!(
                    "{m}: a flip did not complete in step {} ({e}); the engine cannot \
                     serve until Engine::restart",
                    plan.step
                );
                self.broken = Some(why.clone());
                return Err(Error::Reconfig(why));
            }
            return Err(e);
        }
        let rows = plan.logit_rows().len();
        let vocab = self.cfg.vocab_size;
        let head = pool.live.group_for(plan.step, Segment::Head, false)?;
        let head = &head.group;
        if plan.head == HeadOutput::Argmax {
            let mut parts = Vec::with_capacity(head.len());
            for (r, w) in head.workers().iter().enumerate() {
                let part = pool.driver.recv(w.0, Tag::Logits(plan.step))?;
                parts.push((crate::parallel::split_range(vocab, head.len(), r), part));
            }
            return Ok(HeadResult::Tokens(merge_picks(&parts, rows)?));
        }
        if let [w] = head.workers() {
            // One slice is the whole vocabulary: its rows are the logits.
            let part = pool.driver.recv(w.0, Tag::Logits(plan.step))?;
            if part.len() != rows * vocab {
                return Err(Error::Comm(format!(
                    "logits from {w}: {} floats, expected {}",
                    part.len(),
                    rows * vocab
                )));
            }
            check_logits(&part, vocab)?;
            return Ok(HeadResult::Logits(part));
        }
        let mut logits = vec![0.0f32; rows * vocab];
        for (r, w) in head.workers().iter().enumerate() {
            let part = pool.driver.recv(w.0, Tag::Logits(plan.step))?;
            let vr = crate::parallel::split_range(vocab, head.len(), r);
            if part.len() != rows * vr.len() {
                return Err(Error::Comm(format!(
                    "logits from {w}: {} floats, expected {}",
                    part.len(),
                    rows * vr.len()
                )));
            }
            for i in 0..rows {
                logits[i * vocab + vr.start..i * vocab + vr.end]
                    .copy_from_slice(&part[i * vr.len()..(i + 1) * vr.len()]);
            }
        }
        check_logits(&logits, vocab)?;
        Ok(HeadResult::Logits(logits))
    }

    /// Why the engine refuses to serve until [`Engine::restart`] (a flip that did not
    /// complete left a worker's shards inconsistent with the placement), if it does.
    pub fn broken_reason(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// Workers on several GPUs whose communicators a copy thread aborted (a reshard
    /// job failed after its peers had queued their side): the engine is broken.
    fn note_aborted_communicators(&mut self) {
        if self.broken.is_some() {
            return;
        }
        if let Some(why) = self.pool.coll.as_ref().and_then(Collectives::aborted) {
            self.broken = Some(format!(
                "the communicators between GPUs were aborted ({why}): the engine cannot \
                 serve until Engine::restart"
            ));
        }
    }

    /// Refuses work once a failed step left the workers inconsistent with the placement.
    fn serving(&self) -> Result<()> {
        match &self.broken {
            Some(why) => Err(Error::Reconfig(why.clone())),
            None => Ok(()),
        }
    }

    /// The first member of a group of the placement whose resident shard is not the one
    /// the group asks of it (what every worker checks before running a segment).
    fn shard_mismatch(&self) -> Option<String> {
        let p = self.pool.live.snapshot();
        for seg in p.segments() {
            let g = p.group(seg);
            for (i, w) in g.workers().iter().enumerate() {
                let held = self.pool.mems.get(w.0).and_then(|m| {
                    m.shard(seg).map(|s| (s.group_size, s.index)).or_else(|| {
                        let d = m.dev_shards.read().ok()?;
                        d.get(&seg).map(|s| (s.group_size, s.index))
                    })
                });
                if held != Some((g.len(), i)) {
                    let held = held.map_or("nothing".into(), |(n, j)| format!("shard {j}/{n}"));
                    return Some(format!(
                        "{w} holds {held} of {seg} but the placement runs it as {i}/{}",
                        g.len()
                    ));
                }
            }
        }
        None
    }

    /// Steps until every request has finished (and any switch in flight has completed);
    /// returns all events in order.
    pub fn run_to_completion(&mut self) -> Result<Vec<Event>> {
        let mut all = Vec::new();
        while self.has_work() || self.reconfig_in_progress() {
            let ev = self.step()?;
            if ev.is_empty() && self.sched.running.is_empty() && !self.sched.waiting.is_empty() {
                return Err(Error::Request("waiting requests cannot be admitted".into()));
            }
            all.extend(ev);
        }
        Ok(all)
    }

    // ---- Reconfiguration -------------------------------------------------------------

    /// Bytes one element (weight or KV) takes on the copy lane: 2 where device workers
    /// hand bf16 device buffers over (same-device exchange), 4 where pieces travel as
    /// host f32 (the CPU backend, host-staged device exchange).
    pub fn reshard_elem_bytes(&self) -> u64 {
        match (self.econf.device, self.econf.exchange) {
            (DeviceKind::Cpu, _) | (_, Exchange::HostStaged) => std::mem::size_of::<f32>() as u64,
            (_, Exchange::SameDevice) => std::mem::size_of::<half::bf16>() as u64,
        }
    }

    /// Bytes of one KV head (K and V) cached per layer now: what the planner weighs.
    fn kv_bytes_per_head(&self) -> Vec<u64> {
        let tokens: usize = self.sched.running.iter().map(|s| s.cached).sum();
        let b = (tokens * self.cfg.head_dim * 2) as u64 * self.reshard_elem_bytes();
        vec![b; self.cfg.num_layers]
    }

    /// The plan a switch to `target` would follow now (assignment, transfers, totals).
    pub fn plan_reconfigure(&self, target: Topology) -> Result<(Placement, ReshardPlan)> {
        target.validate(&self.cfg)?;
        plan_topology(
            &self.cfg,
            &self.placement(),
            target,
            self.n_workers,
            self.reshard_elem_bytes(),
            &self.kv_bytes_per_head(),
        )
    }

    /// Starts an online switch to `target` and returns at once: weights and KV move on
    /// the copy threads while steps go on, each segment flips as soon as its data is in
    /// place, at most a window of segments (default 2) in flight. Refused with
    /// [`Error::Reconfig`] while another switch runs; progress is reported by
    /// [`Engine::reconfig_events`].
    pub fn reconfigure(&mut self, target: Topology) -> Result<()> {
        self.reconfigure_with(target, &ReconfigOptions::default())
    }

    pub fn reconfigure_with(&mut self, target: Topology, opts: &ReconfigOptions) -> Result<()> {
        self.note_aborted_communicators();
        self.serving()?;
        if self.pool.ctrl.is_active() {
            return Err(Error::Reconfig(
                "a switch is already in progress; wait for it to finish".into(),
            ));
        }
        let (placement, plan) = self.plan_reconfigure(target)?;
        self.device_supports(target)?;
        self.pool.add_communicators(&placement)?;
        // Pre-copies started now cover every cached position of the running requests
        // (not the last step's plan, which may list finished ones).
        self.publish_cached_lengths();
        self.pool.ctrl.start(plan, opts, self.step_no)?;
        self.collect_reconfig_events();
        Ok(())
    }

    /// Stop-the-world baseline: pauses decoding, moves every segment's data (all
    /// segments at once, same executor), flips everything, then returns.
    pub fn reconfigure_stop_the_world(&mut self, target: Topology) -> Result<()> {
        self.note_aborted_communicators();
        self.serving()?;
        if self.pool.ctrl.is_active() {
            return Err(Error::Reconfig("a switch is already in progress".into()));
        }
        let (placement, plan) = self.plan_reconfigure(target)?;
        self.device_supports(target)?;
        self.pool.add_communicators(&placement)?;
        let n = plan.segments.len();
        // Pre-copy the KV of every cached position: nothing is appended until we resume.
        self.publish_cached_lengths();
        let opts = ReconfigOptions {
            window: n.max(1),
            lookahead: 0,
            ..Default::default()
        };
        self.pool.ctrl.start(plan, &opts, self.step_no)?;
        while self.pool.ctrl.is_active() && !self.pool.live.all_ready() {
            std::thread::sleep(Duration::from_micros(200));
        }
        // An empty step performs the flips.
        while self.pool.ctrl.is_active() {
            self.flip_step()?;
        }
        let before = self.reconfig_log.len();
        self.collect_reconfig_events();
        // A switch that aborted left the engine serving on a valid (mixed) placement,
        // but the caller asked for `target`: say so rather than return Ok.
        if let Some(ReconfigEvent::Aborted {
            error, placement, ..
        }) = self.reconfig_log[before..]
            .iter()
            .rev()
            .find(|e| matches!(e, ReconfigEvent::Aborted { .. }))
        {
            return Err(Error::Reconfig(format!(
                "stop-the-world switch to {target} aborted ({error}); serving on {placement}"
            )));
        }
        Ok(())
    }

    /// Device workers' attention kernels need whole GQA groups per rank: a target that
    /// splits one is refused before anything moves.
    fn device_supports(&self, target: Topology) -> Result<()> {
        if self.econf.device != DeviceKind::Cpu {
            for r in 0..target.tp {
                check_heads(&self.cfg, target.tp, r)?;
            }
        }
        Ok(())
    }

    /// Restart baseline: tears the workers down, loads the checkpoint in `target`'s
    /// layout, and re-prefills every live request from its prompt and the tokens
    /// generated so far (its KV cache is lost with the old workers).
    pub fn restart(&mut self, target: Topology) -> Result<()> {
        target.validate(&self.cfg)?;
        self.note_aborted_communicators();
        // (A broken engine's switch dies with its workers.)
        if self.pool.ctrl.is_active() && self.broken.is_none() {
            return Err(Error::Reconfig("a switch is in progress".into()));
        }
        let n_workers = self.n_workers.max(target.world_size());
        let placement = Placement::static_topology(target, &self.cfg)?;
        self.collect_reconfig_events();
        if let (true, Some(why)) = (self.pool.ctrl.is_active(), &self.broken) {
            // The broken switch ends with its workers: its log says so.
            self.reconfig_log.push(ReconfigEvent::Aborted {
                step: self.step_no,
                error: why.clone(),
                placement: self.pool.live.snapshot().describe(),
            });
        }
        self.pool.shutdown();
        self.pool = Pool::spawn(
            &self.cfg,
            &self.source,
            n_workers,
            self.geom,
            &placement,
            &self.econf,
        )?;
        self.n_workers = n_workers;
        self.broken = None;
        for s in &mut self.sched.running {
            s.cached = 0;
        }
        Ok(())
    }

    /// A plan with no new tokens: every running sequence at its cached length.
    fn empty_plan(&self) -> Arc<StepPlan> {
        let seqs = self
            .sched
            .running
            .iter()
            .map(|s| SeqWork {
                id: s.id.0,
                tokens: Vec::new(),
                start_pos: s.cached,
                block_table: s.blocks.clone(),
                all_logits: false,
            })
            .collect();
        Arc::new(StepPlan {
            step: self.step_no,
            live: self.pool.live.clone(),
            seqs,
            head: HeadOutput::Logits,
            switching: self.pool.ctrl.is_active(),
        })
    }

    /// Makes the KV pre-copy see every cached position (used when no step is running).
    fn publish_cached_lengths(&self) {
        let plan = self.empty_plan();
        if let Ok(mut cur) = self.pool.ctrl.current_plan.lock() {
            *cur = Some(plan);
        }
    }

    /// A step with no tokens: lets ready segments flip without decoding.
    fn flip_step(&mut self) -> Result<()> {
        let plan = self.empty_plan();
        let _nvtx = nvtx::range_with(|| format!("step {}: flips only", plan.step));
        let r = self.run_plan(&plan);
        self.step_no += 1;
        r?;
        Ok(())
    }

    /// What the device workers' graph recording did since they started (all zero
    /// without [`EngineConfig::graphs`], on the CPU, and after a restart).
    pub fn graph_counts(&self) -> GraphCounts {
        self.pool.graphs.snapshot()
    }

    /// All-reduces posted through same-device mailboxes since the workers started (one
    /// per member and exchange; 0 without [`EngineConfig::mailboxes`], on the CPU, with
    /// workers on GPUs of their own, and after a restart).
    pub fn mailbox_posts(&self) -> u64 {
        self.pool.mail.as_ref().map_or(0, |m| m.posted())
    }

    pub fn reconfig_in_progress(&self) -> bool {
        self.pool.ctrl.is_active()
    }

    /// No switch runs and the staged buffers of an aborted one are released (the copy
    /// threads do that in the background after the abort): until then
    /// [`Engine::resident_bytes`] still counts them.
    pub fn reconfig_settled(&self) -> bool {
        self.pool.ctrl.is_settled()
    }

    /// Test hook: how the late-discard hook's waits ended so far (saw the next
    /// switch's message, timed out), see `ReconfigOptions::late_discard`.
    #[doc(hidden)]
    pub fn late_discards(&self) -> (usize, usize) {
        self.pool.ctrl.late_discards()
    }

    fn collect_reconfig_events(&mut self) {
        let events = self.pool.ctrl.take_events();
        let ended = events.iter().any(|e| {
            matches!(
                e,
                ReconfigEvent::Finished { .. } | ReconfigEvent::Aborted { .. }
            )
        });
        self.reconfig_log.extend(events);
        // A switch over (called between steps): the communicators of groups the
        // placement no longer uses go.
        if ended && !self.pool.ctrl.is_active() {
            let placement = self.placement();
            if let Some(c) = &mut self.pool.coll {
                // (A poisoned table only keeps them: nothing is lost.)
                let _ = c.retain_placement(&placement);
            }
        }
    }

    /// Communicators of distinct multi-member groups (workers on several GPUs; 0
    /// otherwise): the current placement's, plus a running switch's target's.
    pub fn group_communicators(&self) -> usize {
        self.pool.coll.as_ref().map_or(0, |c| c.splits().len())
    }

    /// Every reconfiguration event so far (started, segment ready, flipped, finished,
    /// aborted), in order.
    pub fn reconfig_events(&mut self) -> &[ReconfigEvent] {
        self.collect_reconfig_events();
        &self.reconfig_log
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.pool.shutdown();
    }
}

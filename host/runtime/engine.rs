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
//! KV blocks for a request's whole budget (prompt + max new tokens) are reserved when it
//! is admitted, so a running request never runs out of cache; a request that does not fit
//! waits in the queue, and one that could never fit is refused at `add_request`.

use crate::backend::comm::{fabric, Comm, CommStats, Lane, Tag};
use crate::error::{Error, Result};
use crate::model::{Model, ModelConfig, TensorSource, Tokenizer};
use crate::parallel::{Placement, Topology, WorkerId};
use crate::runtime::kv_cache::{BlockAllocator, KvGeometry};
use crate::runtime::sampling::{sample, Rng, Sampling};
use crate::runtime::worker::{Cmd, Reply, SeqWork, StepPlan, Worker, WorkerMem};
use crossbeam_channel::{unbounded, Receiver, Sender};
use std::collections::{HashMap, VecDeque};
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

struct Seq {
    id: RequestId,
    req: Request,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    /// Tokens whose KV is in the cache.
    cached: usize,
    blocks: Arc<Vec<u32>>,
    rng: Rng,
    max_new: usize,
}

/// Timing of one step, for benches and the reconfiguration report.
#[derive(Debug, Clone, Copy)]
pub struct StepRecord {
    pub step: u64,
    pub start: Instant,
    pub end: Instant,
    pub tokens: usize,
}

pub struct Engine {
    cfg: Arc<ModelConfig>,
    econf: EngineConfig,
    name: String,
    tokenizer: Arc<Tokenizer>,
    pub(crate) source: Arc<dyn TensorSource>,
    placement: Arc<Placement>,
    geom: KvGeometry,
    cmd: Vec<Sender<Cmd>>,
    replies: Receiver<Reply>,
    driver: Comm,
    /// Copy-lane endpoints, handed to the reshard executor's copy threads.
    pub(crate) copy_comms: Vec<Option<Comm>>,
    pub(crate) mems: Vec<Arc<WorkerMem>>,
    stats: Arc<CommStats>,
    threads: Vec<JoinHandle<()>>,
    blocks: BlockAllocator,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    outputs: HashMap<RequestId, RequestOutput>,
    next_id: u64,
    step_no: u64,
    history: Vec<StepRecord>,
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
        let placement = Arc::new(Placement::static_topology(topo, &cfg)?);
        let geom = KvGeometry {
            num_blocks: econf.kv_blocks,
            block_size: econf.block_size,
            head_dim: cfg.head_dim,
        };
        let (compute, copy, stats) = fabric(n_workers, econf.comm_timeout);
        let mut compute: Vec<Option<Comm>> = compute.into_iter().map(Some).collect();
        let driver = compute[n_workers].take().ok_or_else(|| Error::Comm("no driver".into()))?;
        let (reply_tx, replies) = unbounded();
        let mut cmd = Vec::new();
        let mut mems = Vec::new();
        let mut threads = Vec::new();
        for (w, slot) in compute.iter_mut().enumerate().take(n_workers) {
            let comm = slot.take().ok_or_else(|| Error::Comm("endpoint taken".into()))?;
            let mem = Arc::new(WorkerMem::default());
            let worker = Worker::new(
                WorkerId(w),
                cfg.clone(),
                model.source.clone(),
                mem.clone(),
                comm,
                geom,
            );
            let (tx, rx) = unbounded();
            let rtx = reply_tx.clone();
            let h = std::thread::Builder::new()
                .name(format!("remp-worker-{w}"))
                .spawn(move || worker.run(rx, rtx))
                .map_err(|e| Error::Worker {
                    worker: w,
                    msg: format!("cannot start thread: {e}"),
                })?;
            cmd.push(tx);
            mems.push(mem);
            threads.push(h);
        }
        let mut engine = Engine {
            cfg,
            name: model.name.clone(),
            tokenizer: model.tokenizer.clone(),
            source: model.source.clone(),
            placement: placement.clone(),
            geom,
            cmd,
            replies,
            driver,
            copy_comms: copy.into_iter().map(Some).collect(),
            mems,
            stats,
            threads,
            blocks: BlockAllocator::new(econf.kv_blocks),
            econf,
            waiting: VecDeque::new(),
            running: Vec::new(),
            outputs: HashMap::new(),
            next_id: 0,
            step_no: 0,
            history: Vec::new(),
        };
        for tx in &engine.cmd {
            tx.send(Cmd::Load(placement.clone()))
                .map_err(|_| Error::Worker { worker: 0, msg: "worker exited".into() })?;
        }
        engine.collect_replies(n_workers, true)?;
        Ok(engine)
    }

    fn collect_replies(&self, n: usize, load: bool) -> Result<()> {
        let mut first_err = None;
        for _ in 0..n {
            let r = self
                .replies
                .recv()
                .map_err(|_| Error::Worker { worker: usize::MAX, msg: "all workers exited".into() })?;
            let res = match r {
                Reply::Loaded(_, r) if load => r,
                Reply::StepDone(_, r) if !load => r,
                _ => Err(Error::Worker { worker: usize::MAX, msg: "unexpected reply".into() }),
            };
            if let Err(e) = res {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
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

    pub fn placement(&self) -> &Arc<Placement> {
        &self.placement
    }

    /// The current placement's name (`tp2pp2`, or `mixed[...]` mid-switch).
    pub fn topology_name(&self) -> String {
        self.placement.describe()
    }

    pub fn num_workers(&self) -> usize {
        self.cmd.len()
    }

    pub fn comm_stats(&self) -> &Arc<CommStats> {
        &self.stats
    }

    /// Bytes sent between endpoints on the compute lane so far.
    pub fn compute_bytes(&self) -> u64 {
        self.stats.total(Lane::Compute)
    }

    /// Per-worker resident bytes (weights + KV).
    pub fn worker_bytes(&self) -> Vec<usize> {
        self.mems.iter().map(|m| m.bytes()).collect()
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
        self.blocks.free()
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
        if let Sampling::Random { temperature, top_p, .. } = req.sampling {
            if !(temperature > 0.0 && temperature.is_finite()) || !(top_p > 0.0 && top_p <= 1.0)
            {
                return Err(Error::Request(format!(
                    "sampling needs temperature > 0 and 0 < top_p <= 1 (got {temperature}, {top_p})"
                )));
            }
        }
        let max_new = req.max_new_tokens.min(ctx - req.prompt.len());
        let need = self.geom.blocks_for(req.prompt.len() + max_new);
        if need > self.blocks.total() {
            return Err(Error::Request(format!(
                "request needs {need} KV blocks ({} tokens), the cache has {} in all",
                req.prompt.len() + max_new,
                self.blocks.total()
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
        self.waiting.push_back(Seq {
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
        let seq = if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            self.waiting.remove(i)
        } else if let Some(i) = self.running.iter().position(|s| s.id == id) {
            Some(self.running.remove(i))
        } else {
            None
        };
        match seq {
            Some(s) => {
                self.blocks.release(&s.blocks);
                if let Some(o) = self.outputs.get_mut(&id) {
                    o.finish = Some(FinishReason::Cancelled);
                }
                true
            }
            None => false,
        }
    }

    pub fn output(&self, id: RequestId) -> Option<&RequestOutput> {
        self.outputs.get(&id)
    }

    /// Whether any request is waiting or running.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Admits waiting requests (FIFO) while KV blocks, the running limit and the prefill
    /// budget allow.
    fn admit(&mut self) {
        let mut prefill = 0;
        while let Some(s) = self.waiting.front() {
            let n = s.tokens.len();
            if self.running.len() >= self.econf.max_running
                || (prefill > 0 && prefill + n > self.econf.max_prefill_tokens)
            {
                break;
            }
            let need = self.geom.blocks_for(n + s.max_new);
            let Some(blocks) = self.blocks.alloc(need) else {
                break;
            };
            let Some(mut s) = self.waiting.pop_front() else {
                break;
            };
            s.blocks = Arc::new(blocks);
            prefill += n;
            self.running.push(s);
        }
    }

    /// Runs one step: admits what fits, prefills new requests and decodes one token of
    /// every running one. Returns the tokens produced and the requests finished.
    pub fn step(&mut self) -> Result<Vec<Event>> {
        self.admit();
        if self.running.is_empty() {
            return Ok(Vec::new());
        }
        let start = Instant::now();
        let seqs: Vec<SeqWork> = self
            .running
            .iter()
            .map(|s| SeqWork {
                tokens: s.tokens[s.cached..].to_vec(),
                start_pos: s.cached,
                block_table: s.blocks.clone(),
                all_logits: s.req.return_logits,
            })
            .collect();
        let plan = Arc::new(StepPlan {
            step: self.step_no,
            placement: self.placement.clone(),
            seqs,
        });
        let logits = self.run_plan(&plan)?;
        let vocab = self.cfg.vocab_size;

        let mut events = Vec::new();
        let mut row = 0;
        let mut finished = Vec::new();
        for (i, s) in self.running.iter_mut().enumerate() {
            let n = plan.seqs[i].tokens.len();
            let rows = if s.req.return_logits { n } else { 1 };
            let mine = &logits[row * vocab..(row + rows) * vocab];
            row += rows;
            let last = &mine[(rows - 1) * vocab..];
            let tok = sample(last, &s.req.sampling, &mut s.rng);
            s.cached = s.tokens.len();
            s.tokens.push(tok);
            let out = self.outputs.get_mut(&s.id).ok_or_else(|| Error::Request("lost".into()))?;
            out.output.push(tok);
            events.push(Event::Token {
                id: s.id,
                token: tok,
                logits: s.req.return_logits.then(|| mine.to_vec()),
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
                events.push(Event::Finished { id: s.id, reason: r });
                finished.push(i);
            }
        }
        for &i in finished.iter().rev() {
            let s = self.running.remove(i);
            self.blocks.release(&s.blocks);
        }
        self.history.push(StepRecord {
            step: self.step_no,
            start,
            end: Instant::now(),
            tokens: plan.num_tokens(),
        });
        self.step_no += 1;
        Ok(events)
    }

    /// Sends `plan` to its workers and gathers the logits `[rows, vocab]` in vocab order.
    fn run_plan(&mut self, plan: &Arc<StepPlan>) -> Result<Vec<f32>> {
        let workers = plan.placement.workers();
        for w in &workers {
            self.cmd[w.0]
                .send(Cmd::Step(plan.clone()))
                .map_err(|_| Error::Worker { worker: w.0, msg: "worker exited".into() })?;
        }
        let res = self.collect_replies(workers.len(), false);
        if let Err(e) = res {
            self.driver.drain();
            return Err(e);
        }
        let rows = plan.logit_rows().len();
        let vocab = self.cfg.vocab_size;
        let head = &plan.placement.head;
        let mut logits = vec![0.0f32; rows * vocab];
        for (r, w) in head.workers().iter().enumerate() {
            let part = self.driver.recv(w.0, Tag::Logits)?;
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
        Ok(logits)
    }

    /// Steps until every request has finished; returns all events in order.
    pub fn run_to_completion(&mut self) -> Result<Vec<Event>> {
        let mut all = Vec::new();
        while self.has_work() {
            let ev = self.step()?;
            if ev.is_empty() && self.running.is_empty() && !self.waiting.is_empty() {
                return Err(Error::Request("waiting requests cannot be admitted".into()));
            }
            all.extend(ev);
        }
        Ok(all)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        for tx in &self.cmd {
            let _ = tx.send(Cmd::Shutdown);
        }
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

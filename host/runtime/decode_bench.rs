//! Decode-step bench (`remp bench-decode`): the median time of a decode step against the
//! floor no decode step can beat — reading every weight once — measured on the same
//! device in the same run:
//! - CUDA: weight bytes (bf16) ÷ HBM bandwidth of `cuMemcpyDtoD` (bytes read plus
//!   written, as `../shared/GPU.md` counts them; a decode step only reads weights);
//! - CPU: weight bytes (f32, as the CPU backend holds them) ÷ single-thread `memcpy`
//!   bandwidth, also counted as bytes read plus written. Only indicative: a read-only
//!   stream (what a decode step does) runs somewhat faster than a copy on most CPUs,
//!   so a step can come in under this "floor";
//! - emulator: the CPU's figure (the emulator is for checking, not for speed).
//!
//! All ranks of a topology share one device here (several workers on one GPU, or the
//! host's cores), so the floor is the bytes a decode step must read — every layer, the
//! final norm and the LM head; not the embedding table, of which a step reads only its
//! tokens' rows (unless it is tied to the LM head) — over one device's bandwidth.

use crate::backend::device::graph::GraphCounts;
use crate::backend::device::Exchange;
use crate::error::{Error, Result};
use crate::model::{Model, ModelConfig};
use crate::parallel::Topology;
use crate::reshard::bench::add_synthetic_requests;
use crate::runtime::{DeviceKind, Engine, EngineConfig, Event};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct DecodeBenchConfig {
    pub topology: Topology,
    pub device: DeviceKind,
    /// Sequences decoding together.
    pub batch: usize,
    pub prompt_len: usize,
    /// Decode steps timed (after `warmup` untimed ones).
    pub steps: usize,
    pub warmup: usize,
    /// How device ranks exchange partials and hand-offs.
    pub exchange: Exchange,
    /// Replay repeated launch runs as graphs ([`EngineConfig::graphs`]).
    pub graphs: bool,
    /// Programmatic dependent launch ([`EngineConfig::pdl`]).
    pub pdl: bool,
    /// Same-device all-reduces through mailboxes ([`EngineConfig::mailboxes`]).
    pub mailboxes: bool,
}

impl DecodeBenchConfig {
    pub fn new(topology: Topology, device: DeviceKind) -> Self {
        DecodeBenchConfig {
            topology,
            device,
            batch: 1,
            prompt_len: 32,
            steps: 32,
            warmup: 4,
            exchange: Exchange::default(),
            graphs: false,
            pdl: false,
            mailboxes: true,
        }
    }
}

/// The most sequences `bench-decode` decodes together ([`DecodeBenchConfig::batch`]):
/// more is refused rather than sizing a KV cache (and a prefill) for them.
pub const MAX_BATCH: usize = 1024;

impl DecodeBenchConfig {
    /// Checks what needs no model: a batch of 1 to [`MAX_BATCH`] sequences, at least
    /// one timed step, a non-empty synthetic prompt.
    pub fn validate(&self) -> Result<()> {
        if self.batch == 0 || self.steps == 0 {
            return Err(Error::Request(
                "bench-decode needs --batch and --steps of at least 1".into(),
            ));
        }
        if self.batch > MAX_BATCH {
            return Err(Error::Request(format!(
                "bench-decode --batch {}: at most {MAX_BATCH} sequences",
                self.batch
            )));
        }
        if self.prompt_len == 0 {
            return Err(Error::Request(
                "bench-decode: the synthetic prompt needs at least 1 token".into(),
            ));
        }
        Ok(())
    }

    /// Tokens each sequence reaches: the synthetic prompt, the prefill's token, the
    /// warm-up steps and the timed steps (`None` on overflow).
    fn tokens_per_seq(&self) -> Option<usize> {
        self.prompt_len
            .checked_add(self.warmup)?
            .checked_add(self.steps)?
            .checked_add(1)
    }

    /// [`validate`](Self::validate), then that every sequence fits the model's context
    /// (`max_position_embeddings`): else a timed step would decode nothing. Checked
    /// before anything runs, with the largest `--steps` that fits.
    pub fn check(&self, cfg: &ModelConfig) -> Result<()> {
        self.validate()?;
        let ctx = cfg.max_position_embeddings;
        let fixed = self
            .prompt_len
            .saturating_add(self.warmup)
            .saturating_add(1);
        match self.tokens_per_seq() {
            Some(n) if n <= ctx => Ok(()),
            _ => Err(Error::Request(format!(
                "bench-decode --steps {}: a {}-token synthetic prompt, {} warm-up steps and the steps timed need more than the model's context of {ctx} tokens (max_position_embeddings); at most --steps {}",
                self.steps,
                self.prompt_len,
                self.warmup,
                ctx.saturating_sub(fixed)
            ))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct DecodeBenchResult {
    pub device: String,
    pub median_step_ms: f64,
    pub p90_step_ms: f64,
    pub weight_bytes: u64,
    /// Bandwidth the floor uses, bytes per second (see the module comment).
    pub bandwidth: f64,
    pub floor_ms: f64,
    /// What graph recording did over the whole run (with graphs on).
    pub graphs: Option<GraphCounts>,
    /// Whether the workers launched with programmatic dependent launch.
    pub pdl: bool,
    /// All-reduces posted through same-device mailboxes over the whole run
    /// ([`Engine::mailbox_posts`]).
    pub mailbox_posts: u64,
}

impl DecodeBenchResult {
    /// Median step over the floor (1.0 = at the bandwidth limit).
    pub fn ratio(&self) -> f64 {
        self.median_step_ms / self.floor_ms
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "device": self.device,
            "median_step_ms": self.median_step_ms,
            "p90_step_ms": self.p90_step_ms,
            "weight_bytes": self.weight_bytes,
            "bandwidth_gbs": self.bandwidth / 1e9,
            "floor_ms": self.floor_ms,
            "ratio_to_floor": self.ratio(),
            "pdl": self.pdl,
            "mailbox_posts": self.mailbox_posts,
            "graphs": self.graphs.map(|g| serde_json::json!({
                "graph_runs": g.graph_runs,
                "graph_kernels": g.graph_kernels,
                "eager_runs": g.eager_runs,
                "built": g.built,
                "evicted": g.evicted,
                "build_failures": g.build_failures,
            })),
        })
    }
}

/// Device-to-device copy bandwidth of GPU 0 (bytes read plus written per second): the
/// median of 7 timed copies of 512 MiB, after a warm-up copy.
pub fn cuda_copy_bandwidth() -> Result<f64> {
    use crate::backend::cuda::{CudaDevice, EventTimer};
    let dev = CudaDevice::open(0)?;
    let bytes = 512usize << 20;
    let (a, b) = (dev.alloc(bytes)?, dev.alloc(bytes)?);
    a.fill(0x3c)?;
    let timer = EventTimer::new(&dev)?;
    dev.copy_dtod(b.ptr(), a.ptr(), bytes)?;
    let mut ms = Vec::new();
    for _ in 0..7 {
        timer.start()?;
        dev.copy_dtod(b.ptr(), a.ptr(), bytes)?;
        ms.push(timer.stop_ms()? as f64);
    }
    ms.sort_by(|x, y| x.total_cmp(y));
    Ok(2.0 * bytes as f64 / (ms[3] * 1e-3))
}

/// Runs the bench on a fresh engine.
pub fn run(model: &Model, bc: &DecodeBenchConfig) -> Result<DecodeBenchResult> {
    let cfg = &model.config;
    bc.check(cfg)?;
    let (bandwidth, elem_bytes) = match bc.device {
        DeviceKind::Cuda => (cuda_copy_bandwidth()?, 2),
        DeviceKind::Emulated => (2.0 * crate::reshard::bench::copy_bandwidth(), 2),
        DeviceKind::Cpu => (2.0 * crate::reshard::bench::copy_bandwidth(), 4),
    };
    // Fits the context (checked above), so none of this overflows.
    let max_new = bc.warmup + bc.steps + 1;
    let per_seq = (bc.prompt_len + max_new).div_ceil(16);
    let mut econf = EngineConfig::new(bc.topology);
    econf.device = bc.device;
    econf.exchange = bc.exchange;
    econf.graphs = bc.graphs;
    econf.pdl = bc.pdl;
    econf.mailboxes = bc.mailboxes;
    econf.kv_blocks = per_seq * bc.batch;
    // every sequence admitted in the one prefill step, all decoding together after it
    econf.max_running = bc.batch;
    econf.max_prefill_tokens = bc.batch * bc.prompt_len;
    let mut engine = Engine::new(model, econf)?;
    add_synthetic_requests(
        &mut engine,
        cfg.vocab_size,
        bc.batch,
        bc.prompt_len,
        max_new,
    )?;
    engine.step()?; // prefill
    for _ in 0..bc.warmup {
        engine.step()?;
    }
    let mut ms = Vec::with_capacity(bc.steps);
    for i in 0..bc.steps {
        let t = Instant::now();
        let events = engine.step()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        let tokens = events
            .iter()
            .filter(|e| matches!(e, Event::Token { .. }))
            .count();
        if tokens != bc.batch {
            return Err(Error::Request(format!(
                "bench-decode: timed step {i} decoded {tokens} tokens, not {} (the model's context too short for the run?)",
                bc.batch
            )));
        }
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    let table = if cfg.tie_word_embeddings {
        0
    } else {
        cfg.vocab_size * cfg.hidden_size
    };
    let weight_bytes = ((cfg.num_params() - table) * elem_bytes) as u64;
    Ok(DecodeBenchResult {
        device: bc.device.name().into(),
        median_step_ms: ms[ms.len() / 2],
        p90_step_ms: ms[(ms.len() * 9 / 10).min(ms.len() - 1)],
        weight_bytes,
        bandwidth,
        floor_ms: weight_bytes as f64 / bandwidth * 1e3,
        graphs: bc.graphs.then(|| engine.graph_counts()),
        pdl: bc.pdl,
        mailbox_posts: engine.mailbox_posts(),
    })
}

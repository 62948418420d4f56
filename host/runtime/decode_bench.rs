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
//! The floor is the bytes a decode step must read — every layer, the final norm and the
//! LM head, as each rank holds them; not the embedding table, of which a step reads only
//! its tokens' rows (tied to the LM head, the head reads it whole) — over one device's
//! bandwidth. With every rank on one device (several workers on one GPU, or the host's
//! cores) that is all of them; with `--gpus N` (worker `w` on GPU `w % N`) the members
//! of a group read their shards at once on their own GPUs, so each segment (embedding,
//! layer, head: they run one after another) counts what its busiest GPU reads
//! ([`floor_bytes`]), at GPU 0's bandwidth.

use crate::backend::device::graph::GraphCounts;
use crate::backend::device::Exchange;
use crate::error::{Error, Result};
use crate::model::{Model, ModelConfig};
use crate::parallel::devices::DeviceMap;
use crate::parallel::{Placement, Segment, TensorKind, Topology};
use crate::reshard::bench::add_synthetic_requests;
use crate::runtime::worker::segment_tensors;
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
    /// GPUs the workers spread over ([`EngineConfig::gpus`]).
    pub gpus: usize,
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
            gpus: 1,
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
    /// Weight bytes a decode step reads over all ranks (the embedding table's rows
    /// aside): [`floor_bytes`] with every rank on one device.
    pub weight_bytes: u64,
    /// Of those, the bytes on the step's critical path ([`floor_bytes`] on the run's
    /// GPUs; `weight_bytes` on one device): the floor's numerator.
    pub floor_bytes: u64,
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
            "floor_bytes": self.floor_bytes,
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

/// Bytes on a decode step's critical path for `topo` with worker `w` on GPU `w % gpus`
/// (elements of `elem_bytes`): per segment, the most that one GPU's ranks read of it,
/// summed over the segments. Ranks hold their shards as the workers upload them (so a
/// replicated norm or KV projection is read by every rank that holds it); the embedding
/// table is left out (a step reads its tokens' rows), a tied LM head is read whole.
pub fn floor_bytes(cfg: &ModelConfig, topo: Topology, gpus: usize, elem_bytes: u64) -> Result<u64> {
    let p = Placement::static_topology(topo, cfg)?;
    let map = DeviceMap::round_robin(topo.world_size(), gpus)?;
    let mut total = 0u64;
    for seg in p.segments() {
        let g = p.group(seg);
        let mut per_gpu = vec![0u64; map.num_devices()];
        for (r, &w) in g.workers().iter().enumerate() {
            for k in segment_tensors(cfg, seg) {
                if seg == Segment::Embed && k == TensorKind::Embed {
                    continue;
                }
                per_gpu[map.device(w).0] += k.region(cfg, g.len(), r).len() as u64 * elem_bytes;
            }
        }
        total += per_gpu.into_iter().max().unwrap_or(0);
    }
    Ok(total)
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
    econf.gpus = bc.gpus;
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
    let weight_bytes = floor_bytes(cfg, bc.topology, 1, elem_bytes as u64)?;
    let path_bytes = floor_bytes(cfg, bc.topology, bc.gpus, elem_bytes as u64)?;
    Ok(DecodeBenchResult {
        device: bc.device.name().into(),
        median_step_ms: ms[ms.len() / 2],
        p90_step_ms: ms[(ms.len() * 9 / 10).min(ms.len() - 1)],
        weight_bytes,
        floor_bytes: path_bytes,
        bandwidth,
        floor_ms: path_bytes as f64 / bandwidth * 1e3,
        graphs: bc.graphs.then(|| engine.graph_counts()),
        pdl: bc.pdl,
        mailbox_posts: engine.mailbox_posts(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The floor's bytes: on one GPU every weight byte but the embedding table's; a
    /// pipeline over GPUs changes nothing (its stages run one after another); a tp2
    /// group on two GPUs reads half of each sharded tensor per GPU at once, and the
    /// replicated RMSNorm weights whole on both.
    #[test]
    fn floor_bytes_follow_the_gpus() {
        let cfg = Model::random_tiny().config;
        let elem = 2u64;
        let one = floor_bytes(&cfg, Topology::new(1, 1), 1, elem).unwrap();
        let table = if cfg.tie_word_embeddings {
            0
        } else {
            cfg.vocab_size * cfg.hidden_size
        };
        assert_eq!(one, (cfg.num_params() - table) as u64 * elem);
        assert_eq!(
            floor_bytes(&cfg, Topology::new(1, 2), 2, elem).unwrap(),
            one
        );
        assert_eq!(
            floor_bytes(&cfg, Topology::new(1, 2), 1, elem).unwrap(),
            one
        );
        let norms = (2 * cfg.num_layers + 1) as u64 * cfg.hidden_size as u64 * elem;
        assert!(cfg.num_kv_heads >= 2, "no replicated KV heads at tp2");
        assert_eq!(
            floor_bytes(&cfg, Topology::new(2, 1), 2, elem).unwrap(),
            (one - norms) / 2 + norms
        );
        // both ranks on one GPU: the norms twice
        assert_eq!(
            floor_bytes(&cfg, Topology::new(2, 1), 1, elem).unwrap(),
            one + norms
        );
    }
}

//! The reconfiguration benchmark behind `remp bench-reconfig`: the same workload (a few
//! live requests decoding) switched from one topology to another three ways on the same
//! engine code — online (this crate's point), stop-the-world (pause, reshard in memory,
//! resume) and restart (tear down, reload, re-prefill) — with the step timeline of each.
//!
//! A token is emitted at the end of every step, so the gaps between step ends are what a
//! client sees. `median_step_ms` is the median gap before the switch; `max_gap_ms` the
//! largest gap from the switch request until one step after it completed; `stall_ms` is
//! `max_gap_ms - median_step_ms`, clamped at 0. `median_step_after_ms` is the median gap
//! of the steps after the switch, on the new topology: where that one steps slower (on
//! one GPU, tp4pp1's four ranks launch more per token than tp2pp2's), a switch that
//! costs nothing still shows a max gap of about that step. The transfer floor is the
//! bytes through the busiest worker divided by the single-thread copy bandwidth measured
//! in the same run (on a GPU, `cuMemcpyDtoD`'s): no switch can move its data faster than
//! its busiest worker copies it.

use crate::error::{Error, Result};
use crate::model::{Model, ModelConfig};
use crate::parallel::Topology;
use crate::reshard::executor::ReconfigEvent;
use crate::runtime::{DeviceKind, Engine, EngineConfig, Request};
use serde_json::{json, Value};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Online,
    StopTheWorld,
    Restart,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Online => "online",
            Mode::StopTheWorld => "stop_the_world",
            Mode::Restart => "restart",
        }
    }
}

/// One mode's figures.
#[derive(Debug, Clone)]
pub struct SwitchMetrics {
    pub mode: Mode,
    pub stall_ms: f64,
    pub max_gap_ms: f64,
    pub median_step_ms: f64,
    /// Median gap of the steps after the switch (on the new topology).
    pub median_step_after_ms: f64,
    pub total_ms: f64,
    pub transfer_floor_ms: f64,
    pub bytes_moved: u64,
    pub peak_extra_bytes: u64,
    /// CPU time the copy threads spent (online and stop-the-world).
    pub copy_cpu_ms: f64,
    /// (time since the run started, gap since the previous token) per step, in ms.
    pub timeline: Vec<(f64, f64)>,
    /// Switch window on the timeline (ms): request to completion.
    pub window_ms: (f64, f64),
}

impl SwitchMetrics {
    pub fn to_json(&self) -> Value {
        json!({
            "stall_ms": self.stall_ms,
            "max_gap_ms": self.max_gap_ms,
            "median_step_ms": self.median_step_ms,
            "median_step_after_ms": self.median_step_after_ms,
            "total_ms": self.total_ms,
            "transfer_floor_ms": self.transfer_floor_ms,
            "bytes_moved": self.bytes_moved,
            "peak_extra_bytes": self.peak_extra_bytes,
            "copy_cpu_ms": self.copy_cpu_ms,
        })
    }
}

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub from: Topology,
    pub to: Topology,
    pub requests: usize,
    pub prompt_len: usize,
    /// Steps decoded before the switch (the steady-state baseline).
    pub warmup_steps: usize,
    /// Steps decoded after the switch completed.
    pub after_steps: usize,
    /// Layers in flight for the online switch.
    pub window: usize,
    /// Where the workers compute.
    pub device: DeviceKind,
    /// Device workers replay repeated launch runs as graphs (`EngineConfig::graphs`).
    pub graphs: bool,
    /// Device workers launch with programmatic dependent launch (`EngineConfig::pdl`).
    pub pdl: bool,
    /// GPUs the workers spread over (`EngineConfig::gpus`).
    pub gpus: usize,
}

impl BenchConfig {
    pub fn new(from: Topology, to: Topology) -> Self {
        BenchConfig {
            from,
            to,
            requests: 8,
            prompt_len: 32,
            warmup_steps: 12,
            after_steps: 6,
            window: 2,
            device: DeviceKind::Cpu,
            graphs: false,
            pdl: false,
            gpus: 1,
        }
    }
}

/// The most live requests `bench-reconfig` decodes ([`BenchConfig::requests`]): more is
/// refused rather than sizing a KV cache for them.
pub const MAX_REQUESTS: usize = 1024;

impl BenchConfig {
    /// New tokens each synthetic request asks for: the steps before the switch, after it,
    /// and room for the switch itself.
    fn max_new(&self) -> Option<usize> {
        self.warmup_steps
            .checked_add(self.after_steps)?
            .checked_add(200)
    }

    /// Checks what needs no model: 1 to [`MAX_REQUESTS`] requests, a window of at least
    /// one segment, a non-empty synthetic prompt.
    pub fn validate(&self) -> Result<()> {
        if self.requests == 0 || self.requests > MAX_REQUESTS {
            return Err(Error::Request(format!(
                "bench-reconfig --requests {}: must be 1 to {MAX_REQUESTS}",
                self.requests
            )));
        }
        if self.window == 0 {
            return Err(Error::Request(
                "bench-reconfig --window 0: at least 1 segment must be in flight".into(),
            ));
        }
        if self.prompt_len == 0 || self.max_new().is_none() {
            return Err(Error::Request(format!(
                "bench-reconfig: a synthetic prompt of {} tokens with {} + {} steps around the switch is not a workload",
                self.prompt_len, self.warmup_steps, self.after_steps
            )));
        }
        Ok(())
    }

    /// [`validate`](Self::validate), then that the bench's synthetic requests fit the
    /// model's context (`max_position_embeddings`): the prompt and a token for every
    /// step before the switch, the switch's step, and every step after it.
    pub fn check(&self, cfg: &ModelConfig) -> Result<()> {
        self.validate()?;
        let ctx = cfg.max_position_embeddings;
        let need = self
            .prompt_len
            .checked_add(self.warmup_steps)
            .and_then(|n| n.checked_add(self.after_steps))
            .and_then(|n| n.checked_add(2));
        if need.is_none_or(|n| n > ctx) {
            return Err(Error::Request(format!(
                "bench-reconfig: the bench's synthetic prompt of {} tokens, {} steps before the switch and {} after it need more than the model's context of {ctx} tokens (max_position_embeddings)",
                self.prompt_len, self.warmup_steps, self.after_steps
            )));
        }
        Ok(())
    }
}

/// Single-thread memcpy bandwidth in bytes per second (best of a few 64 MiB copies).
pub fn copy_bandwidth() -> f64 {
    let n = 16 << 20; // f32 elements: 64 MiB
    let src: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let mut dst = vec![0.0f32; n];
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(&dst);
    }
    (n * 4) as f64 / best
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Adds `n` greedy requests of `prompt_len` deterministic tokens that decode
/// `max_new` tokens each, EOS ignored: the benches' workload.
pub fn add_synthetic_requests(
    engine: &mut Engine,
    vocab: usize,
    n: usize,
    prompt_len: usize,
    max_new: usize,
) -> Result<()> {
    for r in 0..n {
        let prompt: Vec<u32> = (0..prompt_len)
            .map(|i| ((r * 131 + i * 17 + 3) % vocab) as u32)
            .collect();
        let mut req = Request::greedy(prompt, max_new);
        req.ignore_eos = true;
        // The prompt is the bench's, not the user's: say so.
        engine.add_request(req).map_err(|e| match e {
            Error::Request(msg) => Error::Request(format!("the bench's synthetic request: {msg}")),
            e => e,
        })?;
    }
    Ok(())
}

/// Runs one mode on a fresh engine and measures it.
pub fn run_mode(
    model: &Model,
    bc: &BenchConfig,
    mode: Mode,
    copy_bw: f64,
) -> Result<SwitchMetrics> {
    let cfg = &model.config;
    bc.check(cfg)?;
    // The engine stops a request at the context anyway: ask no more than fits, so the
    // KV cache is sized for what runs (the check above leaves room for the run).
    let max_new = bc
        .max_new()
        .unwrap_or(usize::MAX)
        .min(cfg.max_position_embeddings - bc.prompt_len);
    let per_seq = (bc.prompt_len + max_new).div_ceil(16);
    let mut econf = EngineConfig::new(bc.from);
    econf.workers = Some(bc.from.world_size().max(bc.to.world_size()));
    econf.kv_blocks = per_seq * bc.requests;
    // every request admitted in the one prefill step and decoding in every step after it
    econf.max_running = bc.requests;
    econf.max_prefill_tokens = bc.requests * bc.prompt_len;
    econf.device = bc.device;
    econf.graphs = bc.graphs;
    econf.pdl = bc.pdl;
    econf.gpus = bc.gpus;
    let mut engine = Engine::new(model, econf)?;
    add_synthetic_requests(
        &mut engine,
        cfg.vocab_size,
        bc.requests,
        bc.prompt_len,
        max_new,
    )?;
    let t0 = Instant::now();
    let ms = |t: Instant| t.duration_since(t0).as_secs_f64() * 1e3;
    // A timed step must decode a token of every request: if the requests reached the
    // context during a long switch, the steps after it would time an idle engine.
    let step = |engine: &mut Engine| -> Result<()> {
        let events = engine.step()?;
        let tokens = events
            .iter()
            .filter(|e| matches!(e, crate::runtime::Event::Token { .. }))
            .count();
        if tokens == bc.requests {
            Ok(())
        } else {
            Err(Error::Request(format!(
                "bench-reconfig ({}): a step decoded {tokens} tokens, not {}: the synthetic requests reached the model's context of {} tokens (use fewer steps or a larger --window)",
                mode.name(),
                bc.requests,
                cfg.max_position_embeddings
            )))
        }
    };
    let mut ends = vec![0.0f64];
    step(&mut engine)?; // prefill; its end is the first token
    ends[0] = ms(Instant::now());
    for _ in 0..bc.warmup_steps {
        step(&mut engine)?;
        ends.push(ms(Instant::now()));
    }
    let (_, plan) = engine.plan_reconfigure(bc.to)?;
    let floor_ms = plan.busiest_worker_bytes as f64 / copy_bw * 1e3;
    let switch_at = ends.len();
    let req_t = Instant::now();
    let (mut bytes_moved, mut peak_extra, mut total_ms) = (0u64, 0u64, 0.0f64);
    let mut copy_cpu_ms = 0.0;
    match mode {
        Mode::Online => {
            engine.reconfigure_with(
                bc.to,
                &crate::reshard::executor::ReconfigOptions {
                    window: bc.window,
                    lookahead: 0,
                    ..Default::default()
                },
            )?;
            while engine.reconfig_in_progress() {
                step(&mut engine)?;
                ends.push(ms(Instant::now()));
                if ends.len() > switch_at + 10_000 {
                    return Err(Error::Reconfig("online switch does not finish".into()));
                }
            }
        }
        Mode::StopTheWorld => engine.reconfigure_stop_the_world(bc.to)?,
        Mode::Restart => {
            engine.restart(bc.to)?;
            // The first step after a restart re-prefills every live request.
            step(&mut engine)?;
            ends.push(ms(Instant::now()));
            total_ms = req_t.elapsed().as_secs_f64() * 1e3;
            // the checkpoint loaded again: f32 on the CPU backend, bf16 on a device
            let elem = if bc.device == DeviceKind::Cpu { 4 } else { 2 };
            bytes_moved = (cfg.num_params() * elem) as u64;
        }
    }
    let done_t = ms(Instant::now());
    for e in engine.reconfig_events() {
        match e {
            ReconfigEvent::Finished {
                total_ms: t,
                bytes_moved: b,
                peak_extra_bytes: p,
                ..
            } => {
                total_ms = *t;
                bytes_moved = *b;
                peak_extra = *p;
            }
            ReconfigEvent::SegmentReady { copy_cpu_ms: c, .. } => copy_cpu_ms += c,
            ReconfigEvent::Aborted { error, .. } => {
                return Err(Error::Reconfig(format!(
                    "{} switch aborted: {error}",
                    mode.name()
                )))
            }
            _ => {}
        }
    }
    if mode == Mode::StopTheWorld {
        total_ms = req_t.elapsed().as_secs_f64() * 1e3;
    }
    if engine.topology_name() != bc.to.to_string() {
        return Err(Error::Reconfig(format!(
            "{} ended on {}, not {}",
            mode.name(),
            engine.topology_name(),
            bc.to
        )));
    }
    let last_switch_step = ends.len();
    for _ in 0..bc.after_steps {
        step(&mut engine)?;
        ends.push(ms(Instant::now()));
    }
    let gaps: Vec<f64> = ends.windows(2).map(|w| w[1] - w[0]).collect();
    // Steady state: decode steps before the switch (the first gap follows the prefill).
    let mut steady: Vec<f64> = gaps[1..switch_at - 1].to_vec();
    let median_step_ms = median(&mut steady);
    // After it: the steps that follow the one that completed it.
    let mut after: Vec<f64> = gaps[last_switch_step.min(gaps.len())..].to_vec();
    let median_step_after_ms = if after.is_empty() {
        f64::NAN
    } else {
        median(&mut after)
    };
    // Gaps from the last token before the request to one step after completion.
    let hi = (last_switch_step).min(gaps.len());
    let max_gap_ms = gaps[switch_at - 1..hi.max(switch_at)]
        .iter()
        .copied()
        .fold(0.0, f64::max);
    let timeline = ends
        .iter()
        .zip(std::iter::once(0.0).chain(gaps.iter().copied()))
        .map(|(&t, g)| (t, g))
        .collect();
    Ok(SwitchMetrics {
        mode,
        stall_ms: (max_gap_ms - median_step_ms).max(0.0),
        max_gap_ms,
        median_step_ms,
        median_step_after_ms,
        total_ms,
        transfer_floor_ms: floor_ms,
        bytes_moved,
        peak_extra_bytes: peak_extra,
        copy_cpu_ms,
        timeline,
        window_ms: (ms(req_t), done_t),
    })
}

/// Draws step latency over time for each mode, switch windows shaded: one panel per
/// mode, a stem per token (its height the gap since the previous token), the steady
/// median dashed. Time runs from the first decoded token (the prefill is left out).
pub fn plot_svg(runs: &[SwitchMetrics]) -> String {
    let (w, pad, panel_h) = (900.0, 50.0, 150.0);
    let h = pad + runs.len() as f64 * panel_h;
    let mut s = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='11'>\n<rect width='100%' height='100%' fill='white'/>\n"
    );
    let colors = ["#1f77b4", "#d62728", "#2ca02c"];
    for (i, r) in runs.iter().enumerate() {
        let top = pad / 2.0 + i as f64 * panel_h;
        let base = top + panel_h - 30.0;
        let t0 = r.timeline.first().map(|x| x.0).unwrap_or(0.0);
        let t1 = r.timeline.last().map(|x| x.0).unwrap_or(1.0).max(t0 + 1.0);
        let gmax = r.timeline.iter().skip(1).map(|x| x.1).fold(1e-9, f64::max) * 1.1;
        let x = |t: f64| pad + (t - t0) / (t1 - t0) * (w - 2.0 * pad);
        let y = |g: f64| base - g / gmax * (panel_h - 50.0);
        s += &format!(
            "<rect x='{:.1}' y='{:.1}' width='{:.1}' height='{:.1}' fill='#f5d76e' opacity='0.5'/>\n",
            x(r.window_ms.0.max(t0)),
            y(gmax),
            (x(r.window_ms.1) - x(r.window_ms.0.max(t0))).max(1.0),
            base - y(gmax)
        );
        for &(t, g) in r.timeline.iter().skip(1) {
            s += &format!(
                "<line x1='{0:.1}' y1='{1:.1}' x2='{0:.1}' y2='{2:.1}' stroke='{3}' stroke-width='2'/>\n",
                x(t),
                base,
                y(g),
                colors[i % 3]
            );
        }
        s += &format!(
            "<line x1='{pad}' y1='{0:.1}' x2='{1:.1}' y2='{0:.1}' stroke='gray' stroke-dasharray='4 3'/>\n",
            y(r.median_step_ms),
            w - pad
        );
        s += &format!(
            "<line x1='{pad}' y1='{base:.1}' x2='{:.1}' y2='{base:.1}' stroke='black'/>\n",
            w - pad
        );
        s += &format!(
            "<text x='{pad}' y='{:.1}'>{}: gap between tokens (ms; top {:.0}); max gap {:.1}, median step {:.1} (dashed), switch shaded</text>\n",
            top + 12.0,
            r.mode.name(),
            gmax,
            r.max_gap_ms,
            r.median_step_ms
        );
        s += &format!(
            "<text x='{pad}' y='{:.1}'>0 ms</text><text x='{:.1}' y='{:.1}' text-anchor='end'>{:.0} ms since the first token</text>\n",
            base + 14.0,
            w - pad,
            base + 14.0,
            t1 - t0
        );
    }
    s += "</svg>\n";
    s
}

//! The `remp` command line: `generate` runs prompts as one continuously batched job on a
//! chosen topology. Every error is one line on stderr and exit status 2.

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use remp::backend::device::Exchange;
use remp::model::{Model, ModelConfig};
use remp::parallel::devices::{
    device_loads, kv_blocks_cap, kv_blocks_on_devices, kv_reserve_bytes, DeviceId, DeviceMap,
    DeviceMemory,
};
use remp::parallel::{Placement, Topology};
use remp::reshard::bench::{copy_bandwidth, plot_svg, run_mode, BenchConfig, Mode, SwitchMetrics};
use remp::reshard::executor::ReconfigEvent;
use remp::reshard::planner::plan_topology;
use remp::runtime::{DeviceKind, Engine, EngineConfig, Request, Sampling};
use remp::{Error, Result};
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "remp",
    version,
    about = "Serve Llama-family models with TP x PP that can change while serving"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate continuations of one or more prompts, batched together.
    Generate(GenerateArgs),
    /// Show the reshard plan between two topologies: assignment, transfers, totals.
    Plan(PlanArgs),
    /// Compare online, stop-the-world and restart switches on the same workload.
    BenchReconfig(BenchArgs),
    /// Time decode steps against the weights-read-once floor (bytes ÷ bandwidth
    /// measured in the same run on the same device).
    BenchDecode(BenchDecodeArgs),
}

#[derive(clap::Args)]
struct BenchDecodeArgs {
    /// Checkpoint directory (default: a built-in random model: 111M parameters on the
    /// CPU, 1.1B with --device cuda, remp-tiny's shape with --device emu).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    tp: usize,
    #[arg(long, default_value_t = 1)]
    pp: usize,
    /// Sequences decoding together (1 to 1024).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Decode steps timed (at least 1). Each sequence holds a 32-token synthetic prompt,
    /// 4 warm-up steps and the timed steps: together at most the model's context
    /// (max_position_embeddings), checked before anything runs.
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// Device: cpu (default), cuda, or emu.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// How device ranks exchange partial sums and hand-offs: same-device (device
    /// buffers + a reduce kernel, the default; decode-sized all-reduces through each
    /// group's mailbox), same-device-copies (the same, but a buffer handed to the peers
    /// at every exchange: the baseline of the mailboxes) or host (staged through host
    /// memory). Needs --device cuda or emu.
    #[arg(long)]
    exchange: Option<String>,
    /// GPUs the workers spread over (cuda, emu; default 1): as `generate --gpus`, a GPU
    /// per worker when more than one. The floor then counts, per segment, what its
    /// busiest GPU reads, at GPU 0's copy bandwidth.
    #[arg(long, default_value_t = 1)]
    gpus: usize,
    #[command(flatten)]
    launch: LaunchArgs,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// How device workers launch kernels (generate, bench-decode, bench-reconfig).
#[derive(clap::Args)]
struct LaunchArgs {
    /// Record each segment's kernel launches and replay repeated runs as graphs
    /// (CUDA graphs on a GPU): fewer launch calls per step. The default with --device
    /// cuda; with emu only when asked; an error with cpu.
    #[arg(long)]
    graphs: bool,
    /// Launch every kernel one by one (cuda's default is --graphs).
    #[arg(long, conflicts_with = "graphs")]
    no_graphs: bool,
    /// Programmatic dependent launch (GPUs of compute capability 9.0 or later): each
    /// kernel starts, and the decode GEMMs' weights stream into L2, while the kernel
    /// before it finishes. Off by default until measured; with emu accepted (nothing
    /// changes), an error with cpu.
    #[arg(long)]
    pdl: bool,
}

impl LaunchArgs {
    /// (graphs, pdl) for `device`: see [`check_graphs`] and [`check_pdl`].
    fn resolve(&self, device: DeviceKind) -> Result<(bool, bool)> {
        Ok((
            check_graphs(self.graphs, self.no_graphs, device)?,
            check_pdl(self.pdl, device)?,
        ))
    }
}

#[derive(clap::Args)]
struct PlanArgs {
    /// Checkpoint directory (default: the built-in random tiny model).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    from: String,
    #[arg(long)]
    to: String,
    /// Workers available (default: the larger world size). At most the two world sizes
    /// added (enough for the two topologies on disjoint workers): more cannot change the
    /// plan, and is an error.
    #[arg(long)]
    workers: Option<usize>,
    /// Bytes of one weight element on the wire: 4 (f32: the CPU backend, host-staged
    /// device transfers) or 2 (bf16: device workers with the same-device exchange);
    /// anything else is an error.
    #[arg(long, default_value_t = 4)]
    elem_bytes: u64,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Checkpoint directory (default: a built-in random model of about 111M parameters).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value = "tp2pp2")]
    from: String,
    #[arg(long, default_value = "tp4pp1")]
    to: String,
    /// Live requests decoding during the switch (1 to 1024).
    #[arg(long, default_value_t = 8)]
    requests: usize,
    /// Segments (layers) in flight during the online switch (at least 1).
    #[arg(long, default_value_t = 2)]
    window: usize,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Write an SVG of step latency over time with the switch windows marked (its
    /// directory must exist and be writable: checked before the bench runs).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Run the three modes this many times (round robin, at least 1) and report each
    /// figure's median, which damps noise from other work on the machine.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Device: cpu (default), cuda (GPU 0; the default model is then a random 1.1B),
    /// or emu (the GPU kernels on the host emulator: slow, for checks only).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// GPUs the workers spread over (cuda, emu; default 1): as `generate --gpus`, a GPU
    /// per worker when more than one. The transfer floor still uses GPU 0's copy
    /// bandwidth.
    #[arg(long, default_value_t = 1)]
    gpus: usize,
    #[command(flatten)]
    launch: LaunchArgs,
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json).
    /// Default: a built-in deterministic random tiny model generated in memory.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Tensor-parallel degree.
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Pipeline-parallel degree (stages may be uneven).
    #[arg(long, default_value_t = 1)]
    pp: usize,
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Keep generating after an end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// A prompt as text (repeatable; prompts run concurrently).
    #[arg(long = "prompt")]
    prompts: Vec<String>,
    /// A prompt as comma-separated token ids (repeatable).
    #[arg(long = "prompt-ids")]
    prompt_ids: Vec<String>,
    /// Sampling temperature; 0 (default) is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling mass, 0 < P <= 1 (checked always; used with --temperature > 0,
    /// ignored with a warning when greedy).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the sampler (request i uses seed + i; ignored with a warning when greedy).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// KV-cache blocks (of 16 tokens) per layer. Default: 512 on cpu and emu; on cuda,
    /// what GPU 0's free memory holds after the weights of all ranks and a reserve of
    /// max(10% of total, 1 GiB), capped at 64 sequences of the full context.
    #[arg(long)]
    kv_blocks: Option<usize>,
    /// Device: cpu (default, f32), cuda (the GPU kernels on GPU 0, bf16), or emu (the
    /// GPU kernels on the host emulator: the CUDA code path without a GPU, slow).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Switch topology when decode step STEP begins, e.g. `8:tp4pp1` (repeatable, one
    /// switch per step). A switch due while another runs waits for it; one still pending
    /// when the run ends is not performed, and a warning says so (--json:
    /// `skipped_reconfigurations`).
    #[arg(long = "reconfigure")]
    reconfigure: Vec<String>,
    /// GPUs the workers spread over (cuda, emu; default 1). With more than one, each
    /// worker has a GPU of its own (at most N workers, the larger topology's ranks):
    /// partials, hand-offs and reshard pieces go through NCCL (on emu, its emulated
    /// twin).
    #[arg(long, default_value_t = 1)]
    gpus: usize,
    #[command(flatten)]
    launch: LaunchArgs,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    remp::runtime::tune_allocator();
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let sub = matches.subcommand().map(|(_, m)| m.clone());
    let res = match cli.cmd {
        Cmd::Generate(a) => generate(a, sub.as_ref()),
        Cmd::Plan(a) => plan(a),
        Cmd::BenchReconfig(a) => bench_reconfig(a),
        Cmd::BenchDecode(a) => bench_decode(a),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// The checkpoint in `dir`, or the built-in random tiny model. Prints nothing: callers
/// report the load ([`report_loaded`]) once every input check passed, so that a bad
/// checkpoint's or argument's stderr is exactly the one error line.
fn load_model(dir: &Option<PathBuf>) -> Result<Model> {
    match dir {
        Some(d) => Model::load(d),
        None => Ok(Model::random_tiny()),
    }
}

/// The device named on the command line; CUDA is opened here so that a machine without
/// driver or GPU gets the one clear error before any model is loaded.
fn check_device(device: &str) -> Result<DeviceKind> {
    let kind: DeviceKind = device.parse()?;
    if kind == DeviceKind::Cuda {
        remp::backend::cuda::CudaDevice::open(0)?;
    }
    Ok(kind)
}

/// `generate --device cuda` without `--kv-blocks`: KV blocks per layer from the GPUs'
/// free memory, and the one line that says why. Workers are spread over `gpus` GPUs as
/// the engine spreads them (worker `w` on GPU `w % gpus`; every one on GPU 0 with one
/// GPU, or with the `REMP_CUDA_GPUS_ON_ONE` test hook), and the cache is sized before
/// the model is loaded: on each GPU the weights of its workers are subtracted from what
/// is free there now, then a reserve of max(10% of its total, 1 GiB) for activations,
/// scratch buffers and the reshard window, and the fullest GPU sets the size. With
/// `--reconfigure` the most demanding topology of the run does. At most
/// [`kv_blocks_cap`] blocks (`max_running` sequences of the full context); fewer than
/// `need` (the longest request's) is an error.
fn cuda_kv_blocks(
    cfg: &ModelConfig,
    topos: &[Topology],
    (gpus, workers): (usize, usize),
    block_size: usize,
    max_running: usize,
    need: usize,
) -> Result<(usize, String)> {
    let gpus = match std::env::var("REMP_CUDA_GPUS_ON_ONE").as_deref() {
        Ok("1") => 1,
        _ => gpus.clamp(1, workers.max(1)),
    };
    let mut mem = Vec::new();
    let mut totals = Vec::new();
    for d in 0..gpus {
        let (free, total) = remp::backend::cuda::CudaDevice::open(d)
            .and_then(|dev| dev.mem_info())
            .map_err(|e| Error::Device(format!("GPU {d}: {e}")))?;
        mem.push(DeviceMemory {
            free,
            reserve: kv_reserve_bytes(total),
        });
        totals.push(total);
    }
    let map = DeviceMap::round_robin(workers.max(1), gpus)?;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let mut fit = usize::MAX;
    let (mut worst, mut on) = (topos[0], DeviceId(0));
    for &t in topos {
        let (n, d) =
            kv_blocks_on_devices(cfg, t, block_size, &map, &mem).map_err(|e| match (gpus, e) {
                (1, Error::Device(m)) => Error::Device(format!("GPU 0: {m}")),
                (_, e) => e,
            })?;
        if n < fit {
            (fit, worst, on) = (n, t, d);
        }
    }
    let load = device_loads(cfg, worst, block_size, &map)?[on.0];
    let m = mem[on.0];
    let whose = if gpus == 1 { "all ranks" } else { "its ranks" };
    if fit < need {
        return Err(Error::Device(format!(
            "GPU {}: {:.2} GiB free holds {fit} KV blocks after the {worst} weights ({:.2} GiB, {whose}) and the reserve ({:.2} GiB); the longest request needs {need} blocks of {block_size} tokens (free GPU memory, shorten the request, or set --kv-blocks)",
            on.0,
            gib(m.free),
            gib(load.weights),
            gib(m.reserve)
        )));
    }
    let cap = kv_blocks_cap(cfg, block_size, max_running);
    let blocks = fit.min(cap);
    let capped = if cap < fit {
        format!(
            ", capped at {cap} ({max_running} sequences of {} tokens)",
            cfg.max_position_embeddings
        )
    } else {
        String::new()
    };
    let (what, whole) = if gpus == 1 {
        ("all layers and ranks".to_string(), "GPU 0's".to_string())
    } else {
        (
            format!("GPU {}'s layers and ranks", on.0),
            format!("the fullest of {gpus} GPUs' (GPU {})", on.0),
        )
    };
    let note = format!(
        "kv cache: {blocks} blocks of {block_size} tokens ({:.2} GiB, {what}) from {whole} free memory: {:.2} GiB free of {:.2} GiB, less {worst} weights {:.2} GiB (bf16, {whose}) and reserve {:.2} GiB (max(10% of total, 1 GiB)) fits {fit}{capped}; --kv-blocks N overrides",
        gib(blocks as u64 * load.kv_per_block),
        gib(m.free),
        gib(totals[on.0]),
        gib(load.weights),
        gib(m.reserve)
    );
    Ok((blocks, note))
}

enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// The prompts in the order given on the command line, text and ids interleaved.
fn ordered_prompts(a: &GenerateArgs, m: Option<&ArgMatches>) -> Result<Vec<Prompt>> {
    let idx = |id: &str| -> Vec<usize> {
        m.and_then(|m| m.indices_of(id))
            .map(|i| i.collect())
            .unwrap_or_default()
    };
    let mut all: Vec<(usize, Prompt)> = Vec::new();
    let ti = idx("prompts");
    for (k, p) in a.prompts.iter().enumerate() {
        all.push((ti.get(k).copied().unwrap_or(k), Prompt::Text(p.clone())));
    }
    let ii = idx("prompt_ids");
    for (k, p) in a.prompt_ids.iter().enumerate() {
        let ids = parse_ids(p)?;
        all.push((
            ii.get(k).copied().unwrap_or(usize::MAX - 1000 + k),
            Prompt::Ids(ids),
        ));
    }
    all.sort_by_key(|(i, _)| *i);
    if all.is_empty() {
        return Err(Error::Request(
            "no prompt: give --prompt TEXT or --prompt-ids 1,2,3 (repeatable)".into(),
        ));
    }
    Ok(all.into_iter().map(|(_, p)| p).collect())
}

fn parse_ids(s: &str) -> Result<Vec<u32>> {
    if s.trim().is_empty() {
        return Err(Error::Request("empty --prompt-ids".into()));
    }
    s.split(',')
        .map(|t| {
            t.trim()
                .parse::<u32>()
                .map_err(|_| Error::Request(format!("--prompt-ids `{s}`: `{t}` is not a token id")))
        })
        .collect()
}

fn generate(a: GenerateArgs, m: Option<&ArgMatches>) -> Result<()> {
    let device = check_device(&a.device)?;
    let prompts = ordered_prompts(&a, m)?;
    if a.kv_blocks == Some(0) {
        return Err(Error::Request(
            "--kv-blocks 0: the KV cache needs at least 1 block (leave the flag out for the default)"
                .into(),
        ));
    }
    if !(a.temperature >= 0.0 && a.temperature.is_finite()) {
        return Err(Error::Request(format!(
            "--temperature {} must be >= 0",
            a.temperature
        )));
    }
    // Checked even when greedy: a value that could never be used is still a mistake.
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        return Err(Error::Request(format!(
            "--top-p {} must be in (0, 1]",
            a.top_p
        )));
    }
    // Sampling flags given to a greedy run: not an error, but said once (after every
    // input check, so that a refused run's stderr stays its one error line).
    let given = |id: &str| m.and_then(|m| m.value_source(id)) == Some(ValueSource::CommandLine);
    let unused: Vec<&str> = [("top_p", "--top-p"), ("seed", "--seed")]
        .into_iter()
        .filter(|(id, _)| a.temperature == 0.0 && given(id))
        .map(|(_, flag)| flag)
        .collect();
    let sampling_warning = (!unused.is_empty()).then(|| {
        format!(
            "warning: {} ignored: decoding is greedy without --temperature > 0",
            unused.join(" and ")
        )
    });
    // No progress line: a bad topology or prompt found after loading must leave exactly
    // one line (the error) on stderr; the summary line names the model on success.
    let model = load_model(&a.model)?;
    let topo = Topology::new(a.tp, a.pp);
    topo.validate(&model.config)?;
    let mut switches = Vec::new();
    for r in &a.reconfigure {
        let (step, t) = r
            .split_once(':')
            .ok_or_else(|| Error::Request(format!("--reconfigure `{r}`: expected STEP:tpXppY")))?;
        let step: u64 = step
            .trim()
            .parse()
            .map_err(|_| Error::Request(format!("--reconfigure `{r}`: `{step}` is not a step")))?;
        let t: Topology = t.parse()?;
        t.validate(&model.config)?;
        switches.push((step, t));
    }
    switches.sort_by_key(|s| s.0);
    // Two switches requested at the same step cannot both begin then: refuse the schedule
    // rather than perform one and defer the other behind it.
    if let Some(w) = switches.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(Error::Request(format!(
            "--reconfigure: two switches at step {} ({}:{} and {}:{}); give each step once",
            w[0].0, w[0].0, w[0].1, w[1].0, w[1].1
        )));
    }
    let prompts: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| match p {
            Prompt::Text(t) => model.tokenizer.encode(t),
            Prompt::Ids(ids) => Ok(ids.clone()),
        })
        .collect::<Result<_>>()?;
    let mut econf = EngineConfig::new(topo);
    econf.device = device;
    (econf.graphs, econf.pdl) = a.launch.resolve(device)?;
    econf.gpus = check_gpus(a.gpus, device)?;
    let graphs = econf.graphs;
    let pdl = econf.pdl;
    // Today's default (EngineConfig's 512) on cpu and emu; from free memory on cuda.
    let mut kv_note = None;
    match a.kv_blocks {
        Some(n) => econf.kv_blocks = n,
        None if device == DeviceKind::Cuda => {
            let ctx = model.config.max_position_embeddings;
            // The longest valid request's whole budget (too long a prompt, or no new
            // token, is refused below with its own error).
            let need = prompts
                .iter()
                .filter(|p| p.len() < ctx && a.max_new_tokens > 0)
                .map(|p| {
                    (p.len() + a.max_new_tokens)
                        .min(ctx)
                        .div_ceil(econf.block_size)
                })
                .max()
                .unwrap_or(1);
            let mut topos = vec![topo];
            topos.extend(switches.iter().map(|s| s.1));
            let workers = topos.iter().map(|t| t.world_size()).max().unwrap_or(1);
            let (n, note) = cuda_kv_blocks(
                &model.config,
                &topos,
                (econf.gpus, workers),
                econf.block_size,
                econf.max_running,
                need,
            )?;
            econf.kv_blocks = n;
            kv_note = Some(note);
        }
        None => {}
    }
    econf.workers = Some(
        switches
            .iter()
            .map(|s| s.1.world_size())
            .fold(topo.world_size(), usize::max),
    );
    check_gpu_per_worker(econf.gpus, econf.workers.unwrap_or(1))?;
    let mut engine = Engine::new(&model, econf)?;

    let mut ids = Vec::new();
    for (i, prompt) in prompts.into_iter().enumerate() {
        let sampling = if a.temperature > 0.0 {
            Sampling::Random {
                temperature: a.temperature,
                top_p: a.top_p,
                seed: a.seed.wrapping_add(i as u64),
            }
        } else {
            Sampling::Greedy
        };
        let req = Request {
            prompt,
            max_new_tokens: a.max_new_tokens,
            sampling,
            ignore_eos: a.ignore_eos,
            return_logits: false,
        };
        let id = engine.add_request(req).map_err(|e| match e {
            // Not `{e}`: that would repeat "invalid request: " inside the message.
            Error::Request(msg) => Error::Request(format!("prompt {}: {msg}", i + 1)),
            e => e,
        })?;
        ids.push(id);
    }
    // Only now, after every input check: a refused run's stderr stays its one error line.
    if let (Some(note), false) = (&kv_note, a.json) {
        eprintln!("{note}");
    }
    if let Some(w) = &sampling_warning {
        eprintln!("{w}");
    }

    let t0 = Instant::now();
    let mut next_switch = 0;
    // (from, to, requested step, event count before it)
    let mut asked: Vec<(String, Topology, u64)> = Vec::new();
    let mut ends: Vec<f64> = Vec::new();
    while engine.has_work() || engine.reconfig_in_progress() {
        if let Some(&(at, t)) = switches.get(next_switch) {
            // Requested when that step begins; a switch still running defers the next.
            if engine.steps() >= at && !engine.reconfig_in_progress() {
                asked.push((engine.topology_name(), t, engine.steps()));
                engine.reconfigure(t)?;
                next_switch += 1;
            }
        }
        engine.step()?;
        ends.push(t0.elapsed().as_secs_f64() * 1e3);
        if !engine.has_work() && next_switch < switches.len() && !engine.reconfig_in_progress() {
            // Requests finished before the remaining switch steps: reported below.
            break;
        }
    }
    let elapsed_ms = t0.elapsed().as_secs_f64() * 1e3;
    let reconfigs = reconfig_report(&mut engine, &asked, &ends);
    // Every scheduled switch either happened or is reported: those still pending when the
    // requests finished (a step past the run's end, or deferred behind another switch).
    let last_step = engine.steps();
    let skipped: Vec<serde_json::Value> = switches[next_switch..]
        .iter()
        .map(|&(at, t)| {
            let reason = if at >= last_step {
                format!("the run ended after {last_step} steps, before step {at}")
            } else {
                format!(
                    "deferred behind an earlier switch until the run ended after {last_step} steps"
                )
            };
            eprintln!("warning: --reconfigure {at}:{t} not performed: {reason}");
            json!({"to": t.to_string(), "scheduled_at_step": at, "reason": reason})
        })
        .collect();

    let mut reqs = Vec::new();
    for id in &ids {
        let out = engine
            .output(*id)
            .ok_or_else(|| Error::Request("request lost".into()))?;
        let text = model.tokenizer.decode(&out.output);
        reqs.push(json!({
            "prompt_ids": out.prompt,
            "output_ids": out.output,
            "text": text,
            "finish_reason": out.finish.map(|f| f.as_str()).unwrap_or("length"),
        }));
    }
    if a.json {
        let doc = json!({
            "model": model.name,
            "topology": topo.to_string(),
            "final_topology": engine.topology_name(),
            "device": a.device,
            "gpus": a.gpus,
            "requests": reqs,
            "steps": engine.steps(),
            "elapsed_ms": elapsed_ms,
            "reconfigurations": reconfigs,
            "skipped_reconfigurations": skipped,
            "pdl": pdl,
            "graphs": graphs.then(|| {
                let g = engine.graph_counts();
                json!({"graph_runs": g.graph_runs, "graph_kernels": g.graph_kernels,
                       "eager_runs": g.eager_runs, "built": g.built,
                       "build_failures": g.build_failures})
            }),
        });
        println!("{doc}");
    } else {
        for r in &reconfigs {
            eprintln!(
                "switch {} -> {}: steps {} -> {}, {:.1} ms, {} bytes moved, peak extra {} bytes, max gap {:.1} ms (median step {})",
                r["from"].as_str().unwrap_or(""),
                r["to"].as_str().unwrap_or(""),
                r["requested_at_step"],
                r["completed_at_step"],
                r["total_ms"].as_f64().unwrap_or(0.0),
                r["bytes_moved"],
                r["peak_extra_bytes"],
                r["max_step_gap_ms"].as_f64().unwrap_or(0.0),
                r["median_step_ms"]
                    .as_f64()
                    .map_or("n/a: no step outside the switch".into(), |m| format!("{m:.1} ms")),
            );
        }
        for (i, r) in reqs.iter().enumerate() {
            println!("[{i}] {}", r["text"].as_str().unwrap_or(""));
        }
        let toks: usize = reqs
            .iter()
            .map(|r| r["output_ids"].as_array().map_or(0, |a| a.len()))
            .sum();
        eprintln!(
            "{} on {topo} ({}): {} requests, {toks} tokens in {} steps, {elapsed_ms:.1} ms ({:.0} tok/s)",
            model.name,
            a.device,
            reqs.len(),
            engine.steps(),
            toks as f64 / (elapsed_ms / 1e3)
        );
    }
    Ok(())
}

/// One JSON record per switch, from the engine's events and the step end times.
fn reconfig_report(
    engine: &mut Engine,
    asked: &[(String, Topology, u64)],
    ends: &[f64],
) -> Vec<serde_json::Value> {
    let finished: Vec<(u64, f64, u64, u64)> = engine
        .reconfig_events()
        .iter()
        .filter_map(|e| match e {
            ReconfigEvent::Finished {
                step,
                total_ms,
                bytes_moved,
                peak_extra_bytes,
                ..
            } => Some((*step, *total_ms, *bytes_moved, *peak_extra_bytes)),
            _ => None,
        })
        .collect();
    let gaps: Vec<f64> = ends.windows(2).map(|w| w[1] - w[0]).collect();
    let mut out = Vec::new();
    for (i, (from, to, at)) in asked.iter().enumerate() {
        let Some(&(done, total_ms, bytes, peak)) = finished.get(i) else {
            continue;
        };
        // Gaps that end in steps at..=done+1 (gap k ends at step k+1).
        let (lo, hi) = (
            (*at as usize).saturating_sub(1),
            (done as usize + 1).min(gaps.len()),
        );
        let max_gap = gaps
            .get(lo..hi.max(lo))
            .unwrap_or(&[])
            .iter()
            .copied()
            .fold(0.0, f64::max);
        let mut outside: Vec<f64> = gaps
            .iter()
            .enumerate()
            .filter(|(k, _)| *k < lo || *k >= hi)
            .map(|(_, g)| *g)
            .collect();
        outside.sort_by(|a, b| a.total_cmp(b));
        // (None: every step of the run overlapped the switch; there is nothing to compare)
        let median = outside.get(outside.len() / 2).copied();
        out.push(json!({
            "from": from,
            "to": to.to_string(),
            "requested_at_step": at,
            "completed_at_step": done,
            "total_ms": total_ms,
            "bytes_moved": bytes,
            "peak_extra_bytes": peak,
            "max_step_gap_ms": max_gap,
            "median_step_ms": median,
        }));
    }
    out
}

fn plan(a: PlanArgs) -> Result<()> {
    if a.elem_bytes != 4 && a.elem_bytes != 2 {
        return Err(Error::Request(format!(
            "--elem-bytes {}: must be 4 (f32) or 2 (bf16)",
            a.elem_bytes
        )));
    }
    let from: Topology = a.from.parse()?;
    let to: Topology = a.to.parse()?;
    let model = load_model(&a.model)?;
    let cfg = &model.config;
    from.validate(cfg)?;
    to.validate(cfg)?;
    // Enough for the two topologies on disjoint workers: the planner never picks a worker
    // beyond both (it holds nothing and is no rank's own number), so more changes nothing.
    let max_workers = from.world_size() + to.world_size();
    if let Some(n) = a.workers.filter(|&n| n > max_workers) {
        return Err(Error::Request(format!(
            "--workers {n}: at most {max_workers} for {from} -> {to} (the two world sizes added; more workers cannot change the plan)"
        )));
    }
    let workers = a.workers.unwrap_or(from.world_size().max(to.world_size()));
    let current = Placement::static_topology(from, cfg)?;
    let (_, p) = plan_topology(
        cfg,
        &current,
        to,
        workers,
        a.elem_bytes,
        &vec![0; cfg.num_layers],
    )?;
    if a.json {
        println!("{}", p.to_json());
    } else {
        print!("{p}");
    }
    Ok(())
}

/// `--gpus` spreads device workers: at least 1, and more than 1 only on cuda or emu.
fn check_gpus(gpus: usize, device: DeviceKind) -> Result<usize> {
    if gpus == 0 {
        return Err(Error::Request("--gpus must be at least 1".into()));
    }
    if gpus > 1 && device == DeviceKind::Cpu {
        return Err(Error::Request(
            "--gpus spreads device workers over GPUs: it needs --device cuda or emu".into(),
        ));
    }
    Ok(gpus)
}

/// On several GPUs each worker needs one of its own (NCCL takes one rank per GPU).
fn check_gpu_per_worker(gpus: usize, workers: usize) -> Result<()> {
    if gpus > 1 && workers > gpus {
        return Err(Error::Request(format!(
            "--gpus {gpus}: the run needs {workers} workers (its largest topology) and, on \
             several GPUs, each worker needs one of its own (NCCL takes one rank per GPU); \
             use --gpus {workers} or more, or --gpus 1 (every worker on GPU 0)"
        )));
    }
    Ok(())
}

/// Whether graphs are on: `--graphs` / `--no-graphs`, else the device's default
/// ([`DeviceKind::graphs_by_default`]). `--graphs` is for the device kernel path: an
/// error with the CPU backend.
fn check_graphs(graphs: bool, no_graphs: bool, device: DeviceKind) -> Result<bool> {
    if graphs && device == DeviceKind::Cpu {
        return Err(Error::Request(
            "--graphs replays device kernel launches: it needs --device cuda or emu".into(),
        ));
    }
    Ok(graphs || (!no_graphs && device.graphs_by_default()))
}

/// `--pdl`: for the device kernel path only (the engine also checks the GPU's compute
/// capability when it opens it).
fn check_pdl(pdl: bool, device: DeviceKind) -> Result<bool> {
    if pdl && device == DeviceKind::Cpu {
        return Err(Error::Request(
            "--pdl changes how device kernels launch: it needs --device cuda or emu".into(),
        ));
    }
    Ok(pdl)
}

/// "loaded DIR" on stderr (not with --json): printed only once every input check passed,
/// so that bad input leaves exactly its one error line.
fn report_loaded(dir: &Option<PathBuf>, json: bool) {
    if let (Some(d), false) = (dir, json) {
        eprintln!("loaded {}", d.display());
    }
}

fn bench_decode(a: BenchDecodeArgs) -> Result<()> {
    use remp::runtime::decode_bench::{run, DecodeBenchConfig};
    // Every check that needs no model comes before loading it.
    let device = check_device(&a.device)?;
    let topo = Topology::new(a.tp, a.pp);
    let mut bc = DecodeBenchConfig::new(topo, device);
    (bc.graphs, bc.pdl) = a.launch.resolve(device)?;
    bc.batch = a.batch;
    bc.steps = a.steps;
    bc.gpus = check_gpus(a.gpus, device)?;
    check_gpu_per_worker(bc.gpus, topo.world_size())?;
    (bc.exchange, bc.mailboxes) = match a.exchange.as_deref() {
        None | Some("same-device") => (Exchange::SameDevice, true),
        Some("same-device-copies") => (Exchange::SameDevice, false),
        Some("host") => (Exchange::HostStaged, false),
        Some(other) => {
            return Err(Error::Request(format!(
                "unknown --exchange `{other}` (same-device, same-device-copies, host)"
            )))
        }
    };
    if a.exchange.is_some() && device == DeviceKind::Cpu {
        // (the CPU backend's workers always exchange host floats: the flag would be
        // ignored, and the result mislabelled)
        return Err(Error::Request(
            "--exchange chooses how device ranks exchange: it needs --device cuda or emu".into(),
        ));
    }
    bc.validate()?;
    let model = match &a.model {
        Some(d) => load_model(&Some(d.clone()))?,
        None => match device {
            DeviceKind::Cuda => Model::random_gpu_bench(),
            DeviceKind::Emulated => Model::random_tiny(),
            DeviceKind::Cpu => Model::random_bench(),
        },
    };
    topo.validate(&model.config)?;
    bc.check(&model.config)?;
    report_loaded(&a.model, a.json);
    if !a.json {
        eprintln!(
            "{} ({:.0}M parameters) on {}, {topo}, batch {}: {} decode steps ...",
            model.name,
            model.config.num_params() as f64 / 1e6,
            device.name(),
            bc.batch,
            bc.steps
        );
    }
    let r = run(&model, &bc)?;
    if a.json {
        let mut v = r.to_json();
        v["model"] = serde_json::json!(model.name);
        v["topology"] = serde_json::json!(topo.to_string());
        v["batch"] = serde_json::json!(bc.batch);
        v["gpus"] = serde_json::json!(bc.gpus);
        // (null on the CPU backend, whose workers have no device exchange)
        v["exchange"] = match (device, bc.exchange, bc.mailboxes) {
            (DeviceKind::Cpu, ..) => serde_json::Value::Null,
            (_, Exchange::SameDevice, true) => serde_json::json!("same-device"),
            (_, Exchange::SameDevice, false) => serde_json::json!("same-device-copies"),
            (_, Exchange::HostStaged, _) => serde_json::json!("host"),
        };
        println!("{v}");
    } else {
        println!(
            "median step {:.3} ms (p90 {:.3}); floor {:.3} ms = {:.1} MB of weights{} / {:.1} GB/s; median / floor = {:.2}",
            r.median_step_ms,
            r.p90_step_ms,
            r.floor_ms,
            r.floor_bytes as f64 / 1e6,
            if r.floor_bytes == r.weight_bytes {
                String::new()
            } else {
                format!(
                    " on the busiest GPUs (of {:.1} MB)",
                    r.weight_bytes as f64 / 1e6
                )
            },
            r.bandwidth / 1e9,
            r.ratio()
        );
        if let Some(g) = r.graphs {
            println!(
                "graphs: {} runs replayed ({} kernels), {} launched kernel by kernel, {} built",
                g.graph_runs, g.graph_kernels, g.eager_runs, g.built
            );
        }
        if r.pdl {
            println!("programmatic dependent launch: on");
        }
    }
    Ok(())
}

/// `--plot FILE`: checked before the bench runs rather than after it: not a directory
/// (nor a path ending in a separator), in an existing directory, and writable: the
/// file itself is opened for writing without truncating it (created if missing, and then
/// removed again, so a failed bench leaves nothing behind).
fn check_plot_path(path: &std::path::Path) -> Result<()> {
    let bad = |msg: &str| Error::Request(format!("--plot {}: {msg}", path.display()));
    if path.is_dir()
        || path
            .as_os_str()
            .to_string_lossy()
            .ends_with(std::path::MAIN_SEPARATOR)
    {
        return Err(bad("is a directory"));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    if !dir.is_dir() {
        return Err(bad(&format!("directory {} does not exist", dir.display())));
    }
    let existed = path.exists();
    match std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
    {
        Ok(_) => {
            if !existed {
                let _ = std::fs::remove_file(path);
            }
            Ok(())
        }
        Err(e) => Err(bad(&format!("cannot be written: {e}"))),
    }
}

fn bench_reconfig(a: BenchArgs) -> Result<()> {
    // Every check that needs no model comes before loading it.
    let device = check_device(&a.device)?;
    let from: Topology = a.from.parse()?;
    let to: Topology = a.to.parse()?;
    if a.repeat == 0 {
        return Err(Error::Request(
            "--repeat 0: the modes must run at least once".into(),
        ));
    }
    let mut bc = BenchConfig::new(from, to);
    bc.requests = a.requests;
    bc.window = a.window;
    bc.device = device;
    (bc.graphs, bc.pdl) = a.launch.resolve(device)?;
    bc.gpus = check_gpus(a.gpus, device)?;
    check_gpu_per_worker(bc.gpus, from.world_size().max(to.world_size()))?;
    bc.validate()?;
    if let Some(p) = &a.plot {
        check_plot_path(p)?;
    }
    let model = match &a.model {
        Some(d) => load_model(&Some(d.clone()))?,
        None if device == DeviceKind::Cuda => Model::random_gpu_bench(),
        None => Model::random_bench(),
    };
    from.validate(&model.config)?;
    to.validate(&model.config)?;
    bc.check(&model.config)?;
    report_loaded(&a.model, a.json);
    // Bytes copied per second where the pieces move: on a GPU cuMemcpyDtoD (its
    // read + written figure halved), else one thread's memcpy.
    let (bw, bw_source) = match device {
        DeviceKind::Cuda => (
            remp::runtime::decode_bench::cuda_copy_bandwidth()? / 2.0,
            "cuMemcpyDtoD",
        ),
        _ => (copy_bandwidth(), "memcpy (one thread)"),
    };
    if !a.json {
        eprintln!(
            "{} ({:.0}M parameters), {} requests, {from} -> {to}; copy bandwidth {:.1} GB/s ({bw_source})",
            model.name,
            model.config.num_params() as f64 / 1e6,
            bc.requests,
            bw / 1e9
        );
    }
    let modes = [Mode::Online, Mode::StopTheWorld, Mode::Restart];
    let mut all: Vec<Vec<SwitchMetrics>> = vec![Vec::new(); modes.len()];
    for rep in 0..a.repeat {
        for (i, mode) in modes.iter().enumerate() {
            if !a.json {
                eprintln!("running {} ({}/{}) ...", mode.name(), rep + 1, a.repeat);
            }
            all[i].push(run_mode(&model, &bc, *mode, bw)?);
        }
    }
    let runs: Vec<SwitchMetrics> = all.into_iter().map(median_metrics).collect();
    if let Some(path) = &a.plot {
        std::fs::write(path, plot_svg(&runs)).map_err(|e| Error::Io {
            path: path.clone(),
            source: e,
        })?;
    }
    // What the reshard transport reached where nothing else runs: stop-the-world's
    // bytes over its whole pause (packing, the exchange, unpacking, the KV included).
    let stw_rate = runs[1].bytes_moved as f64 / (runs[1].total_ms * 1e-3).max(1e-9);
    if a.json {
        let doc = json!({
            "online": runs[0].to_json(),
            "stop_the_world": runs[1].to_json(),
            "restart": runs[2].to_json(),
            "copy_bandwidth_gbs": bw / 1e9,
            "copy_bandwidth_source": bw_source,
            "stop_the_world_transfer_gbs": stw_rate / 1e9,
            "gpus": bc.gpus,
            "graphs": bc.graphs,
            "pdl": bc.pdl,
        });
        println!("{doc}");
    } else {
        println!(
            "{:<15} {:>9} {:>10} {:>11} {:>10} {:>10} {:>10} {:>12} {:>12} {:>11}",
            "mode",
            "stall_ms",
            "max_gap_ms",
            "median_step",
            "step_after",
            "total_ms",
            "floor_ms",
            "bytes_moved",
            "peak_extra",
            "copy_cpu_ms"
        );
        for r in &runs {
            println!(
                "{:<15} {:>9.1} {:>10.1} {:>11.1} {:>10.1} {:>10.1} {:>10.1} {:>12} {:>12} {:>11.1}",
                r.mode.name(),
                r.stall_ms,
                r.max_gap_ms,
                r.median_step_ms,
                r.median_step_after_ms,
                r.total_ms,
                r.transfer_floor_ms,
                r.bytes_moved,
                r.peak_extra_bytes,
                r.copy_cpu_ms
            );
        }
        let (on, stw, rs) = (&runs[0], &runs[1], &runs[2]);
        // A ratio over a zero (no stall at all) is reported as such, not as a huge number.
        let ratio = |a: f64, b: f64| {
            if b > 1e-9 {
                format!("{:.2}", a / b)
            } else {
                "inf (denominator 0)".to_string()
            }
        };
        println!(
            "online max_gap / median_step = {} (/ the slower of the steps before and after = {}); stop-the-world stall / online stall = {}; restart max_gap / online max_gap = {}; online total / max(floor, step) = {}",
            ratio(on.max_gap_ms, on.median_step_ms),
            ratio(
                on.max_gap_ms,
                on.median_step_ms.max(on.median_step_after_ms)
            ),
            ratio(stw.stall_ms, on.stall_ms),
            ratio(rs.max_gap_ms, on.max_gap_ms),
            ratio(on.total_ms, on.transfer_floor_ms.max(on.median_step_ms))
        );
        println!(
            "stop-the-world moved {} B in {:.1} ms: {:.2} GB/s = {:.4} x the {bw_source} bandwidth ({:.2} GB/s)",
            stw.bytes_moved,
            stw.total_ms,
            stw_rate / 1e9,
            stw_rate / bw,
            bw / 1e9
        );
    }
    Ok(())
}

/// Each figure's median over repeated runs of one mode (the timeline of the median run).
fn median_metrics(mut v: Vec<SwitchMetrics>) -> SwitchMetrics {
    let med = |v: &[SwitchMetrics], f: &dyn Fn(&SwitchMetrics) -> f64| -> f64 {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(|a, b| a.total_cmp(b));
        x[x.len() / 2]
    };
    let stall = med(&v, &|m| m.stall_ms);
    let max_gap = med(&v, &|m| m.max_gap_ms);
    let median_step = med(&v, &|m| m.median_step_ms);
    let step_after = med(&v, &|m| m.median_step_after_ms);
    let total = med(&v, &|m| m.total_ms);
    let floor = med(&v, &|m| m.transfer_floor_ms);
    let moved = med(&v, &|m| m.bytes_moved as f64) as u64;
    let peak = med(&v, &|m| m.peak_extra_bytes as f64) as u64;
    let cpu = med(&v, &|m| m.copy_cpu_ms);
    v.sort_by(|a, b| a.max_gap_ms.total_cmp(&b.max_gap_ms));
    let n = v.len();
    let mut m = v.swap_remove(n / 2);
    (m.stall_ms, m.max_gap_ms, m.median_step_ms, m.total_ms) = (stall, max_gap, median_step, total);
    m.median_step_after_ms = step_after;
    (
        m.transfer_floor_ms,
        m.bytes_moved,
        m.peak_extra_bytes,
        m.copy_cpu_ms,
    ) = (floor, moved, peak, cpu);
    m
}

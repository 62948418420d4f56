//! The `remp` command line: `generate` runs prompts as one continuously batched job on a
//! chosen topology. Every error is one line on stderr and exit status 2.

use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use remp::model::Model;
use remp::parallel::Topology;
use remp::runtime::{Engine, EngineConfig, Request, Sampling};
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
    /// Nucleus sampling mass (with --temperature > 0).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the sampler (request i uses seed + i).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// KV-cache blocks (of 16 tokens) per layer.
    #[arg(long, default_value_t = 512)]
    kv_blocks: usize,
    /// Device: cpu.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let sub = matches.subcommand().map(|(_, m)| m.clone());
    let res = match cli.cmd {
        Cmd::Generate(a) => generate(a, sub.as_ref()),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn load_model(dir: &Option<PathBuf>, quiet: bool) -> Result<Model> {
    match dir {
        Some(d) => {
            if !quiet {
                eprintln!("loading {}", d.display());
            }
            Model::load(d)
        }
        None => Ok(Model::random_tiny()),
    }
}

fn check_device(device: &str) -> Result<()> {
    match device {
        "cpu" => Ok(()),
        other => Err(Error::Device(format!(
            "device `{other}` is not available in this build (supported: cpu)"
        ))),
    }
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
    check_device(&a.device)?;
    let prompts = ordered_prompts(&a, m)?;
    if !(a.temperature >= 0.0 && a.temperature.is_finite()) {
        return Err(Error::Request(format!(
            "--temperature {} must be >= 0",
            a.temperature
        )));
    }
    let model = load_model(&a.model, a.json)?;
    let topo = Topology::new(a.tp, a.pp);
    topo.validate(&model.config)?;
    let mut econf = EngineConfig::new(topo);
    econf.kv_blocks = a.kv_blocks;
    let mut engine = Engine::new(&model, econf)?;

    let mut ids = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let prompt = match p {
            Prompt::Text(t) => model.tokenizer.encode(t)?,
            Prompt::Ids(ids) => ids.clone(),
        };
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
        let id = engine
            .add_request(req)
            .map_err(|e| Error::Request(format!("prompt {}: {e}", i + 1)))?;
        ids.push(id);
    }

    let t0 = Instant::now();
    engine.run_to_completion()?;
    let elapsed_ms = t0.elapsed().as_secs_f64() * 1e3;

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
            "device": a.device,
            "requests": reqs,
            "steps": engine.steps(),
            "elapsed_ms": elapsed_ms,
        });
        println!("{doc}");
    } else {
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

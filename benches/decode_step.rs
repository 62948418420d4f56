//! One decode step of remp-tiny on the CPU backend, batch 1 and 8, for tp1pp1, tp2pp1
//! and tp1pp2. Besides criterion's timings it prints tokens/s and the step time against
//! the floor set by reading every weight once at the memory bandwidth measured in the
//! same run (a decode step must stream all weights; nothing can be faster).
//!
//! Run: `cargo bench --bench decode_step`. Uses ../shared/models/remp-tiny when present,
//! else the built-in random model of the same shape.

use criterion::{criterion_group, criterion_main, Criterion};
use remp::model::Model;
use remp::parallel::Topology;
use remp::runtime::{Engine, EngineConfig, Request};
use std::path::Path;
use std::time::{Duration, Instant};

fn model() -> Model {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models/remp-tiny");
    Model::load(&dir).unwrap_or_else(|_| Model::random_tiny())
}

/// An engine with `batch` requests prefilled, ready to decode.
fn engine(model: &Model, topo: Topology, batch: usize) -> Engine {
    let mut e = Engine::new(model, EngineConfig::new(topo)).expect("engine");
    refill(&mut e, model, batch);
    e
}

fn refill(e: &mut Engine, model: &Model, batch: usize) {
    let ctx = model.config.max_position_embeddings;
    for r in 0..batch {
        let prompt: Vec<u32> = (0..16)
            .map(|i| ((r * 31 + i * 7 + 2) % 500) as u32)
            .collect();
        let mut req = Request::greedy(prompt, ctx - 16);
        req.ignore_eos = true;
        e.add_request(req).expect("request");
    }
    e.step().expect("prefill");
}

fn bench(c: &mut Criterion) {
    remp::runtime::tune_allocator();
    let model = model();
    let weight_bytes = model.config.num_params() as f64 * 4.0;
    // A copy reads and writes every byte: memory traffic is twice the copy rate.
    let bw = 2.0 * remp::reshard::bench::copy_bandwidth();
    let floor_ms = weight_bytes / bw * 1e3;
    let mut rows = Vec::new();
    let mut g = c.benchmark_group("decode_step");
    g.sample_size(20)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    for (tp, pp) in [(1, 1), (2, 1), (1, 2)] {
        for batch in [1usize, 8] {
            let topo = Topology::new(tp, pp);
            let mut e = engine(&model, topo, batch);
            let mut times = Vec::new();
            g.bench_function(format!("{topo}/batch{batch}"), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        if e.steps() >= 64 {
                            // Keep the context short (16..80 tokens), like the reference.
                            e = engine(&model, topo, batch);
                        }
                        let t = Instant::now();
                        e.step().expect("step");
                        let d = t.elapsed();
                        times.push(d.as_secs_f64());
                        total += d;
                    }
                    total
                })
            });
            times.sort_by(|a, b| a.total_cmp(b));
            let med = times[times.len() / 2] * 1e3;
            rows.push((topo, batch, med));
        }
    }
    g.finish();
    println!(
        "\nremp-tiny decode step, CPU: {:.1} MB of f32 weights, memory bandwidth {:.1} GB/s (copy, read+write) -> floor {:.3} ms/step",
        weight_bytes / 1e6,
        bw / 1e9,
        floor_ms
    );
    println!(
        "{:<8} {:>5} {:>10} {:>10} {:>12}",
        "topology", "batch", "step_ms", "tok/s", "step/floor"
    );
    for (topo, batch, med) in rows {
        println!(
            "{:<8} {:>5} {:>10.3} {:>10.0} {:>12.2}",
            topo.to_string(),
            batch,
            med,
            batch as f64 / (med / 1e3),
            med / floor_ms
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

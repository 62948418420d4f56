//! Host cost of sampling per decode step, 16 rows of a 32k vocabulary (Llama 2's; f32
//! logits, as the driver or a CPU head rank holds them), each against the code it
//! replaced, measured in the same run (the ratios are printed at the end):
//! - greedy: `ops::argmax` (16 lanes, then the first chunk holding the max) vs the
//!   one-chain loop. On a GPU the engine no longer downloads greedy rows' logits at all
//!   (the head's ranks send their picks, see `HeadOutput::Argmax`); this is the CPU
//!   backend's head and the driver's path for steps that gather logits;
//! - top-p 0.9 at temperature 1: `sample` (partial selection of the nucleus) vs a full
//!   sort of the vocabulary, on peaked rows (a nucleus of some 20 tokens) and flat ones
//!   (40% of the vocabulary); the draws are the same (a unit test checks it).
//!
//! Run: `cargo bench --bench sampling`.

use criterion::{criterion_group, criterion_main, Criterion};
use remp::backend::cpu::ops;
use remp::runtime::sampling::{sample, top_p_by_full_sort, Rng, Sampling};
use std::hint::black_box;
use std::time::{Duration, Instant};

const ROWS: usize = 16;
const VOCAB: usize = 32000;
const TOP_P: f32 = 0.9;

/// The loop `ops::argmax` was before: one compare chain through the row.
fn argmax_one_chain(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// Top-p as `sample` did it before (softmax, a full sort, the nucleus, one draw), at
/// temperature 1.
fn top_p_full_sort(logits: &[f32], rng: &mut Rng) -> u32 {
    top_p_by_full_sort(logits, 1.0, TOP_P, rng)
}

/// Seconds per call of `f` over all rows (20 calls), for the printed ratios.
fn per_call(f: &mut dyn FnMut() -> usize) -> f64 {
    let t = Instant::now();
    let mut s = 0;
    for _ in 0..20 {
        s += f();
    }
    black_box(s);
    t.elapsed().as_secs_f64() / 20.0
}

/// Logit-like rows: uniform in [0, 6), plus 12 on `peaks` tokens per row (at `peaks`
/// 0 the top-p 0.9 nucleus is about 40% of the vocabulary; at 24 it is some 20 tokens,
/// closer to a trained model's).
fn rows_with(peaks: usize, seed: u64) -> Vec<f32> {
    let mut g = Rng::new(seed);
    let mut x: Vec<f32> = (0..ROWS * VOCAB)
        .map(|_| (g.next_f64() * 6.0) as f32)
        .collect();
    for r in 0..ROWS {
        for _ in 0..peaks {
            x[r * VOCAB + (g.next_u64() as usize % VOCAB)] += 12.0;
        }
    }
    x
}

fn bench(c: &mut Criterion) {
    let s = Sampling::Random {
        temperature: 1.0,
        top_p: TOP_P,
        seed: 0,
    };
    let mut gr = c.benchmark_group("sampling");
    gr.sample_size(20)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300));
    let mut ratios = Vec::new();
    for (data, peaks) in [("peaked", 24), ("flat", 0)] {
        let logits = rows_with(peaks, 7);
        let rows = || logits.chunks_exact(VOCAB);
        assert!(rows().all(|r| ops::argmax(r) == argmax_one_chain(r)));
        let (mut a, mut b) = (Rng::new(1), Rng::new(1));
        assert!(rows().all(|r| sample(r, &s, &mut a) == top_p_full_sort(r, &mut b)));
        let rng = std::cell::RefCell::new(Rng::new(11));
        let mut greedy_old = || {
            rows()
                .map(|r| argmax_one_chain(black_box(r)))
                .sum::<usize>()
        };
        let mut greedy_new = || rows().map(|r| ops::argmax(black_box(r))).sum::<usize>();
        let mut top_p_old = || {
            let mut g = rng.borrow_mut();
            rows()
                .map(|r| top_p_full_sort(r, &mut g) as usize)
                .sum::<usize>()
        };
        let mut top_p_new = || {
            let mut g = rng.borrow_mut();
            rows()
                .map(|r| sample(r, &s, &mut g) as usize)
                .sum::<usize>()
        };
        if data == "peaked" {
            // (Greedy does not depend on the data; top-p on flat rows: the ratio below.)
            let name = |what: &str| format!("{what}/{ROWS}x{VOCAB}");
            gr.bench_function(name("greedy_one_chain"), |bn| bn.iter(&mut greedy_old));
            gr.bench_function(name("greedy_lanes"), |bn| bn.iter(&mut greedy_new));
            gr.bench_function(name("top_p_full_sort"), |bn| bn.iter(&mut top_p_old));
            gr.bench_function(name("top_p_partial"), |bn| bn.iter(&mut top_p_new));
            ratios.push((
                "greedy",
                per_call(&mut greedy_old),
                per_call(&mut greedy_new),
            ));
        }
        let label = if data == "peaked" {
            "top-p 0.9, peaked rows"
        } else {
            "top-p 0.9, flat rows"
        };
        ratios.push((label, per_call(&mut top_p_old), per_call(&mut top_p_new)));
    }
    gr.finish();
    for (what, old, new) in ratios {
        println!(
            "{what}, {ROWS} x {VOCAB}: before {:.0} us, now {:.0} us ({:.1}x)",
            old * 1e6,
            new * 1e6,
            old / new
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

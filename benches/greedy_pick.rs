//! Host cost of greedy sampling per decode step: the argmax of 16 rows of a 32k
//! vocabulary (Llama 2's; f32 logits, as the driver or a CPU head rank holds them), with
//! `ops::argmax` (16 lanes, then the first index of the max) against the one-chain loop
//! it replaced, measured in the same run; the ratio is printed at the end. On a GPU the
//! engine no longer downloads greedy rows' logits at all (the head's ranks send their
//! picks, see `HeadOutput::Argmax`); this is the CPU backend's head and the driver's
//! path for steps that gather logits.
//!
//! Run: `cargo bench --bench greedy_pick`.

use criterion::{criterion_group, criterion_main, Criterion};
use remp::backend::cpu::ops;
use std::hint::black_box;
use std::time::{Duration, Instant};

const ROWS: usize = 16;
const VOCAB: usize = 32000;

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

fn bench(c: &mut Criterion) {
    // Logits-like rows: small values, the max somewhere in the middle.
    let logits: Vec<f32> = (0..ROWS * VOCAB)
        .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 + if i % VOCAB == 17011 { 9.0 } else { 0.0 })
        .collect();
    let rows = || logits.chunks_exact(VOCAB);
    assert!(rows().all(|r| ops::argmax(r) == argmax_one_chain(r)));
    let mut g = c.benchmark_group("greedy_pick");
    g.sample_size(50)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300));
    g.bench_function(format!("one_chain/{ROWS}x{VOCAB}"), |b| {
        b.iter(|| {
            rows()
                .map(|r| argmax_one_chain(black_box(r)))
                .sum::<usize>()
        })
    });
    g.bench_function(format!("lanes/{ROWS}x{VOCAB}"), |b| {
        b.iter(|| rows().map(|r| ops::argmax(black_box(r))).sum::<usize>())
    });
    g.finish();
    // The ratio, from one more timing of each (criterion keeps its estimates to itself).
    let time = |f: &dyn Fn(&[f32]) -> usize| {
        let t = Instant::now();
        let mut s = 0;
        for _ in 0..200 {
            s += rows().map(|r| f(black_box(r))).sum::<usize>();
        }
        black_box(s);
        t.elapsed().as_secs_f64() / 200.0
    };
    let (old, new) = (time(&argmax_one_chain), time(&ops::argmax));
    println!(
        "greedy pick of {ROWS} x {VOCAB}: one chain {:.1} us, lanes {:.1} us: {:.1}x faster",
        old * 1e6,
        new * 1e6,
        old / new
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! Host cost of graph recording (`--graphs`): recording a decode step's launches and
//! matching each segment's run against the remembered ones, for a step shaped like
//! TinyLlama's on one rank (22 layers of 10 launches with 6–16 arguments, plus the
//! embedding and LM head), against launching the same step kernel by kernel. The device
//! does nothing (every call returns at once) and builds no graphs, so the difference is
//! what the recorder adds on the host per step; on a GPU each replayed graph then saves
//! one launch call per kernel of its run (a few microseconds each), which
//! `remp bench-decode --graphs` measures.
//!
//! Run: `cargo bench --bench graph_recorder`.

use criterion::{criterion_group, criterion_main, Criterion};
use remp::backend::device::graph::{lock, GraphStats, Recorder};
use remp::backend::device::{Arg, Buf, Device, Event, Launch};
use remp::{Error, Result};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A device on which every launch returns at once.
struct Null;

impl Device for Null {
    fn describe(&self) -> String {
        "null".into()
    }
    fn alloc(&self, _: usize) -> Result<Buf> {
        Err(Error::Device("null device".into()))
    }
    fn upload(&self, _: &Buf, _: usize, _: &[u8]) -> Result<()> {
        Ok(())
    }
    fn download(&self, _: &Buf, _: usize, _: &mut [u8]) -> Result<()> {
        Ok(())
    }
    fn copy(&self, _: &Buf, _: usize, _: &Buf, _: usize, _: usize) -> Result<()> {
        Ok(())
    }
    unsafe fn launch(&self, _: &str, _: [u32; 3], _: u32, args: &[Arg]) -> Result<()> {
        std::hint::black_box(args);
        Ok(())
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn record(&self) -> Result<Event> {
        Err(Error::Device("null device".into()))
    }
    fn wait(&self, _: &Event) -> Result<()> {
        Ok(())
    }
    fn sm_count(&self) -> u32 {
        132
    }
}

/// The launches of one segment: `n` kernels with `args` arguments each, pointers that
/// differ per segment (another layer's weights) but repeat from step to step.
fn segment(seg: u64, n: usize) -> Vec<Launch> {
    (0..n)
        .map(|i| Launch {
            name: format!("kernel_{i}"),
            grid: [128, 1, 1],
            block: 256,
            args: (0..6 + (i % 11) as u64)
                .map(|a| match a % 3 {
                    0 => Arg::Ptr(0x7f00_0000_0000 + seg * 0x100_0000 + a * 0x1000),
                    1 => Arg::U32(2048),
                    _ => Arg::F32(1e-5),
                })
                .collect(),
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let step: Vec<Vec<Launch>> = std::iter::once(segment(0, 1))
        .chain((1..=22).map(|l| segment(l, 10)))
        .chain(std::iter::once(segment(23, 3)))
        .collect();
    let kernels: usize = step.iter().map(Vec::len).sum();
    let dev = Null;
    let mut g = c.benchmark_group("graph_recorder");
    g.sample_size(30)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300));
    g.bench_function(format!("eager/{kernels}_kernels"), |b| {
        b.iter(|| {
            for seg in &step {
                for l in seg {
                    // SAFETY: the null device touches nothing.
                    unsafe { dev.launch(&l.name, l.grid, l.block, &l.args) }.unwrap();
                }
            }
        })
    });
    let rec = Mutex::new(Recorder::new(4 * 24, Arc::new(GraphStats::default())));
    g.bench_function(format!("recorded/{kernels}_kernels"), |b| {
        b.iter(|| {
            for seg in &step {
                let scope = Recorder::enter(&rec);
                for l in seg {
                    // (DeviceCompute builds the Launch from its arguments the same way.)
                    let l = Launch {
                        name: l.name.clone(),
                        grid: l.grid,
                        block: l.block,
                        args: l.args.clone(),
                    };
                    assert!(lock(&rec).record(l).is_none());
                }
                scope.finish(&dev, true).unwrap();
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

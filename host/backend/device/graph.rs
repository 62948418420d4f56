//! Graphs for the kernel runs of a step (`EngineConfig::graphs`, `--graphs`).
//!
//! A decode step is a few hundred small kernels; launched one by one, the host's launch
//! calls and the gaps between kernels can cost as much as the kernels at batch 1. A
//! worker with graphs on records the launches of each segment (embedding, one layer,
//! the LM head) instead of issuing them, and at the end of the run — the segment's end,
//! or any other device call in between (a copy, an upload, a download, an event) — hands
//! the run to the [`Recorder`]:
//! - a run seen for the first time is launched kernel by kernel and remembered;
//! - the second time the same run (same kernels, grids and every argument, pointers
//!   included) is wanted, it is built into a [`Graph`] and launched as one;
//! - after that it is replayed.
//!
//! Matching the whole run exactly keeps replays correct by construction: a graph only
//! runs where the eager launches would have been the very same ones. What makes runs
//! repeat is that a worker's buffers (weights, KV cache, per-purpose scratch, step
//! inputs) keep their addresses from step to step, and that the step-dependent launch
//! parameters change seldom: the block tables' row stride is padded to a multiple of
//! [`TABLE_STRIDE_BLOCKS`] and the attention split only changes every 256 tokens, so a
//! decode at a fixed batch repeats each layer's run for hundreds of steps. A new batch
//! size or context bucket means new runs: the recorder keeps the most recently used
//! [`Recorder::capacity`] of them.
//!
//! Only launches are recorded. Any other call on the device flushes the run first,
//! so every copy, upload and event keeps its place in the stream order; and nothing
//! that a recorded launch reads may be freed before the run is flushed (the frees of
//! temporary buffers are queued after the work already issued), which is why the
//! recording scope is one segment ([`super::llama::DeviceCompute::segment`]) and the
//! same-device exchange flushes before it drops a received buffer.

use super::{Device, Graph, Launch};
use crate::Result;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Block-table row stride (in KV blocks) is padded to a multiple of this, so that the
/// attention launches of a decode stay the same while contexts grow by 256 tokens (at
/// 16-token blocks) instead of changing at every block.
pub const TABLE_STRIDE_BLOCKS: usize = 16;

/// Runs shorter than this are launched eagerly (a graph of one kernel saves nothing).
const MIN_RUN: usize = 2;

/// Counters over every worker of an engine (shared, relaxed atomics).
#[derive(Debug, Default)]
pub struct GraphStats {
    /// Runs launched kernel by kernel (first sighting, too short, or a hash collision).
    pub eager_runs: AtomicU64,
    /// Runs launched as a graph (the build included).
    pub graph_runs: AtomicU64,
    /// Kernels launched as part of a graph.
    pub graph_kernels: AtomicU64,
    /// Graphs built.
    pub built: AtomicU64,
    /// Runs forgotten (with their graph, if built) to stay within capacity.
    pub evicted: AtomicU64,
    /// Runs whose graph could not be built (launched kernel by kernel from then on).
    pub build_failures: AtomicU64,
}

/// A snapshot of [`GraphStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraphCounts {
    pub eager_runs: u64,
    pub graph_runs: u64,
    pub graph_kernels: u64,
    pub built: u64,
    pub evicted: u64,
    pub build_failures: u64,
}

impl GraphStats {
    pub fn snapshot(&self) -> GraphCounts {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        GraphCounts {
            eager_runs: g(&self.eager_runs),
            graph_runs: g(&self.graph_runs),
            graph_kernels: g(&self.graph_kernels),
            built: g(&self.built),
            evicted: g(&self.evicted),
            build_failures: g(&self.build_failures),
        }
    }
    fn add(a: &AtomicU64, n: u64) {
        a.fetch_add(n, Ordering::Relaxed);
    }
}

struct Entry {
    run: Vec<Launch>,
    graph: Option<Graph>,
    /// Building its graph failed once: not tried again.
    unbuildable: bool,
    last_used: u64,
}

/// One worker's recorded run and its remembered runs (see the module comment).
pub struct Recorder {
    /// Launches of the current run, not issued yet.
    pending: Vec<Launch>,
    /// Whether launches are recorded now (inside a segment).
    recording: bool,
    runs: HashMap<u64, Entry>,
    clock: u64,
    capacity: usize,
    stats: std::sync::Arc<GraphStats>,
    /// A build failure was reported on stderr (once per worker).
    warned: bool,
    /// No new runs remembered or built (a switch is in flight): see
    /// [`Recorder::set_frozen`].
    frozen: bool,
}

/// The recorder's lock. A panic while it was held (a launch that panicked inside a
/// flush) leaves no half-done state that matters: the pending run was taken out first,
/// and a [`Scope`] dropped by that unwinding clears what is left.
pub fn lock(r: &Mutex<Recorder>) -> MutexGuard<'_, Recorder> {
    r.lock().unwrap_or_else(|e| e.into_inner())
}

/// One segment's recording, from [`Recorder::enter`] to [`Scope::finish`]. Dropped
/// without finishing — a panic unwinding through the segment — it drops the recorded
/// launches, which must not run later in another step's order.
pub struct Scope<'a> {
    rec: &'a Mutex<Recorder>,
    finished: bool,
}

impl Scope<'_> {
    /// Stops recording: issues the run if `ok`, else drops it (a failed segment fails
    /// its step).
    pub fn finish(mut self, dev: &dyn Device, ok: bool) -> Result<()> {
        let r = lock(self.rec).end(dev, ok);
        self.finished = true;
        r
    }
}

impl Drop for Scope<'_> {
    fn drop(&mut self) {
        if !self.finished {
            let mut r = lock(self.rec);
            r.recording = false;
            r.pending.clear();
        }
    }
}

fn run_hash(run: &[Launch]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    run.hash(&mut h);
    h.finish()
}

impl Recorder {
    /// Remembers up to `capacity` runs (a few per layer and batch shape in use).
    pub fn new(capacity: usize, stats: std::sync::Arc<GraphStats>) -> Recorder {
        Recorder {
            pending: Vec::new(),
            recording: false,
            runs: HashMap::new(),
            clock: 0,
            capacity: capacity.max(1),
            stats,
            warned: false,
            frozen: false,
        }
    }

    /// While a switch is in flight the runs of the segments that flipped are new every
    /// step or two (new shards, new groups) and are never used again once it is over:
    /// remembering and building them only costs (run 7: the online switch's max gap
    /// 19.9 ms with graphs against 16.4 without). Frozen, the recorder still replays the
    /// graphs it has (segments not moving keep theirs) and launches anything else kernel
    /// by kernel, remembering nothing.
    pub fn set_frozen(&mut self, frozen: bool) {
        self.frozen = frozen;
    }

    /// Starts recording a segment (launches are held until the scope finishes).
    pub fn enter(rec: &Mutex<Recorder>) -> Scope<'_> {
        lock(rec).recording = true;
        Scope {
            rec,
            finished: false,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Stops recording: issues the run if `ok`, else drops it (a failed segment fails
    /// its step; its launches must not run later, in another step's order).
    fn end(&mut self, dev: &dyn Device, ok: bool) -> Result<()> {
        self.recording = false;
        if ok {
            self.flush(dev)
        } else {
            self.pending.clear();
            Ok(())
        }
    }

    /// Records a launch; returns it back when not recording (launch it now).
    pub fn record(&mut self, l: Launch) -> Option<Launch> {
        if self.recording {
            self.pending.push(l);
            None
        } else {
            Some(l)
        }
    }

    /// Issues the recorded run on `dev`: replayed, built into a graph, or kernel by
    /// kernel (see the module comment).
    pub fn flush(&mut self, dev: &dyn Device) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let run = std::mem::take(&mut self.pending);
        if run.len() < MIN_RUN {
            return self.eager(dev, &run);
        }
        self.clock += 1;
        let key = run_hash(&run);
        match self.runs.get_mut(&key) {
            Some(e) if e.run == run => {
                e.last_used = self.clock;
                if e.graph.is_none() && !e.unbuildable && !self.frozen {
                    // SAFETY: the run's launches are the ones the caller asked for now
                    // (equal arguments), so the graph is launched under the same
                    // contract as they would have been.
                    match unsafe { dev.build_graph(&run) } {
                        Ok(Some(g)) => {
                            e.graph = Some(g);
                            GraphStats::add(&self.stats.built, 1);
                        }
                        Ok(None) => e.unbuildable = true,
                        // A graph is an optimisation: the run goes out kernel by kernel
                        // (its launches are checked there), said once per worker.
                        Err(err) => {
                            e.unbuildable = true;
                            GraphStats::add(&self.stats.build_failures, 1);
                            if !self.warned {
                                self.warned = true;
                                eprintln!(
                                    "remp: a graph of {} kernels could not be built ({err}); such runs are launched kernel by kernel",
                                    run.len()
                                );
                            }
                        }
                    }
                }
                match &e.graph {
                    Some(g) => {
                        dev.launch_graph(g)?;
                        GraphStats::add(&self.stats.graph_runs, 1);
                        GraphStats::add(&self.stats.graph_kernels, run.len() as u64);
                        Ok(())
                    }
                    None => self.eager(dev, &run),
                }
            }
            // A different run with the same hash: launched as is, the remembered one
            // kept.
            Some(_) => self.eager(dev, &run),
            None if self.frozen => self.eager(dev, &run),
            None => {
                self.eager(dev, &run)?;
                if self.runs.len() >= self.capacity {
                    self.evict_oldest();
                }
                self.runs.insert(
                    key,
                    Entry {
                        run,
                        graph: None,
                        unbuildable: false,
                        last_used: self.clock,
                    },
                );
                Ok(())
            }
        }
    }

    fn eager(&self, dev: &dyn Device, run: &[Launch]) -> Result<()> {
        for l in run {
            // SAFETY: launches recorded by DeviceCompute, whose call sites pass each
            // kernel's parameter list with pointers into live buffers; issued in order,
            // before anything that could free those buffers (see the module comment).
            unsafe { dev.launch(&l.name, l.grid, l.block, &l.args)? };
        }
        GraphStats::add(&self.stats.eager_runs, 1);
        Ok(())
    }

    fn evict_oldest(&mut self) {
        if let Some(k) = self
            .runs
            .iter()
            .min_by_key(|(_, e)| e.last_used)
            .map(|(k, _)| *k)
        {
            self.runs.remove(&k);
            GraphStats::add(&self.stats.evicted, 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::device::emu::EmuDevice;
    use crate::backend::device::{download_vec, upload_new, Arg, Buf};
    use std::sync::Arc;

    /// `out[i] = a[i] + b[i]` as a recorded launch (the residual-add kernel).
    fn add(out: &Buf, a: &Buf, b: &Buf, n: usize) -> Launch {
        Launch {
            name: "residual_add_bf16".into(),
            grid: [1, 1, 1],
            block: 128,
            args: vec![
                Arg::from(out),
                Arg::from(a),
                Arg::from(b),
                Arg::U32(n as u32),
            ],
        }
    }

    fn bf(v: &[f32]) -> Vec<half::bf16> {
        v.iter().map(|&x| half::bf16::from_f32(x)).collect()
    }

    /// Eager on first sight, built on the second, replayed after; replays compute what
    /// eager launches do; a run with one argument changed is a different run.
    #[test]
    fn runs_are_built_on_second_sight_and_replayed() {
        let dev = EmuDevice::new();
        let stats = Arc::new(GraphStats::default());
        let rec = Mutex::new(Recorder::new(8, stats.clone()));
        let n = 8;
        let one = upload_new(&dev, &bf(&[1.0; 8])).unwrap();
        let x = upload_new(&dev, &bf(&[0.0; 8])).unwrap();
        // x += 1 twice per run
        let run = || vec![add(&x, &x, &one, n), add(&x, &x, &one, n)];
        for _ in 0..4 {
            let s = Recorder::enter(&rec);
            for l in run() {
                assert!(lock(&rec).record(l).is_none());
            }
            s.finish(&dev, true).unwrap();
        }
        let v: Vec<half::bf16> = download_vec(&dev, &x, n).unwrap();
        assert!(v.iter().all(|&e| e.to_f32() == 8.0), "{v:?}");
        let c = stats.snapshot();
        assert_eq!((c.eager_runs, c.built, c.graph_runs), (1, 1, 3), "{c:?}");
        assert_eq!(c.graph_kernels, 6);
        // same kernels, another count: a new run (eager), not a replay of the old one
        let s = Recorder::enter(&rec);
        lock(&rec).record(add(&x, &x, &one, n - 1));
        lock(&rec).record(add(&x, &x, &one, n - 1));
        s.finish(&dev, true).unwrap();
        let c = stats.snapshot();
        assert_eq!((c.eager_runs, c.graph_runs), (2, 3), "{c:?}");
        let v: Vec<half::bf16> = download_vec(&dev, &x, n).unwrap();
        assert_eq!(v[0].to_f32(), 10.0);
        assert_eq!(v[n - 1].to_f32(), 8.0, "the changed count must be honoured");
    }

    /// Outside a segment launches go straight out; a failed segment's run is dropped,
    /// and so is a panicking one's (the scope's guard); capacity evicts the least
    /// recently used run.
    /// Frozen (a switch in flight), a built graph still replays, and a new run is
    /// launched kernel by kernel every time without being remembered or built; thawed,
    /// it is remembered and built as usual.
    #[test]
    fn a_frozen_recorder_replays_but_remembers_nothing() {
        let dev = EmuDevice::new();
        let stats = Arc::new(GraphStats::default());
        let rec = Mutex::new(Recorder::new(8, stats.clone()));
        let n = 8;
        let one = upload_new(&dev, &bf(&[1.0; 8])).unwrap();
        let (x, y) = (
            upload_new(&dev, &bf(&[0.0; 8])).unwrap(),
            upload_new(&dev, &bf(&[0.0; 8])).unwrap(),
        );
        let go = |out: &Buf| {
            let s = Recorder::enter(&rec);
            lock(&rec).record(add(out, out, &one, n));
            lock(&rec).record(add(out, out, &one, n));
            s.finish(&dev, true).unwrap();
        };
        go(&x);
        go(&x); // built
        lock(&rec).set_frozen(true);
        go(&x); // replayed
        for _ in 0..3 {
            go(&y); // new while frozen: eager each time
        }
        let c = stats.snapshot();
        assert_eq!((c.eager_runs, c.built, c.graph_runs), (4, 1, 2), "{c:?}");
        assert_eq!(lock(&rec).runs.len(), 1, "nothing remembered while frozen");
        lock(&rec).set_frozen(false);
        go(&y);
        go(&y); // remembered, then built
        let c = stats.snapshot();
        assert_eq!((c.eager_runs, c.built, c.graph_runs), (5, 2, 3), "{c:?}");
        let (vx, vy): (Vec<half::bf16>, Vec<half::bf16>) = (
            download_vec(&dev, &x, n).unwrap(),
            download_vec(&dev, &y, n).unwrap(),
        );
        assert!(vx.iter().all(|&e| e.to_f32() == 6.0), "{vx:?}");
        assert!(vy.iter().all(|&e| e.to_f32() == 10.0), "{vy:?}");
    }

    #[test]
    fn dropped_runs_and_eviction() {
        let dev = EmuDevice::new();
        let stats = Arc::new(GraphStats::default());
        let rec = Mutex::new(Recorder::new(2, stats.clone()));
        let one = upload_new(&dev, &bf(&[1.0; 4])).unwrap();
        let x = upload_new(&dev, &bf(&[0.0; 4])).unwrap();
        assert!(lock(&rec).record(add(&x, &x, &one, 4)).is_some());
        let s = Recorder::enter(&rec);
        lock(&rec).record(add(&x, &x, &one, 4));
        lock(&rec).record(add(&x, &x, &one, 4));
        s.finish(&dev, false).unwrap();
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _s = Recorder::enter(&rec);
            lock(&rec).record(add(&x, &x, &one, 4));
            lock(&rec).record(add(&x, &x, &one, 4));
            panic!("a segment panics");
        }));
        assert!(panicked.is_err());
        // Not recording any more, and nothing left to issue.
        assert!(lock(&rec).record(add(&x, &x, &one, 4)).is_some());
        lock(&rec).flush(&dev).unwrap();
        let v: Vec<half::bf16> = download_vec(&dev, &x, 4).unwrap();
        assert_eq!(
            v[0].to_f32(),
            0.0,
            "a failed segment's launches must not run"
        );
        assert_eq!(stats.snapshot(), GraphCounts::default());
        for n in [1, 2, 3] {
            let s = Recorder::enter(&rec);
            lock(&rec).record(add(&x, &x, &one, n));
            lock(&rec).record(add(&x, &x, &one, n));
            s.finish(&dev, true).unwrap();
        }
        assert_eq!(stats.snapshot().evicted, 1);
        assert_eq!(lock(&rec).runs.len(), 2);
    }

    /// A device whose graphs cannot be built: the emulator, refusing.
    struct NoGraphs(EmuDevice);

    impl Device for NoGraphs {
        fn describe(&self) -> String {
            self.0.describe()
        }
        fn alloc(&self, bytes: usize) -> Result<Buf> {
            self.0.alloc(bytes)
        }
        fn upload(&self, dst: &Buf, off: usize, src: &[u8]) -> Result<()> {
            self.0.upload(dst, off, src)
        }
        fn download(&self, src: &Buf, off: usize, dst: &mut [u8]) -> Result<()> {
            self.0.download(src, off, dst)
        }
        fn copy(&self, d: &Buf, d_off: usize, s: &Buf, s_off: usize, n: usize) -> Result<()> {
            self.0.copy(d, d_off, s, s_off, n)
        }
        unsafe fn launch(&self, name: &str, g: [u32; 3], b: u32, args: &[Arg]) -> Result<()> {
            self.0.launch(name, g, b, args)
        }
        fn synchronize(&self) -> Result<()> {
            self.0.synchronize()
        }
        fn record(&self) -> Result<crate::backend::device::Event> {
            self.0.record()
        }
        fn wait(&self, e: &crate::backend::device::Event) -> Result<()> {
            self.0.wait(e)
        }
        fn sm_count(&self) -> u32 {
            self.0.sm_count()
        }
        fn has_kernel(&self, name: &str) -> bool {
            self.0.has_kernel(name)
        }
        unsafe fn build_graph(&self, _: &[Launch]) -> Result<Option<Graph>> {
            Err(crate::Error::Device("out of memory (test)".into()))
        }
    }

    /// A failed build is not an error of the step: the run goes out kernel by kernel,
    /// now and later, without another build attempt.
    #[test]
    fn a_failed_build_falls_back_to_eager_launches() {
        let dev = NoGraphs(EmuDevice::new());
        let stats = Arc::new(GraphStats::default());
        let rec = Mutex::new(Recorder::new(4, stats.clone()));
        let one = upload_new(&dev, &bf(&[1.0; 4])).unwrap();
        let x = upload_new(&dev, &bf(&[0.0; 4])).unwrap();
        for _ in 0..3 {
            let s = Recorder::enter(&rec);
            lock(&rec).record(add(&x, &x, &one, 4));
            lock(&rec).record(add(&x, &x, &one, 4));
            s.finish(&dev, true).unwrap();
        }
        let v: Vec<half::bf16> = download_vec(&dev, &x, 4).unwrap();
        assert_eq!(v[0].to_f32(), 6.0);
        let c = stats.snapshot();
        assert_eq!(
            (c.eager_runs, c.build_failures, c.built),
            (3, 1, 0),
            "{c:?}"
        );
    }
}

//! `remp-gpu-bench`: times remp's Rust/PTX kernels on the GPU against baselines measured
//! in the same run (see `tools/gpu-check`):
//! - HBM bandwidth: `cuMemcpyDtoD` of 256 MiB (bytes read + written);
//! - `reshard_copy2d` (contiguous and a column-slice) vs that DtoD copy, same bytes;
//! - decode GEMM (M = 1, 8, 16; 7B–70B shard shapes): weight bytes / time, % of HBM, and
//!   the same kernel built without its register cap (`gemm_decode64_bf16`): capped /
//!   uncapped;
//! - prefill GEMM 4096³ (`gemm_mma_bf16` and the 256x128-tile `gemm_mma_wide_bf16`) vs
//!   cuBLAS `cublasGemmEx` (bf16 in/out, f32 compute) → % of cuBLAS TFLOP/s, and the
//!   wide / old ratio; on sm_90a devices (compute capability 9.0) also the wgmma kernel
//!   `gemm_wgmma_bf16` (wgmma / mma ratio, % of cuBLAS);
//! - decode attention, batch 32 × 4096 context (8 KV heads, 32 q heads, d 128): KV bytes
//!   read / time (incl. the split-K combine), % of HBM, for `attn_decode_bf16` and the
//!   `cp.async`-pipelined `attn_decode_pipelined_bf16` side by side on each split size;
//! - the fused decode-layer kernels (`gemm_decode_qkv_rope_bf16` with its RMSNorm, and
//!   `gemm_decode_silu_bf16` with its RMSNorm) against the launches they replace, on a
//!   1.1B layer at M = 1 and 16: µs each way (eager launches, weights rotating), speed-up;
//! - causal prefill attention, 4 sequences × 2048 new tokens (no cache, 32 q / 8 KV
//!   heads, d 128): `attn_prefill_bf16` (SIMT) and `attn_prefill_mma_bf16` (tensor
//!   cores) in the same run: ms, TFLOP/s (causal: half the FLOPs), mma / SIMT speed-up
//!   (also in `--profile`, one call each).
//!
//! Method: inputs are random bf16 (never zeros) in a 1 GiB pool; operands rotate through
//! the pool so every timed working set is ≥ 256 MiB (L2 is 50–60 MB); CUDA events
//! around batches of launches after warm-up; the median over batches is reported.
//! Writes the table to stdout and JSON to `$OUT/kernels.json` (`$OUT` defaults to
//! `./gpu-out`). Exits 2 with one line when there is no GPU.
//!
//! `--profile`: a short run for Nsight Compute (`tools/gpu-check` runs it under `ncu
//! --profile-from-start off`): the same set-up, but only decode GEMM M=1 at K=8192 N=1024
//! and K=4096 N=4096 (plain and split-K), both 4096³ mma GEMMs and, on sm_90a, the
//! wgmma one (no cuBLAS), both decode attention kernels at their best split from the
//! full run's `$OUT/kernels.json` (else 1024, run 4's best) and `reshard_copy2d`
//! packed → column; each case one warm-up call, then one call between
//! `cuProfilerStart` and `cuProfilerStop`, so exactly that call's launches are
//! profiled. Its timings are single calls: no table, no JSON.
//!
//! `--no-wgmma`: leaves out the sm_90a wgmma GEMM (`tools/gpu-check` passes it when that
//! kernel's GPU test did not pass, so a fault or hang there cannot cost the rest).

use remp::backend::cuda::{Arg, CudaDevice, DevBuf, EventTimer};
use remp::kernels::gemm_args;
use remp::Result;
use remp_gpu_kernels::attention::{FA_BM, FA_THREADS};
use remp_gpu_kernels::gemm::{dec_block, dec_splitk, MMA_WIDE_BM, MMA_WIDE_SMEM};
use remp_gpu_kernels::gemm_wgmma::{WGMMA_SMEM, WG_BM, WG_BN, WG_THREADS};
use serde_json::{json, Value};

const MIB: usize = 1 << 20;

const POOL: usize = 1024 * MIB;

/// Decode attention split sizes (tokens per split) the bench tries.
const ATTN_SPLITS: [usize; 5] = [4096, 2048, 1024, 512, 256];

const USAGE: &str = "usage: remp-gpu-bench [--profile] [--no-wgmma]";

fn main() {
    let (mut profile, mut no_wgmma) = (false, false);
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "--profile" => profile = true,
            "--no-wgmma" => no_wgmma = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return;
            }
            _ => {
                eprintln!("remp-gpu-bench: unknown argument `{a}` ({USAGE})");
                std::process::exit(2);
            }
        }
    }
    match run(profile, no_wgmma) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("remp-gpu-bench: {e}");
            std::process::exit(2);
        }
    }
}

struct Bench<'a> {
    dev: &'a CudaDevice,
    timer: EventTimer,
    rows: Vec<Value>,
    /// `--profile`: [`Bench::time`] makes one warm-up call and one profiled call
    profile: bool,
}

impl Bench<'_> {
    /// Median milliseconds per call of `f(i)` (i counts up, for rotation): 3 warm-up
    /// batches, then `reps` batches of `inner` calls, each batch timed with events.
    /// With `profile`: `f(0)`, then `f(1)` alone between `cuProfilerStart` and
    /// `cuProfilerStop` (what `ncu --profile-from-start off` profiles), its time returned.
    fn time(
        &self,
        reps: usize,
        inner: usize,
        mut f: impl FnMut(usize) -> Result<()>,
    ) -> Result<f64> {
        if self.profile {
            f(0)?;
            self.dev.synchronize()?;
            self.profiler(true)?;
            self.timer.start()?;
            f(1)?;
            let t = self.timer.stop_ms()? as f64;
            self.profiler(false)?;
            return Ok(t);
        }
        let mut i = 0;
        for _ in 0..3 * inner {
            f(i)?;
            i += 1;
        }
        self.dev.synchronize()?;
        let mut ts = Vec::with_capacity(reps);
        for _ in 0..reps {
            self.timer.start()?;
            for _ in 0..inner {
                f(i)?;
                i += 1;
            }
            ts.push(self.timer.stop_ms()? as f64 / inner as f64);
        }
        self.dev.synchronize()?;
        ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
        Ok(ts[ts.len() / 2])
    }

    /// `cuProfilerStart` / `cuProfilerStop` on this device's context (no-ops when no
    /// profiler is attached).
    fn profiler(&self, on: bool) -> Result<()> {
        use cudarc::driver::{profiler_start, profiler_stop};
        self.dev.bind()?;
        if on {
            profiler_start()
        } else {
            profiler_stop()
        }
        .map_err(|e| remp::Error::Device(format!("cuProfilerStart/Stop: {e:?}")))
    }
}

/// `--profile`: the split each decode attention kernel is profiled at: the full run's
/// best (`best_split_tokens` of its row in `$OUT/kernels.json`), else 1024.
fn profile_attn_split(kernel: &str) -> usize {
    let path = std::path::Path::new(&out_dir()).join("kernels.json");
    let best = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| serde_json::from_str::<Value>(&s).ok())
        .and_then(|doc| {
            doc["results"]
                .as_array()?
                .iter()
                .find_map(|r| (r["bench"] == kernel).then(|| r["best_split_tokens"].as_u64())?)
        });
    best.map(|b| b as usize)
        .filter(|b| ATTN_SPLITS.contains(b))
        .unwrap_or(1024)
}

fn out_dir() -> String {
    std::env::var("OUT").unwrap_or_else(|_| "gpu-out".into())
}

/// Fill `buf` with random finite bf16 values in ±[2^-7, 1): 64 MiB from the host,
/// replicated on the device.
fn fill_random(dev: &CudaDevice, buf: &DevBuf) -> Result<()> {
    let chunk = (64 * MIB).min(buf.len());
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let host: Vec<u16> = (0..chunk / 2)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let r = (s >> 16) as u16;
            let e = 120 + (r % 7);
            (r & 0x8000) | (e << 7) | ((s >> 40) as u16 & 0x7F)
        })
        .collect();
    buf.upload(&host)?;
    let mut off = chunk;
    while off < buf.len() {
        let n = chunk.min(buf.len() - off);
        dev.copy_dtod(buf.at(off), buf.ptr(), n)?;
        off += n;
    }
    dev.synchronize()
}

fn gbs(bytes: f64, ms: f64) -> f64 {
    bytes / (ms * 1e-3) / 1e9
}

fn run(profile: bool, no_wgmma: bool) -> Result<()> {
    let dev = CudaDevice::open(0)?;
    let t0 = std::time::Instant::now();
    dev.load_kernels()?;
    let load_s = t0.elapsed().as_secs_f64();
    let sms = dev.sm_count()?;
    let (cc0, cc1) = dev.compute_capability();
    println!(
        "device: {} (sm_{cc0}{cc1}, {sms} SMs), PTX {} module loaded in {load_s:.2} s",
        dev.name(),
        dev.arch().name()
    );
    let mut b = Bench {
        dev: &dev,
        timer: EventTimer::new(&dev)?,
        rows: vec![],
        profile,
    };
    if profile {
        println!("--profile: one warm-up and one profiled call per case; timings are single calls");
    }
    let pool = dev.alloc(POOL)?;
    fill_random(&dev, &pool)?;
    // a pool offset for rotation step i of buffers of `bytes` bytes (256-byte aligned)
    let rot = |i: usize, bytes: usize| -> u64 {
        let slots = ((POOL - bytes) / bytes.next_multiple_of(256)).max(1);
        pool.at((i % slots) * bytes.next_multiple_of(256))
    };

    // ---- HBM bandwidth: DtoD 256 MiB (read + write)
    let copy_bytes = 256 * MIB;
    let dst = dev.alloc(copy_bytes)?;
    dst.fill(0x3C)?;
    let t = b.time(15, 4, |i| {
        dev.copy_dtod(dst.ptr(), pool.at((i % 3) * copy_bytes), copy_bytes)
    })?;
    let hbm = gbs(2.0 * copy_bytes as f64, t);
    b.rows
        .push(json!({"bench": "hbm_dtod", "bytes_rw": 2 * copy_bytes, "ms": t, "gb_s": hbm}));
    println!("HBM (cuMemcpyDtoD 256 MiB, read+write): {hbm:.0} GB/s");

    // ---- reshard_copy2d vs DtoD
    let cols = 8192usize; // bf16 row of 16 KiB
    for (label, rows, src_stride, dst_stride) in [
        ("contiguous 256 MiB", copy_bytes / (cols * 2), cols, cols),
        (
            "column half of [rows, 2*cols] -> packed",
            copy_bytes / (cols * 2),
            2 * cols,
            cols,
        ),
        (
            "packed -> column half of [rows, 2*cols]",
            copy_bytes / (cols * 4),
            cols,
            2 * cols,
        ),
    ] {
        if profile && !label.starts_with("packed") {
            continue;
        }
        let items = rows * (cols * 2).div_ceil(8192);
        let grid = (items.div_ceil(4) as u32).clamp(1, 8 * sms);
        let dstb = if dst_stride > cols {
            dev.alloc(rows * dst_stride * 2)?
        } else {
            dev.alloc(rows * cols * 2)?
        };
        let src_span = rows * src_stride * 2;
        let t = b.time(15, 4, |i| {
            let src = if src_span <= POOL / 2 {
                pool.at((i % 2) * (POOL / 2))
            } else {
                pool.ptr()
            };
            let args = [
                Arg::Ptr(dstb.ptr()),
                Arg::U64(0),
                Arg::U64(dst_stride as u64),
                Arg::Ptr(src),
                Arg::U64(0),
                Arg::U64(src_stride as u64),
                Arg::U32(rows as u32),
                Arg::U32(cols as u32),
                Arg::U32(2),
            ];
            unsafe { dev.launch("reshard_copy2d", [grid, 1, 1], 128, &args) }
        })?;
        let bytes = (2 * rows * cols * 2) as f64;
        // DtoD of the same bytes
        let td = b.time(15, 4, |i| {
            dev.copy_dtod(dstb.ptr(), pool.at((i % 2) * (POOL / 2)), rows * cols * 2)
        })?;
        let (g, gd) = (gbs(bytes, t), gbs(bytes, td));
        println!(
            "reshard_copy2d {label}: {g:.0} GB/s vs DtoD {gd:.0} GB/s = {:.1}%",
            100.0 * g / gd
        );
        b.rows.push(
            json!({"bench": "reshard_copy2d", "case": label, "bytes_rw": bytes, "ms": t,
            "gb_s": g, "dtod_gb_s": gd, "pct_of_dtod": 100.0 * g / gd, "grid": grid}),
        );
    }

    // ---- decode GEMM
    let y = dev.alloc(64 * MIB)?;
    let ws = dev.alloc(16 * MIB)?; // split-K partials

    for &(label, k, n) in &[
        ("7B q/o (K=4096,N=4096)", 4096usize, 4096usize),
        ("8B up (K=4096,N=14336)", 4096, 14336),
        ("70B gate TP8 (K=8192,N=3584)", 8192, 28672 / 8),
        ("70B down TP8 (K=3584,N=8192)", 28672 / 8, 8192),
        ("70B q TP8 (K=8192,N=1024)", 8192, 1024),
    ] {
        // --profile: M = 1 of the 7B q/o and 70B q TP8 shapes (furthest from HBM)
        if profile && !matches!((k, n), (8192, 1024) | (4096, 4096)) {
            continue;
        }
        for m in [1usize, 8, 16] {
            if profile && m > 1 {
                break;
            }
            let wbytes = n * k * 2;
            // gemm::DEC_COLS = 16 columns per block; block per gemm::dec_block: 512
            // threads (DEC_BLOCK_WIDE) at most one block per SM, else 256 (DEC_BLOCK)
            let grid = [n.div_ceil(16) as u32, 1, 1];
            let block = dec_block(grid[0], sms);
            // (the same launch for the capped kernel and its uncapped build)
            let time_decode = |b: &Bench, kernel: &str| {
                b.time(21, 8, |i| {
                    let w = rot(i, wbytes);
                    let x = rot(i + 7, m * k * 2);
                    let args = gemm_args([y.ptr(), x, w, 0, 0], (m, n, k), (k, n));
                    unsafe { dev.launch(kernel, grid, block, &args) }
                })
            };
            let t = time_decode(&b, "gemm_decode_bf16")?;
            let g = gbs(wbytes as f64, t);
            println!(
                "gemm_decode M={m:2} {label} block {block}: {:.1} us, {g:.0} GB/s weights = {:.1}% of HBM",
                t * 1e3,
                100.0 * g / hbm
            );
            b.rows.push(
                json!({"bench": "gemm_decode_bf16", "case": label, "m": m, "n": n, "k": k,
                "block": block, "splits": 1, "ms": t, "weight_gb_s": g, "pct_of_hbm": 100.0 * g / hbm}),
            );
            // the same code without the register cap (maxnreg.txt): ptxas sinks its loads
            // between the mmas; capped / uncapped says whether the cap pays
            if !profile {
                let t64 = time_decode(&b, "gemm_decode64_bf16")?;
                let g64 = gbs(wbytes as f64, t64);
                println!(
                    "gemm_decode M={m:2} {label} uncapped (64 registers): {:.1} us, {:.1}% of HBM; capped / uncapped = {:.2}x",
                    t64 * 1e3,
                    100.0 * g64 / hbm,
                    t64 / t
                );
                b.rows.push(
                    json!({"bench": "gemm_decode64_bf16", "case": label, "m": m, "n": n, "k": k,
                    "block": block, "ms": t64, "weight_gb_s": g64, "pct_of_hbm": 100.0 * g64 / hbm,
                    "capped_speedup": t64 / t}),
                );
            }
            // split-K (what the host launches when dec_splitk says so): partials
            // `gemm_decode_splitk_bf16` grid (ceil(N/16), splits) into an f32 workspace
            // [splits, M, N], then `gemm_splitk_reduce_bf16` block 256, grid ceil(M·N/256);
            // both launches timed together
            let (splits, kchunk) = dec_splitk(n as u32, k as u32, sms);
            if splits > 1 {
                assert!(splits as usize * m * n * 4 <= ws.len());
                let pgrid = [grid[0], splits, 1];
                let pblock = dec_block(grid[0] * splits, sms);
                let rgrid = [((m * n) as u32).div_ceil(256), 1, 1];
                let t = b.time(21, 8, |i| {
                    let w = rot(i, wbytes);
                    let x = rot(i + 7, m * k * 2);
                    let pargs = [
                        Arg::Ptr(ws.ptr()),
                        Arg::Ptr(x),
                        Arg::Ptr(w),
                        Arg::U32(m as u32),
                        Arg::U32(n as u32),
                        Arg::U32(k as u32),
                        Arg::U32(k as u32),
                        Arg::U32(kchunk),
                    ];
                    unsafe { dev.launch("gemm_decode_splitk_bf16", pgrid, pblock, &pargs) }?;
                    let rargs = [
                        Arg::Ptr(y.ptr()),
                        Arg::Ptr(ws.ptr()),
                        Arg::Ptr(0),
                        Arg::Ptr(0),
                        Arg::U32(m as u32),
                        Arg::U32(n as u32),
                        Arg::U32(n as u32),
                        Arg::U32(splits),
                    ];
                    unsafe { dev.launch("gemm_splitk_reduce_bf16", rgrid, 256, &rargs) }
                })?;
                let g = gbs(wbytes as f64, t);
                println!(
                    "gemm_decode M={m:2} {label} split-K {splits} x {kchunk} block {pblock}: {:.1} us, {g:.0} GB/s weights = {:.1}% of HBM",
                    t * 1e3,
                    100.0 * g / hbm
                );
                b.rows.push(
                    json!({"bench": "gemm_decode_bf16", "case": format!("{label} split-K"), "m": m, "n": n, "k": k,
                    "block": pblock, "splits": splits, "kchunk": kchunk, "ms": t, "weight_gb_s": g,
                    "pct_of_hbm": 100.0 * g / hbm}),
                );
            }
        }
    }

    // ---- prefill GEMM 4096^3 vs cuBLAS
    let (m, n, k) = (4096usize, 4096usize, 4096usize);
    let flops = 2.0 * (m * n * k) as f64;
    let yb = dev.alloc(m * n * 2)?;
    // the verified 128x128 kernel and the wide 256x128 variant (96 KiB dynamic shared
    // memory, which `CudaDevice::launch` passes by kernel name), same inputs
    let mut tf = [0.0f64; 2];
    let mut ms = [0.0f64; 2];
    for (ki, (kernel, bm, block)) in [
        ("gemm_mma_bf16", 128usize, 128u32),
        ("gemm_mma_wide_bf16", MMA_WIDE_BM as usize, MMA_WIDE_BM),
    ]
    .into_iter()
    .enumerate()
    {
        let grid = [n.div_ceil(128) as u32, m.div_ceil(bm) as u32, 1];
        let t = b.time(9, 4, |i| {
            let (x, w) = (rot(2 * i, m * k * 2), rot(2 * i + 1, n * k * 2));
            let args = gemm_args([yb.ptr(), x, w, 0, 0], (m, n, k), (k, n));
            unsafe { dev.launch(kernel, grid, block, &args) }
        })?;
        ms[ki] = t;
        tf[ki] = flops / (t * 1e-3) / 1e12;
    }
    // (--profile: ours only)
    let cublas = if profile {
        None
    } else {
        match cublas_gemm_time(&b, &yb, &rot, m, n, k) {
            Ok(tc) => Some(flops / (tc * 1e-3) / 1e12),
            Err(e) => {
                println!("cuBLAS baseline unavailable: {e}");
                None
            }
        }
    };
    let pct = |ours: f64| cublas.map(|c| 100.0 * ours / c);
    for (ki, kernel) in ["gemm_mma_bf16", "gemm_mma_wide_bf16"]
        .into_iter()
        .enumerate()
    {
        let ours = tf[ki];
        match cublas {
            Some(c) => println!(
                "{kernel} 4096^3: {ours:.0} TFLOP/s vs cuBLAS {c:.0} TFLOP/s = {:.1}%",
                100.0 * ours / c
            ),
            None => println!("{kernel} 4096^3: {ours:.0} TFLOP/s"),
        }
    }
    // wide / old decides whether the engine switches to the wide kernel
    println!(
        "gemm_mma 4096^3: wide / old = {:.2}x TFLOP/s{}",
        tf[1] / tf[0],
        pct(tf[1])
            .map(|p| format!(", wide = {p:.1}% of cuBLAS"))
            .unwrap_or_default()
    );
    b.rows.push(
        json!({"bench": "gemm_mma_bf16", "m": m, "n": n, "k": k, "ms": ms[0], "tflops": tf[0],
        "cublas_tflops": cublas, "pct_of_cublas": pct(tf[0])}),
    );
    b.rows.push(
        json!({"bench": "gemm_mma_wide_bf16", "m": m, "n": n, "k": k, "ms": ms[1], "tflops": tf[1],
        "cublas_tflops": cublas, "pct_of_cublas": pct(tf[1]),
        "speedup_vs_gemm_mma_bf16": tf[1] / tf[0], "dynamic_smem": MMA_WIDE_SMEM}),
    );
    // the sm_90a wgmma kernel (128x256 tiles, 193 KiB of dynamic shared memory), same
    // inputs; wgmma / mma decides whether the engine switches to it. A failed launch is
    // reported, the rest of the bench goes on.
    if no_wgmma {
        // (tools/gpu-check passes it when gpu_gemm_wgmma did not pass: a fault would
        // poison this process's context, a hang stop the bench)
        println!("gemm_wgmma 4096^3: skipped (--no-wgmma)");
    } else if dev.arch() == remp::kernels::Arch::Sm90a {
        let grid = [
            n.div_ceil(WG_BN as usize) as u32,
            m.div_ceil(WG_BM as usize) as u32,
            1,
        ];
        let t = b.time(9, 4, |i| {
            let (x, w) = (rot(2 * i, m * k * 2), rot(2 * i + 1, n * k * 2));
            let args = gemm_args([yb.ptr(), x, w, 0, 0], (m, n, k), (k, n));
            unsafe { dev.launch("gemm_wgmma_bf16", grid, WG_THREADS, &args) }
        });
        match t {
            Ok(t) => {
                let tw = flops / (t * 1e-3) / 1e12;
                println!(
                    "gemm_wgmma 4096^3: wgmma / mma = {:.2}x TFLOP/s ({tw:.0} TFLOP/s){}",
                    tw / tf[0],
                    pct(tw)
                        .map(|p| format!(", = {p:.1}% of cuBLAS"))
                        .unwrap_or_default()
                );
                b.rows
                    .push(json!({"bench": "gemm_wgmma_bf16", "m": m, "n": n, "k": k,
                    "ms": t, "tflops": tw, "cublas_tflops": cublas, "pct_of_cublas": pct(tw),
                    "speedup_vs_gemm_mma_bf16": tw / tf[0], "dynamic_smem": WGMMA_SMEM}));
            }
            Err(e) => println!("gemm_wgmma 4096^3: failed: {e}"),
        }
    } else {
        println!("gemm_wgmma 4096^3: skipped (needs sm_90a, compute capability 9.0; this is sm_{cc0}{cc1})");
    }

    // ---- decode attention: batch 32 x 4096 context
    let (seqs, ctx, qh, kvh, d, bs) = (32usize, 4096usize, 32usize, 8usize, 128usize, 16usize);
    let max_blocks = ctx / bs;
    let nblocks = seqs * max_blocks;
    let kv_bytes = nblocks * bs * kvh * d * 2; // per K (V the same)
    assert!(2 * kv_bytes <= POOL);
    let mut ids: Vec<u32> = (0..nblocks as u32).collect();
    let mut s = 0x2545_f491_4f6c_dd1du64;
    for i in (1..ids.len()).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ids.swap(i, (s % (i as u64 + 1)) as usize);
    }
    let tables = dev.upload(&ids)?;
    let lens = dev.upload(&vec![ctx as u32; seqs])?;
    let q = dev.alloc(seqs * qh * d * 2)?;
    dev.copy_dtod(q.ptr(), pool.at(POOL - q.len()), q.len())?;
    let out = dev.alloc(seqs * qh * d * 2)?;
    let (kc, vc) = (pool.ptr(), pool.at(kv_bytes));
    // the verified kernel and the cp.async-pipelined variant, same inputs, each split
    let kernels = ["attn_decode_bf16", "attn_decode_pipelined_bf16"];
    // --profile: each kernel at its own best split only
    let prof_split = kernels.map(profile_attn_split);
    let mut best: [Option<(f64, usize)>; 2] = [None, None];
    let mut per_split = [vec![], vec![]];
    for split_tokens in ATTN_SPLITS {
        if profile && !prof_split.contains(&split_tokens) {
            continue;
        }
        let splits = ctx.div_ceil(split_tokens);
        let opart = dev.alloc(seqs * qh * splits * d * 4)?;
        let ml = dev.alloc(seqs * qh * splits * 2 * 4)?;
        let scale = 1.0 / (d as f32).sqrt();
        let mut gs = [0.0f64; 2];
        for (ki, kernel) in kernels.iter().enumerate() {
            if profile && prof_split[ki] != split_tokens {
                continue;
            }
            let t = b.time(11, 4, |_| {
                let args = [
                    Arg::Ptr(out.ptr()),
                    Arg::Ptr(opart.ptr()),
                    Arg::Ptr(ml.ptr()),
                    Arg::Ptr(q.ptr()),
                    Arg::Ptr(kc),
                    Arg::Ptr(vc),
                    Arg::Ptr(tables.ptr()),
                    Arg::Ptr(lens.ptr()),
                    Arg::U32(qh as u32),
                    Arg::U32(kvh as u32),
                    Arg::U32(d as u32),
                    Arg::U32(bs as u32),
                    Arg::U32(max_blocks as u32),
                    Arg::U32((qh * d) as u32),
                    Arg::U32(split_tokens as u32),
                    Arg::F32(scale),
                ];
                let grid = [
                    (kvh * (qh / kvh).div_ceil(4)) as u32,
                    seqs as u32,
                    splits as u32,
                ];
                unsafe { dev.launch(kernel, grid, 128, &args) }?;
                if splits > 1 {
                    let cargs = [
                        Arg::Ptr(out.ptr()),
                        Arg::Ptr(opart.ptr()),
                        Arg::Ptr(ml.ptr()),
                        Arg::Ptr(lens.ptr()),
                        Arg::U32(qh as u32),
                        Arg::U32(d as u32),
                        Arg::U32(splits as u32),
                        Arg::U32(split_tokens as u32),
                    ];
                    unsafe {
                        dev.launch(
                            "attn_decode_combine_bf16",
                            [qh as u32, seqs as u32, 1],
                            128,
                            &cargs,
                        )
                    }?;
                }
                Ok(())
            })?;
            let g = gbs(2.0 * kv_bytes as f64, t);
            gs[ki] = g;
            println!(
                "{kernel} batch {seqs} ctx {ctx} split {split_tokens}: {:.1} us, \
                 {g:.0} GB/s KV = {:.1}% of HBM",
                t * 1e3,
                100.0 * g / hbm
            );
            per_split[ki].push(json!({"split_tokens": split_tokens, "ms": t, "kv_gb_s": g, "pct_of_hbm": 100.0 * g / hbm}));
            if best[ki].is_none_or(|(bt, _)| t < bt) {
                best[ki] = Some((t, split_tokens));
            }
        }
        if !profile {
            println!(
                "attn_decode split {split_tokens}: pipelined / old = {:.2}x GB/s",
                gs[1] / gs[0]
            );
        }
    }
    let old_t = best[0].unwrap().0;
    for (ki, kernel) in kernels.iter().enumerate() {
        let (t, split) = best[ki].unwrap();
        let g = gbs(2.0 * kv_bytes as f64, t);
        b.rows.push(json!({"bench": kernel, "seqs": seqs, "ctx": ctx, "q_heads": qh, "kv_heads": kvh,
            "head_dim": d, "block_size": bs, "kv_bytes": 2 * kv_bytes, "best_split_tokens": split, "ms": t,
            "kv_gb_s": g, "pct_of_hbm": 100.0 * g / hbm, "speedup_vs_attn_decode_bf16": old_t / t,
            "splits": per_split[ki]}));
    }

    // ---- the fused decode-layer kernels against the launches they replace (1.1B
    // layer: hidden 2048, 32 q / 4 KV heads of 64, intermediate 5632), M = 1 and 16,
    // weights rotating through the pool as a step's weights do (not L2-resident)
    if !profile {
        let (h, qh, kvh, d, inter) = (2048usize, 32usize, 4usize, 64usize, 5632usize);
        let (nq, nkv) = (qh * d, kvh * d);
        let eps = Arg::F32(1e-5);
        let inv: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / d as f32))
            .collect();
        let inv = dev.upload(&inv)?;
        // random bf16, as every operand here
        let norm = pool.at(POOL - 256 * MIB);
        // the engine's one-block-per-row widths (2 elements per thread, as it launches)
        let row_threads = |work: usize| remp::backend::device::llama::row_threads(work, 2);
        for m in [1usize, 16] {
            let x = pool.at(POOL - 128 * MIB);
            let xn = dev.alloc(m * h * 2)?;
            let (q, kb, vb) = (
                dev.alloc(m * nq * 2)?,
                dev.alloc(m * nkv * 2)?,
                dev.alloc(m * nkv * 2)?,
            );
            let (kc, vc) = (dev.alloc(m * nkv * 2)?, dev.alloc(m * nkv * 2)?);
            let act = dev.alloc(m * inter * 2)?;
            let pos = dev.upload(&(0..m as u32).map(|i| 100 + i).collect::<Vec<u32>>())?;
            let slots = dev.upload(&(0..m as u32).collect::<Vec<u32>>())?;
            let qkv_bytes = (nq + 2 * nkv) * h * 2;
            let gx = ((nq + 2 * nkv) / 16) as u32;
            let block = dec_block(gx, sms);
            let rms = |out: u64| -> Result<()> {
                let args = [
                    Arg::Ptr(out),
                    Arg::Ptr(x),
                    Arg::Ptr(norm),
                    Arg::U32(h as u32),
                    eps,
                ];
                unsafe { dev.launch("rmsnorm_bf16", [m as u32, 1, 1], row_threads(h), &args) }
            };
            // (w, norm pointer or 0): q/k/v weights one after another in the pool
            let qkv_w = |i: usize| {
                let w = rot(i, qkv_bytes);
                [w, w + (nq * h * 2) as u64, w + ((nq + nkv) * h * 2) as u64]
            };
            let unfused_attn = b.time(11, 8, |i| {
                rms(xn.ptr())?;
                let mut args: Vec<Arg> = [q.ptr(), kb.ptr(), vb.ptr(), xn.ptr()]
                    .map(Arg::Ptr)
                    .to_vec();
                args.extend(qkv_w(i).map(Arg::Ptr));
                args.extend([Arg::Ptr(0), Arg::Ptr(0), Arg::Ptr(0), Arg::Ptr(0), eps]);
                args.extend([m, nq, nkv, nkv, h, h].map(|v| Arg::U32(v as u32)));
                unsafe { dev.launch("gemm_decode_qkv_bf16", [gx, 1, 1], block, &args) }?;
                let mut args: Vec<Arg> = [
                    q.ptr(),
                    kb.ptr(),
                    vb.ptr(),
                    pos.ptr(),
                    inv.ptr(),
                    kc.ptr(),
                    vc.ptr(),
                    slots.ptr(),
                ]
                .map(Arg::Ptr)
                .to_vec();
                args.extend([qh, kvh, d, nq, nkv, nkv].map(|v| Arg::U32(v as u32)));
                let threads = row_threads((qh + kvh) * d / 2);
                unsafe { dev.launch("rope_kv_write_bf16", [m as u32, 1, 1], threads, &args) }
            })?;
            let fused_attn = b.time(11, 8, |i| {
                let mut args = vec![Arg::Ptr(q.ptr()), Arg::Ptr(x)];
                args.extend(qkv_w(i).map(Arg::Ptr));
                args.extend([Arg::Ptr(0), Arg::Ptr(0), Arg::Ptr(0), Arg::Ptr(norm), eps]);
                args.extend([pos.ptr(), inv.ptr(), kc.ptr(), vc.ptr(), slots.ptr()].map(Arg::Ptr));
                args.extend([m, nq, nkv, h, h, d].map(|v| Arg::U32(v as u32)));
                unsafe { dev.launch("gemm_decode_qkv_rope_bf16", [gx, 1, 1], block, &args) }
            })?;
            let gu_bytes = 2 * inter * h * 2;
            let sgx = inter.div_ceil(8) as u32;
            let sblock = dec_block(sgx, sms);
            let silu = |i: usize, src: u64, normp: u64| -> Result<()> {
                let w = rot(i, gu_bytes);
                let mut args = vec![Arg::Ptr(act.ptr()), Arg::Ptr(src), Arg::Ptr(w)];
                args.extend([Arg::Ptr(w + (inter * h * 2) as u64), Arg::Ptr(normp), eps]);
                args.extend([m, inter, h, h, inter].map(|v| Arg::U32(v as u32)));
                unsafe { dev.launch("gemm_decode_silu_bf16", [sgx, 1, 1], sblock, &args) }
            };
            let unfused_mlp = b.time(11, 8, |i| {
                rms(xn.ptr())?;
                silu(i, xn.ptr(), 0)
            })?;
            let fused_mlp = b.time(11, 8, |i| silu(i, x, norm))?;
            for (what, unfused, fused, parts) in [
                (
                    "norm + q/k/v + RoPE + KV write",
                    unfused_attn,
                    fused_attn,
                    "rmsnorm_bf16 + gemm_decode_qkv_bf16 + rope_kv_write_bf16",
                ),
                (
                    "norm + gate/up SiLU",
                    unfused_mlp,
                    fused_mlp,
                    "rmsnorm_bf16 + gemm_decode_silu_bf16",
                ),
            ] {
                println!(
                    "fused {what} M={m}: {:.1} us vs {:.1} us for {parts}: {:.2}x",
                    fused * 1e3,
                    unfused * 1e3,
                    unfused / fused
                );
                b.rows.push(
                    json!({"bench": "fused_decode", "what": what, "m": m, "fused_ms": fused,
                    "unfused_ms": unfused, "unfused_kernels": parts, "speedup": unfused / fused}),
                );
            }
        }
    }

    // ---- prefill attention: 4 sequences x 2048 new tokens (no cache), SIMT vs mma
    {
        let (seqs, len, qh, kvh, d, bs) = (4usize, 2048usize, 32usize, 8usize, 128usize, 16usize);
        let max_blocks = len / bs;
        let tokens = seqs * len;
        let tables = dev.upload(&ids[..seqs * max_blocks])?;
        let lens = dev.upload(&vec![len as u32; seqs])?;
        let starts: Vec<u32> = (0..seqs).map(|s| (s * len) as u32).collect();
        let starts = dev.upload(&starts)?;
        let q = dev.alloc(tokens * qh * d * 2)?;
        dev.copy_dtod(q.ptr(), pool.at(POOL - q.len()), q.len())?;
        let out = dev.alloc(tokens * qh * d * 2)?;
        let scale = 1.0 / (d as f32).sqrt();
        // causal: half of the 4·L²·d FLOPs per (sequence, head) of full attention
        let flops = 2.0 * (len * len * d * qh * seqs) as f64;
        let args = [
            Arg::Ptr(out.ptr()),
            Arg::Ptr(q.ptr()),
            Arg::Ptr(kc),
            Arg::Ptr(vc),
            Arg::Ptr(tables.ptr()),
            Arg::Ptr(lens.ptr()),
            Arg::Ptr(starts.ptr()),
            Arg::Ptr(lens.ptr()),
            Arg::U32(qh as u32),
            Arg::U32(kvh as u32),
            Arg::U32(d as u32),
            Arg::U32(bs as u32),
            Arg::U32(max_blocks as u32),
            Arg::U32((qh * d) as u32),
            Arg::F32(scale),
        ];
        let old_grid = [
            (kvh * (qh / kvh).div_ceil(4)) as u32,
            len.div_ceil(4) as u32,
            seqs as u32,
        ];
        let old_t = b.time(5, 2, |_| unsafe {
            dev.launch("attn_prefill_bf16", old_grid, 128, &args)
        })?;
        let old_tf = flops / (old_t * 1e-3) / 1e12;
        println!(
            "attn_prefill_bf16 {seqs} x {len} tokens, {qh}/{kvh} heads, d {d}: {:.2} ms, {old_tf:.1} TFLOP/s",
            old_t
        );
        let new_grid = [qh as u32, len.div_ceil(FA_BM as usize) as u32, seqs as u32];
        let new_t = b.time(5, 2, |_| unsafe {
            dev.launch("attn_prefill_mma_bf16", new_grid, FA_THREADS, &args)
        });
        let mut row = json!({"bench": "attn_prefill", "seqs": seqs, "new_tokens": len,
            "cached": 0, "q_heads": qh, "kv_heads": kvh, "head_dim": d, "block_size": bs,
            "causal_flops": flops, "simt_ms": old_t, "simt_tflops": old_tf});
        match new_t {
            Ok(t) => {
                let tf = flops / (t * 1e-3) / 1e12;
                println!(
                    "attn_prefill_mma_bf16 same shape: {t:.2} ms, {tf:.1} TFLOP/s, mma / SIMT = {:.2}x",
                    old_t / t
                );
                row["mma_ms"] = json!(t);
                row["mma_tflops"] = json!(tf);
                row["speedup_vs_attn_prefill_bf16"] = json!(old_t / t);
            }
            Err(e) => println!("attn_prefill_mma_bf16: failed: {e}"),
        }
        b.rows.push(row);
    }

    if profile {
        println!("--profile: done (no table, no JSON)");
        return Ok(());
    }

    // ---- summary
    println!();
    println!("{:<44} {:>12} {:>14}", "kernel", "result", "vs baseline");
    for r in &b.rows {
        let (name, res, vs) = match r["bench"].as_str().unwrap() {
            "hbm_dtod" => (
                "HBM (DtoD)".to_string(),
                format!("{:.0} GB/s", r["gb_s"].as_f64().unwrap()),
                String::new(),
            ),
            "reshard_copy2d" => (
                format!("reshard_copy2d {}", r["case"].as_str().unwrap()),
                format!("{:.0} GB/s", r["gb_s"].as_f64().unwrap()),
                format!("{:.1}% DtoD", r["pct_of_dtod"].as_f64().unwrap()),
            ),
            "gemm_decode_bf16" => (
                format!(
                    "gemm_decode M={} K={} N={}{}",
                    r["m"],
                    r["k"],
                    r["n"],
                    if r["splits"].as_u64() > Some(1) {
                        format!(" split-K {}", r["splits"])
                    } else {
                        String::new()
                    }
                ),
                format!("{:.0} GB/s", r["weight_gb_s"].as_f64().unwrap()),
                format!("{:.1}% HBM", r["pct_of_hbm"].as_f64().unwrap()),
            ),
            // (M = 1 only in the table; the log and the JSON have every M)
            "gemm_decode64_bf16" if r["m"].as_u64() == Some(1) => (
                format!(
                    "  uncapped M=1 K={} N={} (capped {:.2}x)",
                    r["k"],
                    r["n"],
                    r["capped_speedup"].as_f64().unwrap()
                ),
                format!("{:.0} GB/s", r["weight_gb_s"].as_f64().unwrap()),
                format!("{:.1}% HBM", r["pct_of_hbm"].as_f64().unwrap()),
            ),
            "gemm_mma_bf16" => (
                "gemm_mma_bf16 4096^3".to_string(),
                format!("{:.0} TFLOP/s", r["tflops"].as_f64().unwrap()),
                r["pct_of_cublas"]
                    .as_f64()
                    .map(|p| format!("{p:.1}% cuBLAS"))
                    .unwrap_or("-".into()),
            ),
            "gemm_mma_wide_bf16" | "gemm_wgmma_bf16" => (
                format!(
                    "{} 4096^3 ({:.2}x old)",
                    r["bench"].as_str().unwrap(),
                    r["speedup_vs_gemm_mma_bf16"].as_f64().unwrap()
                ),
                format!("{:.0} TFLOP/s", r["tflops"].as_f64().unwrap()),
                r["pct_of_cublas"]
                    .as_f64()
                    .map(|p| format!("{p:.1}% cuBLAS"))
                    .unwrap_or("-".into()),
            ),
            "attn_decode_bf16" => (
                format!("attn_decode b32 ctx4096 (split {})", r["best_split_tokens"]),
                format!("{:.0} GB/s", r["kv_gb_s"].as_f64().unwrap()),
                format!("{:.1}% HBM", r["pct_of_hbm"].as_f64().unwrap()),
            ),
            "attn_decode_pipelined_bf16" => (
                format!(
                    "attn_decode_pipelined (split {}, {:.2}x old)",
                    r["best_split_tokens"],
                    r["speedup_vs_attn_decode_bf16"].as_f64().unwrap()
                ),
                format!("{:.0} GB/s", r["kv_gb_s"].as_f64().unwrap()),
                format!("{:.1}% HBM", r["pct_of_hbm"].as_f64().unwrap()),
            ),
            "attn_prefill" => (
                format!(
                    "attn_prefill_mma 4x2048 causal ({})",
                    r["speedup_vs_attn_prefill_bf16"]
                        .as_f64()
                        .map(|x| format!("{x:.2}x SIMT"))
                        .unwrap_or("failed".into())
                ),
                r["mma_tflops"]
                    .as_f64()
                    .map(|x| format!("{x:.1} TFLOP/s"))
                    .unwrap_or("-".into()),
                format!("SIMT {:.1} TFLOP/s", r["simt_tflops"].as_f64().unwrap()),
            ),
            "fused_decode" => (
                format!("fused {} M={}", r["what"].as_str().unwrap_or("?"), r["m"]),
                format!("{:.1} us", r["fused_ms"].as_f64().unwrap() * 1e3),
                format!("{:.2}x unfused", r["speedup"].as_f64().unwrap()),
            ),
            _ => continue,
        };
        println!("{name:<44} {res:>12} {vs:>14}");
    }
    let out_dir = out_dir();
    let _ = std::fs::create_dir_all(&out_dir);
    let path = std::path::Path::new(&out_dir).join("kernels.json");
    let doc = json!({
        "device": dev.name(), "compute_capability": format!("{cc0}.{cc1}"), "sms": sms,
        "ptx_arch": dev.arch().name(), "module_load_s": load_s, "hbm_gb_s": hbm,
        "method": "CUDA events around batches of launches after 3 warm-up batches; median over batches; random bf16 inputs rotated through a 1 GiB pool",
        "results": b.rows,
    });
    std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap())
        .map_err(|e| remp::Error::Device(format!("{}: {e}", path.display())))?;
    println!("JSON: {}", path.display());
    Ok(())
}

/// Median ms of cuBLAS `cublasGemmEx` computing the same product (bf16 in and out, f32
/// compute): row-major y[M,N] = x[M,K]·W[N,K]ᵀ is column-major yᵀ = W·xᵀ, i.e.
/// gemm(op(A)=T with A = W (K×N col-major), B = x (K×M col-major)).
fn cublas_gemm_time(
    b: &Bench,
    y: &DevBuf,
    rot: &dyn Fn(usize, usize) -> u64,
    m: usize,
    n: usize,
    k: usize,
) -> Result<f64> {
    use cudarc::cublas::{result as cb, sys as cs};
    let err = |e: cb::CublasError| remp::Error::Device(format!("cuBLAS: {e:?}"));
    if !unsafe { cs::is_culib_present() } {
        return Err(remp::Error::Device(
            "libcublas not found (LD_LIBRARY_PATH?)".into(),
        ));
    }
    b.dev.bind()?;
    let h = cb::create_handle().map_err(err)?;
    let r = (|| {
        unsafe { cb::set_stream(h, b.dev.cu_stream() as cs::cudaStream_t) }.map_err(err)?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        b.time(9, 4, |i| {
            let (x, w) = (rot(2 * i, m * k * 2), rot(2 * i + 1, n * k * 2));
            unsafe {
                cb::gemm_ex(
                    h,
                    cs::cublasOperation_t::CUBLAS_OP_T,
                    cs::cublasOperation_t::CUBLAS_OP_N,
                    n as i32,
                    m as i32,
                    k as i32,
                    &alpha as *const f32 as *const _,
                    w as *const _,
                    cs::cudaDataType::CUDA_R_16BF,
                    k as i32,
                    x as *const _,
                    cs::cudaDataType::CUDA_R_16BF,
                    k as i32,
                    &beta as *const f32 as *const _,
                    y.ptr() as *mut _,
                    cs::cudaDataType::CUDA_R_16BF,
                    n as i32,
                    cs::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cs::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(err)
        })
    })();
    unsafe {
        let _ = cb::destroy_handle(h);
    }
    r
}

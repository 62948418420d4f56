//! GEMM kernels under the emulator vs an f64 reference: decode (any shape/alignment)
//! and tensor-core (mma.sync fragment layout, ldmatrix, swizzle, cp.async tails) paths,
//! with and without bias / residual, bf16 and f32 outputs, the fused SiLU·mul variant;
//! the wide tensor-core kernels (256x128 tiles, 4 stages, grouped rasterization) also
//! bit for bit against the 128x128 ones, which do the same mma sequence per output; the
//! sm_90a wgmma kernels (128x256 tiles, descriptors over 128-byte-swizzled shared
//! memory, asynchronous warpgroup MMA) likewise vs f64 and bit for bit vs the mma ones.
#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]
mod common;
use common::*;
use remp_gpu_kernels::gemm::*;
use remp_gpu_kernels::gemm_wgmma::*;
use remp_gpu_kernels::prims::{
    emu::{launch, launch_dyn},
    Bf16,
};
use std::ptr::null;

struct Case {
    m: usize,
    n: usize,
    k: usize,
    ldx: usize,
    ldy: usize,
    x: Vec<f32>, // bf16-representable
    w: Vec<f32>,
    w2: Vec<f32>,
    bias: Option<Vec<f32>>,
    res: Option<Vec<f32>>,
}

fn case(rng: &mut Rng, m: usize, n: usize, k: usize, ldx: usize) -> Case {
    let ldy = n + rng.pick(&[0usize, 0, 3]);
    let r = |v: Vec<f32>| v.into_iter().map(rbf16).collect::<Vec<f32>>();
    Case {
        m,
        n,
        k,
        ldx,
        ldy,
        x: r(rng.vec_f32(m * ldx, 1.0)),
        w: r(rng.vec_f32(n * k, 0.5)),
        w2: r(rng.vec_f32(n * k, 0.5)),
        bias: if rng.next().is_multiple_of(2) {
            Some(r(rng.vec_f32(n, 1.0)))
        } else {
            None
        },
        res: if rng.next().is_multiple_of(2) {
            Some(r(rng.vec_f32(m * ldy, 2.0)))
        } else {
            None
        },
    }
}

fn dot(c: &Case, w: &[f32], i: usize, j: usize) -> f32 {
    (0..c.k)
        .map(|kk| c.x[i * c.ldx + kk] as f64 * w[j * c.k + kk] as f64)
        .sum::<f64>() as f32
}

/// Reference with the kernels' rounding: bf16 after bias, residual added in f32.
fn reference(c: &Case, round_out: bool) -> Vec<f32> {
    let mut y = vec![f32::NAN; c.m * c.ldy];
    for i in 0..c.m {
        for j in 0..c.n {
            let mut v = dot(c, &c.w, i, j);
            if let Some(b) = &c.bias {
                v = rbf16(v + b[j]);
            }
            if let Some(r) = &c.res {
                v = rbf16(v) + r[i * c.ldy + j];
            }
            y[i * c.ldy + j] = if round_out { rbf16(v) } else { v };
        }
    }
    y
}

fn silu_reference(c: &Case) -> Vec<f32> {
    let mut y = vec![f32::NAN; c.m * c.ldy];
    for i in 0..c.m {
        for j in 0..c.n {
            let g = rbf16(dot(c, &c.w, i, j));
            let u = rbf16(dot(c, &c.w2, i, j));
            y[i * c.ldy + j] = rbf16(rbf16(g / (1.0 + (-g).exp())) * u);
        }
    }
    y
}

/// Only the written elements (row stride may exceed n).
fn valid(c: &Case, y: &[f32]) -> Vec<f32> {
    (0..c.m)
        .flat_map(|i| y[i * c.ldy..][..c.n].to_vec())
        .collect()
}

enum Path {
    /// decode kernels with this block size (`DEC_BLOCK` or `DEC_BLOCK_WIDE`)
    Decode(u32),
    /// split-K decode (partials + reduce) with this block size and kchunk
    SplitK(u32, u32),
    Mma,
    /// `gemm_mma_wide_*`: block 256, grid (ceil(n / 128), ceil(m / 256)), 96 KiB dynamic
    /// shared memory
    Wide,
    /// `gemm_wgmma_*`: block 256, grid (ceil(n / 256), ceil(m / 128)), 193 KiB dynamic
    /// shared memory
    Wgmma,
}

/// Split-K decode: partials into an f32 workspace `[splits, m, n]` (poisoned with NaN),
/// then the ordered reduce with the epilogue, launched like the host does.
#[allow(clippy::too_many_arguments)]
unsafe fn splitk<O: remp_gpu_kernels::prims::Elem>(
    block: u32,
    kchunk: u32,
    y: *mut O,
    x: *const Bf16,
    w: *const Bf16,
    bias: *const Bf16,
    res: *const Bf16,
    (m, n, k, ldx, ldy): (u32, u32, u32, u32, u32),
    reduce: unsafe fn(*mut O, *const f32, *const Bf16, *const Bf16, u32, u32, u32, u32),
) {
    let splits = k.div_ceil(kchunk);
    let ws = ABuf::new(&vec![f32::NAN; (splits * m * n) as usize]);
    let pp = ws.ptr();
    launch([n.div_ceil(DEC_COLS), splits, 1], block, || {
        gemm_decode_splitk_bf16(pp, x, w, m, n, k, ldx, kchunk)
    });
    // an odd reduce launch on purpose: the kernel is grid-stride
    launch([(m * n).div_ceil(256).min(3), 1, 1], 64, || {
        reduce(y, pp, bias, res, m, n, ldy, splits)
    });
}

/// A GEMM kernel with output type `O`, and the split-K reduce with the same epilogue.
type Gemm<O> =
    unsafe fn(*mut O, *const Bf16, *const Bf16, *const Bf16, *const Bf16, u32, u32, u32, u32, u32);
type Reduce<O> = unsafe fn(*mut O, *const f32, *const Bf16, *const Bf16, u32, u32, u32, u32);
/// (decode, split-K reduce, mma, wide mma, wgmma) kernels of one output type.
type Kernels<O> = (Gemm<O>, Reduce<O>, Gemm<O>, Gemm<O>, Gemm<O>);

/// Launches `path`'s kernels like the host does.
#[allow(clippy::too_many_arguments)]
unsafe fn launch_path<O: remp_gpu_kernels::prims::Elem>(
    path: Path,
    (decode, reduce, mma, wide, wgmma): Kernels<O>,
    y: *mut O,
    x: *const Bf16,
    w: *const Bf16,
    bias: *const Bf16,
    res: *const Bf16,
    (m, n, k, ldx, ldy): (u32, u32, u32, u32, u32),
) {
    match path {
        Path::Decode(block) => launch([n.div_ceil(DEC_COLS), 1, 1], block, || {
            decode(y, x, w, bias, res, m, n, k, ldx, ldy)
        }),
        Path::SplitK(block, kc) => {
            splitk(block, kc, y, x, w, bias, res, (m, n, k, ldx, ldy), reduce)
        }
        Path::Mma => launch([n.div_ceil(128), m.div_ceil(128), 1], 128, || {
            mma(y, x, w, bias, res, m, n, k, ldx, ldy)
        }),
        Path::Wide => launch_dyn(
            [n.div_ceil(MMA_BN), m.div_ceil(MMA_WIDE_BM), 1],
            MMA_WIDE_BM,
            MMA_WIDE_SMEM,
            || wide(y, x, w, bias, res, m, n, k, ldx, ldy),
        ),
        Path::Wgmma => launch_dyn(
            [n.div_ceil(WG_BN), m.div_ceil(WG_BM), 1],
            WG_THREADS,
            WGMMA_SMEM,
            || wgmma(y, x, w, bias, res, m, n, k, ldx, ldy),
        ),
    }
}

/// Runs `path` on case `c`, checks it against the f64 reference and returns the written
/// outputs (as f32).
fn run(c: &Case, path: Path, x_off: usize, f32_out: bool) -> Vec<f32> {
    let xb = ABuf::new(&to_bf16(&[vec![0.0; x_off], c.x.clone()].concat()));
    let wb = ABuf::new(&to_bf16(&c.w));
    let bias = c.bias.as_ref().map(|b| ABuf::new(&to_bf16(b)));
    let init = c.res.clone().unwrap_or_else(|| vec![f32::NAN; c.m * c.ldy]);
    let (m, n, k, ldx, ldy) = (
        c.m as u32,
        c.n as u32,
        c.k as u32,
        c.ldx as u32,
        c.ldy as u32,
    );
    let xp = unsafe { xb.ptr().add(x_off) } as *const Bf16;
    let wp = wb.ptr() as *const Bf16;
    let bp = bias.as_ref().map_or(null(), |b| b.ptr() as *const Bf16);
    let what = format!(
        "m {m} n {n} k {k} ldx {ldx} ldy {ldy} x_off {x_off} bias {} res {} f32 {f32_out}",
        c.bias.is_some(),
        c.res.is_some()
    );
    if f32_out {
        let yb = ABuf::new(&init);
        let rp = if c.res.is_some() {
            yb.ptr() as *const f32
        } else {
            null()
        };
        // f32 output kernels take a bf16 residual: use a separate copy
        let resb = c.res.as_ref().map(|r| ABuf::new(&to_bf16(r)));
        let rp = resb
            .as_ref()
            .map_or(rp as *const Bf16, |r| r.ptr() as *const Bf16);
        let yp = yb.ptr();
        let kernels: Kernels<f32> = (
            gemm_decode_bf16_f32out,
            gemm_splitk_reduce_bf16_f32out,
            gemm_mma_bf16_f32out,
            gemm_mma_wide_bf16_f32out,
            gemm_wgmma_bf16_f32out,
        );
        unsafe { launch_path(path, kernels, yp, xp, wp, bp, rp, (m, n, k, ldx, ldy)) };
        let want = reference(c, false);
        // f32 accumulation in another order: ~1e-6 per term, growing like sqrt(k).
        let tol = 2e-5 * (c.k as f32).sqrt();
        // With a bias or residual the sum x·w (+ bias) is rounded to bf16 first (HF's
        // order): a value near a rounding boundary may land one bf16 ulp (<= 2^-7 of
        // that sum) away, and a residual added afterwards can cancel most of the sum, so
        // that ulp is measured against the sum, not the result (seed
        // 1169461457025582253: sum ~0.5, result -0.035, off by 2^-8).
        let (rtol, scale) = if c.bias.is_some() || c.res.is_some() {
            let mut s = vec![0.0f32; c.m * c.ldy];
            for i in 0..c.m {
                for j in 0..c.n {
                    let b = c.bias.as_ref().map_or(0.0, |b| b[j]);
                    let pre = (dot(c, &c.w, i, j) + b).abs();
                    s[i * c.ldy + j] = pre.max(want[i * c.ldy + j].abs());
                }
            }
            (8e-3, s)
        } else {
            (1e-5, want.iter().map(|w| w.abs()).collect())
        };
        let got = valid(c, &yb.to_vec());
        assert_close_scaled(&what, &got, &valid(c, &want), tol, rtol, &valid(c, &scale));
        got
    } else {
        let yb = ABuf::new(&to_bf16(&init));
        let yp = yb.ptr();
        let rp = if c.res.is_some() {
            yp as *const Bf16
        } else {
            null()
        }; // in place: y += x·Wᵀ
        let kernels: Kernels<Bf16> = (
            gemm_decode_bf16,
            gemm_splitk_reduce_bf16,
            gemm_mma_bf16,
            gemm_mma_wide_bf16,
            gemm_wgmma_bf16,
        );
        unsafe { launch_path(path, kernels, yp, xp, wp, bp, rp, (m, n, k, ldx, ldy)) };
        let want = reference(c, true);
        let got = valid(c, &from_bf16(&yb.to_vec()));
        assert_close(&what, &got, &valid(c, &want), 1e-2, 8e-3);
        got
    }
}

fn run_silu(c: &Case, path: Path) -> Vec<f32> {
    let xb = ABuf::new(&to_bf16(&c.x));
    let (wg, wu) = (ABuf::new(&to_bf16(&c.w)), ABuf::new(&to_bf16(&c.w2)));
    let yb = ABuf::new(&to_bf16(&vec![f32::NAN; c.m * c.ldy]));
    let (m, n, k, ldx, ldy) = (
        c.m as u32,
        c.n as u32,
        c.k as u32,
        c.ldx as u32,
        c.ldy as u32,
    );
    let (xp, gp, up, yp) = (
        xb.ptr() as *const Bf16,
        wg.ptr() as *const Bf16,
        wu.ptr() as *const Bf16,
        yb.ptr(),
    );
    unsafe {
        match path {
            Path::Decode(block) => launch([n.div_ceil(DEC_COLS / 2), 1, 1], block, || {
                gemm_decode_silu_bf16(yp, xp, gp, up, null(), 0.0, m, n, k, ldx, ldy)
            }),
            Path::Mma => launch([n.div_ceil(64), m.div_ceil(128), 1], 128, || {
                gemm_mma_silu_bf16(yp, xp, gp, up, m, n, k, ldx, ldy)
            }),
            Path::Wide => launch_dyn(
                [n.div_ceil(MMA_BN / 2), m.div_ceil(MMA_WIDE_BM), 1],
                MMA_WIDE_BM,
                MMA_WIDE_SMEM,
                || gemm_mma_wide_silu_bf16(yp, xp, gp, up, m, n, k, ldx, ldy),
            ),
            Path::Wgmma => launch_dyn(
                [n.div_ceil(WG_BN / 2), m.div_ceil(WG_BM), 1],
                WG_THREADS,
                WGMMA_SMEM,
                || gemm_wgmma_silu_bf16(yp, xp, gp, up, m, n, k, ldx, ldy),
            ),
            Path::SplitK(..) => unreachable!("no split-K SiLU kernel"),
        }
    }
    let want = silu_reference(c);
    let got = valid(c, &from_bf16(&yb.to_vec()));
    assert_close(
        &format!("silu m {m} n {n} k {k}"),
        &got,
        &valid(c, &want),
        1e-2,
        1.6e-2,
    );
    got
}

#[test]
fn decode_gemm_random_shapes() {
    let mut rng = Rng::new("decode_gemm");
    for it in 0..6 {
        let m = rng.pick(&[1usize, 2, 3, 4, 5, 9, 16, 20]);
        let n = rng.range(1, 40);
        let k = rng.pick(&[5usize, 64, 256, 264, 520, 1000]);
        let ldx = k + rng.pick(&[0usize, 8, 1]);
        let c = case(&mut rng, m, n, k, ldx);
        let x_off = if it % 3 == 2 { 1 } else { 0 }; // misaligned activations: scalar path
                                                     // the wide block (16 warps) on every third shape, aligned or not
        let block = if it % 3 == 1 {
            DEC_BLOCK_WIDE
        } else {
            DEC_BLOCK
        };
        run(&c, Path::Decode(block), x_off, it % 2 == 1);
    }
    let (m, n, k) = (
        rng.range(1, 7),
        rng.range(1, 20),
        rng.pick(&[256usize, 300]),
    );
    let c = case(&mut rng, m, n, k, k);
    run_silu(&c, Path::Decode(DEC_BLOCK));
    let c = case(&mut rng, m, n, 264, 264 + 1); // unaligned x rows: scalar path
    run_silu(&c, Path::Decode(DEC_BLOCK_WIDE));
    // K over several tensor-core decode iterations (8 warps x 4 chunks x 32 = 1024
    // elements each) plus a ragged tail
    let c = case(&mut rng, 3, 21, 2312, 2312);
    run(&c, Path::Decode(DEC_BLOCK), 0, true);
    run(&c, Path::Decode(DEC_BLOCK_WIDE), 0, false);
    let c = case(&mut rng, 2, 9, 2312, 2312);
    run_silu(&c, Path::Decode(DEC_BLOCK));
    run_silu(&c, Path::Decode(DEC_BLOCK_WIDE));
}

/// Split-K decode (partials kernel + ordered reduce with the epilogue) vs f64: aligned
/// (tensor-core) and misaligned (scalar) inputs, ragged last split, K not a multiple of
/// 8, bias / in-place residual, bf16 and f32 out, both block sizes.
#[test]
fn decode_gemm_split_k() {
    let mut rng = Rng::new("decode_gemm_split_k");
    for it in 0..6 {
        let m = rng.pick(&[1usize, 2, 5, 16, 19]);
        let n = rng.range(1, 40);
        let k = rng.pick(&[264usize, 520, 1000, 1304]);
        let kchunk = rng.pick(&[64u32, 136, 256]);
        let ldx = k + rng.pick(&[0usize, 8, 1]);
        let c = case(&mut rng, m, n, k, ldx);
        let x_off = if it % 3 == 2 { 1 } else { 0 };
        let block = if it % 2 == 0 {
            DEC_BLOCK
        } else {
            DEC_BLOCK_WIDE
        };
        run(&c, Path::SplitK(block, kchunk), x_off, it % 2 == 1);
    }
    // more than one tensor-core iteration per split, ragged tail
    let c = case(&mut rng, 3, 21, 2312, 2312);
    run(&c, Path::SplitK(DEC_BLOCK, 1024), 0, false);
    run(&c, Path::SplitK(DEC_BLOCK, 1280), 0, true);
}

#[test]
fn decode_split_plan() {
    // decode shapes of issue 4 on 132 SMs
    assert_eq!(dec_splitk(1024, 8192, 132), (7, 1280));
    assert_eq!(dec_splitk(4096, 4096, 132), (2, 2048));
    // enough column blocks, or too little K: no split
    assert_eq!(dec_splitk(8192, 8192, 132), (1, 8192));
    assert_eq!(dec_splitk(1024, 1024, 132), (1, 1024));
    for n in [1u32, 16, 100, 1024, 3000, 4200] {
        for k in [2048u32, 2056, 4096, 8192, 14336, 28672] {
            for sms in [108u32, 132] {
                let (s, kc) = dec_splitk(n, k, sms);
                if s == 1 {
                    assert_eq!(kc, k);
                    continue;
                }
                assert!((2..=DEC_MAX_SPLITS).contains(&s), "{n} {k} {sms}");
                assert_eq!(kc % 256, 0);
                assert_eq!(k.div_ceil(kc), s, "every split non-empty");
                let blocks = n.div_ceil(DEC_COLS) * s;
                assert!(blocks <= 5 * sms, "{n} {k} {sms}: {blocks}");
            }
        }
    }
}

#[test]
fn mma_gemm_random_shapes() {
    let mut rng = Rng::new("mma_gemm");
    for it in 0..3 {
        let m = rng.range(1, 140);
        let n = rng.range(1, 150);
        let k = 8 * rng.range(1, 12);
        let ldx = k + 8 * rng.range(0, 1);
        let c = case(&mut rng, m, n, k, ldx);
        run(&c, Path::Mma, 0, it == 1);
    }
    let (m, n, k) = (rng.range(1, 70), rng.range(1, 100), 8 * rng.range(1, 8));
    let c = case(&mut rng, m, n, k, k);
    run_silu(&c, Path::Mma);
}

/// Bit-for-bit equality of two kernels' outputs.
#[track_caller]
fn assert_same_bits(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{what}: length");
    if let Some(i) = (0..a.len()).find(|&i| a[i].to_bits() != b[i].to_bits()) {
        panic!(
            "{what}: element {i}: new kernel {} vs 128x128 mma {}",
            a[i], b[i]
        );
    }
}

/// The wide kernels (256x128 tiles, 8 warps, 4-stage ring, grouped rasterization) vs
/// f64 and bit for bit vs the 128x128 kernels: per output both run the same k16 mma
/// steps in K order from zero accumulators (BK 32 in both, zero-filled tails), so the
/// emulated results are identical. Ragged M (over two 256-row blocks), N and K tails, K
/// over the 4 stages (ring wrap-around), bias / in-place residual, bf16 and f32 out.
#[test]
fn mma_wide_gemm_random_shapes() {
    let mut rng = Rng::new("mma_wide_gemm");
    for it in 0..4 {
        let m = if it == 0 {
            rng.range(257, 600)
        } else {
            rng.range(1, 300)
        };
        let n = rng.range(1, 300);
        let k = 8 * rng.range(1, 40);
        let ldx = k + 8 * rng.range(0, 1);
        let c = case(&mut rng, m, n, k, ldx);
        let f32_out = it % 2 == 1;
        let wide = run(&c, Path::Wide, 0, f32_out);
        let old = run(&c, Path::Mma, 0, f32_out);
        assert_same_bits(&format!("m {m} n {n} k {k} f32 {f32_out}"), &wide, &old);
    }
    let (m, n, k) = (rng.range(1, 300), rng.range(1, 200), 8 * rng.range(1, 24));
    let c = case(&mut rng, m, n, k, k);
    let wide = run_silu(&c, Path::Wide);
    let old = run_silu(&c, Path::Mma);
    assert_same_bits(&format!("silu m {m} n {n} k {k}"), &wide, &old);
}

/// More block rows than a rasterization group (9 or 10 of 256 rows, the last group
/// short) and several column blocks: every output written once, right values (a wrong
/// block mapping leaves NaN poison or duplicates tiles).
#[test]
fn mma_wide_gemm_grouped_raster() {
    let mut rng = Rng::new("mma_wide_raster");
    let m = (MMA_WIDE_GROUP * MMA_WIDE_BM) as usize + rng.range(1, 400);
    let n = rng.range(129, 300);
    let c = case(&mut rng, m, n, 16, 16);
    run(&c, Path::Wide, 0, false);
}

/// `raster` is a bijection of the grid onto itself that walks down groups of block rows.
#[test]
fn raster_is_a_bijection() {
    for gx in 1..=7u32 {
        for gy in 1..=20u32 {
            for group in [0u32, 1, 2, 3, 8] {
                let mut seen = vec![false; (gx * gy) as usize];
                for by in 0..gy {
                    for bx in 0..gx {
                        let (tx, ty) = raster(bx, by, gx, gy, group);
                        assert!(tx < gx && ty < gy, "{gx}x{gy} g{group}: ({bx},{by})");
                        let i = (ty * gx + tx) as usize;
                        assert!(!seen[i], "{gx}x{gy} g{group}: tile ({tx},{ty}) twice");
                        seen[i] = true;
                    }
                }
            }
        }
    }
    // 8-row groups on a 4x20 grid: ids 0.. go down rows 0..8 of column 0 first
    assert_eq!(raster(0, 0, 4, 20, 8), (0, 0));
    assert_eq!(raster(1, 0, 4, 20, 8), (0, 1));
    assert_eq!(raster(3, 1, 4, 20, 8), (0, 7));
    assert_eq!(raster(0, 2, 4, 20, 8), (1, 0));
    // the last group has 20 - 16 = 4 rows
    assert_eq!(raster(0, 16, 4, 20, 8), (0, 16));
    assert_eq!(raster(3, 16, 4, 20, 8), (0, 19));
    assert_eq!(raster(0, 17, 4, 20, 8), (1, 16));
}

/// The wide kernels trap (as on the GPU) when launched without their dynamic shared
/// memory or with another block size, instead of touching memory they do not own.
#[test]
fn mma_wide_gemm_wrong_launch_traps() {
    let x = ABuf::new(&to_bf16(&[0.5f32; 64]));
    let y = ABuf::new(&to_bf16(&[0.0f32; 64]));
    let (xp, yp) = (x.ptr() as *const Bf16, y.ptr());
    for (block, smem) in [
        (MMA_WIDE_BM, MMA_WIDE_SMEM - 16),
        (128, MMA_WIDE_SMEM),
        (MMA_WIDE_BM, 0),
    ] {
        let r = std::panic::catch_unwind(|| unsafe {
            launch_dyn([1, 1, 1], block, smem, || {
                gemm_mma_wide_bf16(yp, xp, xp, null(), null(), 8, 8, 8, 8, 8)
            })
        });
        assert!(r.is_err(), "block {block} smem {smem} did not trap");
    }
}

/// The sm_90a wgmma kernels (128x256 tiles, two warpgroups, m64n256k16 from 128-byte
/// swizzled shared memory, 4-stage `cp.async` ring, one wgmma group in flight) vs f64
/// and bit for bit vs the 128x128 mma kernels (the emulated wgmma sums each k16 step as
/// the emulated `mma.sync` does, in K order from zero). Ragged M (over two 128-row
/// blocks), N (over two 256-column blocks) and K tails, K over the ring twice (up to 10
/// k-tiles of 64), odd ldx / ldy, bias / in-place residual, bf16 and f32 out, SiLU.
#[test]
fn wgmma_gemm_random_shapes() {
    let mut rng = Rng::new("wgmma_gemm");
    for it in 0..4 {
        let m = if it == 0 {
            rng.range(129, 300)
        } else {
            rng.range(1, 200)
        };
        let n = if it == 1 {
            rng.range(257, 400)
        } else {
            rng.range(1, 260)
        };
        let k = if it == 2 {
            8 * rng.range(40, 80)
        } else {
            8 * rng.range(1, 24)
        };
        let ldx = k + 8 * rng.range(0, 1);
        let c = case(&mut rng, m, n, k, ldx);
        let f32_out = it % 2 == 1;
        let new = run(&c, Path::Wgmma, 0, f32_out);
        let old = run(&c, Path::Mma, 0, f32_out);
        assert_same_bits(
            &format!("wgmma m {m} n {n} k {k} f32 {f32_out}"),
            &new,
            &old,
        );
    }
    let (m, n, k) = (rng.range(1, 200), rng.range(1, 200), 8 * rng.range(1, 20));
    let c = case(&mut rng, m, n, k, k);
    let new = run_silu(&c, Path::Wgmma);
    let old = run_silu(&c, Path::Mma);
    assert_same_bits(&format!("wgmma silu m {m} n {n} k {k}"), &new, &old);
}

/// More block rows than a rasterization group (9 or 10 of 128 rows, the last group
/// short) and two column blocks: every output written once with the right value.
#[test]
fn wgmma_gemm_grouped_raster() {
    let mut rng = Rng::new("wgmma_raster");
    let m = (WG_GROUP * WG_BM) as usize + rng.range(1, 200);
    let n = rng.range(257, 300);
    let c = case(&mut rng, m, n, 16, 16);
    run(&c, Path::Wgmma, 0, false);
}

/// The wgmma kernels trap when launched without their dynamic shared memory or with
/// another block size.
#[test]
fn wgmma_gemm_wrong_launch_traps() {
    let x = ABuf::new(&to_bf16(&[0.5f32; 64]));
    let y = ABuf::new(&to_bf16(&[0.0f32; 64]));
    let (xp, yp) = (x.ptr() as *const Bf16, y.ptr());
    for (block, smem) in [
        (WG_THREADS, WGMMA_SMEM - 16),
        (128, WGMMA_SMEM),
        (WG_THREADS, 0),
    ] {
        let r = std::panic::catch_unwind(|| unsafe {
            launch_dyn([1, 1, 1], block, smem, || {
                gemm_wgmma_bf16(yp, xp, xp, null(), null(), 8, 8, 8, 8, 8)
            })
        });
        assert!(r.is_err(), "block {block} smem {smem} did not trap");
    }
}

//! The decode GEMMs with a fused RMSNorm (`gemm_decode_qkv_bf16` / `gemm_decode_silu_bf16`
//! given a norm weight: x is the raw hidden state, normalized in registers as it is
//! loaded) under the emulator, on fresh random shapes (M over one and several 16-row
//! passes, K over one and several rounds of the norm's row pass, ragged N, row strides
//! over K, both block sizes, with and without biases), against:
//! - the two launches the fusion replaces, `rmsnorm_bf16` then the same kernel on its
//!   output, **bit for bit**, on activations whose sum of squares f32 adds exactly in
//!   any order (multiples of 1/4 up to 3: every partial sum is a multiple of 1/16 under
//!   2^20). The summation order of the squares is the one thing the fusion changes, so
//!   with it out of play every normalized element and every output must agree. (On
//!   general activations 1 / rms differs in its last bits and about one normalized
//!   element in 10^4 rounds to the neighbouring bf16.)
//! - an f64 reference on general activations (rmsnorm with bf16 rounding per element,
//!   dots in f64), within 2^-8 of the sum of the dot's absolute terms: the output's bf16
//!   rounding is at most 2^-8 of |y| <= that sum, the f32 accumulation and the rare
//!   flipped normalized element far less;
//!
//! and the fused kernels trap on rows the vectorised path cannot read.
#![allow(clippy::too_many_arguments)]
mod common;
use common::*;
use remp_gpu_kernels::gemm::*;
use remp_gpu_kernels::prims::{emu::launch, Bf16};
use remp_gpu_kernels::small::rmsnorm_bf16;
use std::ptr::null;

const EPS: f32 = 1e-5;
/// bf16 rounding, relative (8 significant bits).
const BF16_REL: f32 = 1.0 / 256.0;

/// `rmsnorm_bf16` on `m` rows of `x` (row stride `ldx`, K = `k`) as the engine launches
/// it (1024 threads), into a fresh dense `[m, k]` buffer.
fn rmsnorm_launch(x: &ABuf<Bf16>, norm: &ABuf<Bf16>, m: usize, k: usize, ldx: usize) -> ABuf<Bf16> {
    // the kernel takes dense rows: copy them out first
    let xs = x.to_vec();
    let dense: Vec<Bf16> = (0..m).flat_map(|i| xs[i * ldx..][..k].to_vec()).collect();
    let xd = ABuf::new(&dense);
    let out = ABuf::new(&to_bf16(&vec![f32::NAN; m * k]));
    let (op, xp, wp) = (
        out.ptr(),
        xd.ptr() as *const Bf16,
        norm.ptr() as *const Bf16,
    );
    // SAFETY: buffers sized for the launch (emulated threads).
    unsafe {
        launch([m as u32, 1, 1], 1024, || {
            rmsnorm_bf16(op, xp, wp, k as u32, EPS)
        })
    };
    out
}

/// f64 reference of the normalized rows: `bf16(w * bf16(x * inv_rms))`, dense `[m, k]`.
fn rmsnorm_ref(x: &[f32], w: &[f32], m: usize, k: usize, ldx: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(m * k);
    for i in 0..m {
        let row = &x[i * ldx..][..k];
        let ms = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / k as f64;
        let inv = 1.0 / (ms + EPS as f64).sqrt();
        out.extend((0..k).map(|j| rbf16(w[j] * rbf16((row[j] as f64 * inv) as f32))));
    }
    out
}

/// (dot, sum of |terms|) of row i of the dense `x` and row j of `w`, in f64.
fn dot(x: &[f32], w: &[f32], i: usize, j: usize, k: usize) -> (f32, f32) {
    let terms = (0..k).map(|kk| x[i * k + kk] as f64 * w[j * k + kk] as f64);
    let (s, a) = terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
    (s as f32, a as f32)
}

/// Activations: general (bf16 values of a uniform ±3) or exact-square ones (multiples
/// of 1/4 in [-3, 3], see the module comment).
fn activations(rng: &mut Rng, n: usize, exact: bool) -> Vec<f32> {
    if exact {
        (0..n)
            .map(|_| (rng.range(0, 25) as f32 - 12.0) / 4.0)
            .collect()
    } else {
        rng.vec_f32(n, 3.0).into_iter().map(rbf16).collect()
    }
}

struct Shape {
    m: usize,
    k: usize,
    ldx: usize,
    block: u32,
}

fn shapes(rng: &mut Rng, n: usize) -> Vec<Shape> {
    (0..n)
        .map(|it| {
            // every case a different pass structure: one row, rows past 8 (the second
            // half of the mma tile), a second pass of one row, three passes, ...
            let m = [1usize, 9, 40, 17, 2, 16, 7][it % 7];
            // one round of the norm's row pass is 8 x block elements: 2048 / 4096
            let k = rng.pick(&[64usize, 520, 2048, 4104, 9000]);
            Shape {
                m,
                k,
                ldx: k + rng.pick(&[0usize, 8]),
                block: [DEC_BLOCK, DEC_BLOCK_WIDE][it % 2],
            }
        })
        .collect()
}

fn assert_same_bits(what: &str, a: &[f32], b: &[f32]) {
    assert!(a.iter().all(|v| v.is_finite()), "{what}: unwritten outputs");
    let diff = a
        .iter()
        .zip(b)
        .filter(|(p, q)| p.to_bits() != q.to_bits())
        .count();
    assert_eq!(diff, 0, "{what}: {diff}/{} outputs differ", a.len());
}

#[test]
fn qkv_decode_gemm_with_fused_norm() {
    let mut rng = Rng::new("qkv_decode_gemm_norm");
    for (it, s) in shapes(&mut rng, 7).into_iter().enumerate() {
        let Shape { m, k, ldx, block } = s;
        let ns = [rng.range(1, 70), rng.range(1, 40), rng.range(1, 40)];
        let biased = it % 2 == 1;
        let wn: Vec<f32> = rng.vec_f32(k, 1.5).into_iter().map(rbf16).collect();
        let norm = ABuf::new(&to_bf16(&wn));
        let wf: Vec<Vec<f32>> = ns
            .iter()
            .map(|&n| rng.vec_f32(n * k, 0.5).into_iter().map(rbf16).collect())
            .collect();
        let bf: Vec<Vec<f32>> = ns
            .iter()
            .map(|&n| rng.vec_f32(n, 1.0).into_iter().map(rbf16).collect())
            .collect();
        let ws: Vec<ABuf<Bf16>> = wf.iter().map(|w| ABuf::new(&to_bf16(w))).collect();
        let bs: Vec<ABuf<Bf16>> = bf.iter().map(|b| ABuf::new(&to_bf16(b))).collect();
        let bias = |i: usize| {
            if biased {
                bs[i].ptr() as *const Bf16
            } else {
                null()
            }
        };
        let blocks: u32 = ns.iter().map(|&n| (n as u32).div_ceil(DEC_COLS)).sum();
        // outputs poisoned: every element must be written
        let run = |xp: *const Bf16, ldx: usize, normp: *const Bf16| {
            let ys: Vec<ABuf<Bf16>> = ns
                .iter()
                .map(|&n| ABuf::new(&to_bf16(&vec![f32::NAN; m * n])))
                .collect();
            let (y0, y1, y2) = (ys[0].ptr(), ys[1].ptr(), ys[2].ptr());
            let (w0, w1, w2) = (ws[0].ptr(), ws[1].ptr(), ws[2].ptr());
            // SAFETY: buffers sized for the launch (emulated threads).
            unsafe {
                launch([blocks, 1, 1], block, || {
                    gemm_decode_qkv_bf16(
                        y0,
                        y1,
                        y2,
                        xp,
                        w0,
                        w1,
                        w2,
                        bias(0),
                        bias(1),
                        bias(2),
                        normp,
                        EPS,
                        m as u32,
                        ns[0] as u32,
                        ns[1] as u32,
                        ns[2] as u32,
                        k as u32,
                        ldx as u32,
                    )
                })
            };
            ys.iter()
                .map(|y| from_bf16(&y.to_vec()))
                .collect::<Vec<_>>()
        };
        let what = |i: usize| format!("case {it} (m {m} k {k} ldx {ldx} block {block}) matrix {i}");

        // bit for bit against rmsnorm_bf16 + the unfused kernel
        let x = ABuf::new(&to_bf16(&activations(&mut rng, m * ldx, true)));
        let fused = run(x.ptr() as *const Bf16, ldx, norm.ptr() as *const Bf16);
        let xn = rmsnorm_launch(&x, &norm, m, k, ldx);
        let unfused = run(xn.ptr() as *const Bf16, k, null());
        for i in 0..3 {
            assert_same_bits(
                &format!("{}: fused vs rmsnorm + GEMM", what(i)),
                &fused[i],
                &unfused[i],
            );
        }

        // general activations against f64
        let xf = activations(&mut rng, m * ldx, false);
        let x = ABuf::new(&to_bf16(&xf));
        let fused = run(x.ptr() as *const Bf16, ldx, norm.ptr() as *const Bf16);
        let xr = rmsnorm_ref(&xf, &wn, m, k, ldx);
        for i in 0..3 {
            let (want, scale): (Vec<f32>, Vec<f32>) = (0..m * ns[i])
                .map(|e| {
                    let (r, c) = (e / ns[i], e % ns[i]);
                    let (v, a) = dot(&xr, &wf[i], r, c, k);
                    let b = if biased { bf[i][c] } else { 0.0 };
                    (rbf16(v + b), a + b.abs())
                })
                .unzip();
            assert_close_scaled(
                &format!("{}: fused vs f64", what(i)),
                &fused[i],
                &want,
                0.0,
                BF16_REL,
                &scale,
            );
        }
    }
}

#[test]
fn silu_decode_gemm_with_fused_norm() {
    let mut rng = Rng::new("silu_decode_gemm_norm");
    for (it, s) in shapes(&mut rng, 7).into_iter().enumerate() {
        let Shape { m, k, ldx, block } = s;
        let n = rng.range(1, 90);
        let ldy = n + [0usize, 5][it % 2];
        let wn: Vec<f32> = rng.vec_f32(k, 1.5).into_iter().map(rbf16).collect();
        let gf: Vec<f32> = rng.vec_f32(n * k, 0.5).into_iter().map(rbf16).collect();
        let uf: Vec<f32> = rng.vec_f32(n * k, 0.5).into_iter().map(rbf16).collect();
        let norm = ABuf::new(&to_bf16(&wn));
        let (g, u) = (ABuf::new(&to_bf16(&gf)), ABuf::new(&to_bf16(&uf)));
        let run = |xp: *const Bf16, ldx: usize, normp: *const Bf16| {
            let y = ABuf::new(&to_bf16(&vec![f32::NAN; m * ldy]));
            let (yp, gp, up) = (y.ptr(), g.ptr() as *const Bf16, u.ptr() as *const Bf16);
            // SAFETY: buffers sized for the launch (emulated threads).
            unsafe {
                launch([(n as u32).div_ceil(DEC_COLS / 2), 1, 1], block, || {
                    gemm_decode_silu_bf16(
                        yp, xp, gp, up, normp, EPS, m as u32, n as u32, k as u32, ldx as u32,
                        ldy as u32,
                    )
                })
            };
            let all = from_bf16(&y.to_vec());
            (0..m)
                .flat_map(|i| all[i * ldy..][..n].to_vec())
                .collect::<Vec<f32>>()
        };
        let what = format!("case {it} (m {m} n {n} k {k} ldx {ldx} block {block})");

        let x = ABuf::new(&to_bf16(&activations(&mut rng, m * ldx, true)));
        let fused = run(x.ptr() as *const Bf16, ldx, norm.ptr() as *const Bf16);
        let xn = rmsnorm_launch(&x, &norm, m, k, ldx);
        let unfused = run(xn.ptr() as *const Bf16, k, null());
        assert_same_bits(
            &format!("{what}: fused vs rmsnorm + GEMM"),
            &fused,
            &unfused,
        );

        let xf = activations(&mut rng, m * ldx, false);
        let x = ABuf::new(&to_bf16(&xf));
        let fused = run(x.ptr() as *const Bf16, ldx, norm.ptr() as *const Bf16);
        let xr = rmsnorm_ref(&xf, &wn, m, k, ldx);
        let silu = |g: f32| g / (1.0 + (-g).exp());
        let (want, scale): (Vec<f32>, Vec<f32>) = (0..m * n)
            .map(|e| {
                let (r, c) = (e / n, e % n);
                let ((gv, ga), (uv, ua)) = (dot(&xr, &gf, r, c, k), dot(&xr, &uf, r, c, k));
                let (gv, uv) = (rbf16(gv), rbf16(uv));
                let y = rbf16(rbf16(silu(gv)) * uv);
                // silu(g)·u moves by |silu'(g)| |u| dg + |silu(g)| du (|silu'| < 1.1), with
                // dg, du each within 2^-8 of their sums of |terms|; then two roundings
                // (silu(g), the product) of 2^-8 |y| each
                (y, 1.1 * uv.abs() * ga + silu(gv).abs() * ua + 2.0 * y.abs())
            })
            .unzip();
        assert_close_scaled(
            &format!("{what}: fused vs f64"),
            &fused,
            &want,
            0.0,
            BF16_REL,
            &scale,
        );
    }
}

/// With a norm weight, rows the vectorised path cannot read (K or the row stride not a
/// multiple of 8) or a norm weight it cannot (not 16-byte aligned) trap instead of
/// computing without the norm.
#[test]
fn fused_norm_on_unaligned_rows_traps() {
    let x = ABuf::new(&to_bf16(&[0.5f32; 256]));
    let y = ABuf::new(&to_bf16(&[0.0f32; 256]));
    let (xp, yp) = (x.ptr() as *const Bf16, y.ptr());
    // SAFETY: inside x (256 elements).
    let off = unsafe { xp.add(1) };
    for (k, ldx, norm) in [(12u32, 12u32, xp), (16, 17, xp), (16, 16, off)] {
        let what = format!("k {k} ldx {ldx} norm aligned {}", norm == xp);
        let r = std::panic::catch_unwind(|| unsafe {
            launch([1, 1, 1], DEC_BLOCK, || {
                gemm_decode_silu_bf16(yp, xp, xp, xp, norm, EPS, 2, 8, k, ldx, 8)
            })
        });
        assert!(r.is_err(), "silu {what} did not trap");
        let r = std::panic::catch_unwind(|| unsafe {
            launch([3, 1, 1], DEC_BLOCK, || {
                gemm_decode_qkv_bf16(
                    yp,
                    yp,
                    yp,
                    xp,
                    xp,
                    xp,
                    xp,
                    null(),
                    null(),
                    null(),
                    norm,
                    EPS,
                    2,
                    8,
                    8,
                    8,
                    k,
                    ldx,
                )
            })
        });
        assert!(r.is_err(), "qkv {what} did not trap");
    }
}

//! Small ops under the emulator vs plain CPU references (PyTorch rounding semantics).
#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]
mod common;
use common::*;
use remp_gpu_kernels::prims::emu::launch;
use remp_gpu_kernels::small::*;

fn rmsnorm_ref(x: &[f32], w: &[f32], cols: usize, eps: f32, r: fn(f32) -> f32) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for (xr, or) in x.chunks(cols).zip(out.chunks_mut(cols)) {
        let ms = xr.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>() / cols as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        for i in 0..cols {
            or[i] = r(w[i] * r((xr[i] as f64 * inv) as f32));
        }
    }
    out
}

#[test]
fn rmsnorm_all_types() {
    let mut rng = Rng::new("rmsnorm");
    for _ in 0..3 {
        let rows = rng.range(1, 5);
        let cols = rng.pick(&[1usize, 7, 64, 129, 333, 1000, 2048, 4099]);
        let eps = 1e-5f32;
        // The engine launches up to 1024 threads per row (`row_threads`).
        let bf16_threads = [128u32, 1024][rows % 2];
        let x = rng.vec_f32(rows * cols, 3.0);
        let w = rng.vec_f32(cols, 1.5);
        // bf16
        let (xb, wb) = (to_bf16(&x), to_bf16(&w));
        let mut ob = to_bf16(&vec![f32::NAN; rows * cols]);
        let ob_p = ob.as_mut_ptr();
        unsafe {
            launch([rows as u32, 1, 1], bf16_threads, || {
                rmsnorm_bf16(ob_p, xb.as_ptr(), wb.as_ptr(), cols as u32, eps)
            })
        };
        let want = rmsnorm_ref(&from_bf16(&xb), &from_bf16(&wb), cols, eps, rbf16);
        assert_close("rmsnorm bf16", &from_bf16(&ob), &want, 1e-6, 1.6e-2);
        // f16
        let (xh, wh) = (to_f16(&x), to_f16(&w));
        let mut oh = to_f16(&vec![f32::NAN; rows * cols]);
        let oh_p = oh.as_mut_ptr();
        unsafe {
            launch([rows as u32, 1, 1], 64, || {
                rmsnorm_f16(oh_p, xh.as_ptr(), wh.as_ptr(), cols as u32, eps)
            })
        };
        let want = rmsnorm_ref(&from_f16(&xh), &from_f16(&wh), cols, eps, rf16);
        assert_close("rmsnorm f16", &from_f16(&oh), &want, 1e-5, 2e-3);
        // f32, fused residual add
        let res0 = rng.vec_f32(rows * cols, 2.0);
        let mut res = res0.clone();
        let mut of = vec![f32::NAN; rows * cols];
        let of_p = of.as_mut_ptr();
        let res_p = res.as_mut_ptr();
        unsafe {
            launch([rows as u32, 1, 1], 96, || {
                add_rmsnorm_f32(of_p, res_p, x.as_ptr(), w.as_ptr(), cols as u32, eps)
            })
        };
        let sum: Vec<f32> = res0.iter().zip(&x).map(|(a, b)| a + b).collect();
        assert_close("add_rmsnorm residual", &res, &sum, 0.0, 0.0);
        let want = rmsnorm_ref(&sum, &w, cols, eps, |v| v);
        assert_close("add_rmsnorm f32", &of, &want, 1e-5, 1e-5);
    }
}

#[test]
fn rope_llama3_and_plain() {
    let mut rng = Rng::new("rope");
    for case in 0..3 {
        let head_dim = rng.pick(&[8usize, 32, 64, 128]);
        let qh = rng.range(1, 5);
        let kh = rng.range(1, qh);
        let tokens = rng.range(1, 4);
        let inv_freq: Vec<f32> = if case == 0 {
            llama3_inv_freq(head_dim, 500000.0, 8.0, 1.0, 4.0, 8192.0)
        } else {
            (0..head_dim / 2)
                .map(|i| (1.0 / 10000f64.powf(2.0 * i as f64 / head_dim as f64)) as f32)
                .collect()
        };
        let pos: Vec<u32> = (0..tokens).map(|_| rng.range(0, 140_000) as u32).collect();
        // q and k as column slices of one fused qkv row (stride > width)
        let stride = (qh + kh) * head_dim + 3;
        let qkv = rng.vec_f32(tokens * stride, 2.0);
        let rope_ref = |x: &[f32], r: fn(f32) -> f32| -> Vec<f32> {
            let mut out = x.to_vec();
            for t in 0..tokens {
                for h in 0..qh + kh {
                    let base = t * stride + h * head_dim;
                    let half = head_dim / 2;
                    for i in 0..half {
                        let f = pos[t] as f32 * inv_freq[i];
                        let (c, s) = (r(f.cos()), r(f.sin()));
                        let (x1, x2) = (x[base + i], x[base + i + half]);
                        out[base + i] = r(r(x1 * c) + r(-x2 * s));
                        out[base + i + half] = r(r(x2 * c) + r(x1 * s));
                    }
                }
            }
            out
        };
        let mut b = to_bf16(&qkv);
        let want = rope_ref(&from_bf16(&b), rbf16);
        let p = b.as_mut_ptr();
        unsafe {
            launch([tokens as u32, 1, 1], 64, || {
                rope_bf16(
                    p,
                    p.add(qh * head_dim),
                    pos.as_ptr(),
                    inv_freq.as_ptr(),
                    qh as u32,
                    kh as u32,
                    head_dim as u32,
                    stride as u32,
                    stride as u32,
                )
            })
        };
        assert_close("rope bf16", &from_bf16(&b), &want, 1e-2, 1.6e-2);
        let mut f = qkv.clone();
        let want = rope_ref(&f, |v| v);
        let p = f.as_mut_ptr();
        unsafe {
            launch([tokens as u32, 1, 1], 32, || {
                rope_f32(
                    p,
                    p.add(qh * head_dim),
                    pos.as_ptr(),
                    inv_freq.as_ptr(),
                    qh as u32,
                    kh as u32,
                    head_dim as u32,
                    stride as u32,
                    stride as u32,
                )
            })
        };
        assert_close("rope f32", &f, &want, 2e-5, 2e-5);
    }
}

#[test]
fn elementwise_embedding() {
    let mut rng = Rng::new("elementwise");
    let rows = rng.range(1, 6);
    let cols = rng.range(1, 300);
    // silu * mul on a fused [gate | up] layout
    let gu = rng.vec_f32(rows * 2 * cols, 6.0);
    let gb = to_bf16(&gu);
    let mut ob = to_bf16(&vec![f32::NAN; rows * cols]);
    let ob_p = ob.as_mut_ptr();
    unsafe {
        launch([3, 1, 1], 64, || {
            silu_mul_bf16(
                ob_p,
                gb.as_ptr(),
                gb.as_ptr().add(cols),
                rows as u32,
                cols as u32,
                2 * cols as u32,
                cols as u32,
            )
        })
    };
    let g = from_bf16(&gb);
    let want: Vec<f32> = (0..rows * cols)
        .map(|i| {
            let (r, c) = (i / cols, i % cols);
            let x = g[r * 2 * cols + c];
            rbf16(rbf16(x / (1.0 + (-x).exp())) * g[r * 2 * cols + cols + c])
        })
        .collect();
    assert_close("silu_mul bf16", &from_bf16(&ob), &want, 1e-6, 1.6e-2);
    // residual add, in place
    let n = rows * cols;
    let a = rng.vec_f32(n, 4.0);
    let b = rng.vec_f32(n, 4.0);
    let mut ah = to_f16(&a);
    let bh = to_f16(&b);
    let want: Vec<f32> = from_f16(&ah)
        .iter()
        .zip(from_f16(&bh))
        .map(|(x, y)| rf16(x + y))
        .collect();
    let p = ah.as_mut_ptr();
    unsafe {
        launch([2, 1, 1], 32, || {
            residual_add_f16(p, p, bh.as_ptr(), n as u32)
        })
    };
    assert_close("residual_add f16", &from_f16(&ah), &want, 0.0, 0.0);
    // vocab-parallel embedding
    let vocab = rng.range(4, 50);
    let (start, end) = (rng.range(0, vocab / 2), rng.range(vocab / 2 + 1, vocab));
    let dim = rng.range(1, 200);
    let table = rng.vec_f32((end - start) * dim, 1.0);
    let tokens = rng.range(1, 6);
    let ids: Vec<u32> = (0..tokens)
        .map(|_| rng.range(0, vocab - 1) as u32)
        .collect();
    let mut out = vec![f32::NAN; tokens * dim];
    let out_p = out.as_mut_ptr();
    unsafe {
        launch([tokens as u32, 1, 1], 64, || {
            embedding_f32(
                out_p,
                table.as_ptr(),
                ids.as_ptr(),
                dim as u32,
                start as u32,
                end as u32,
            )
        })
    };
    for (t, &id) in ids.iter().enumerate() {
        let id = id as usize;
        let want: Vec<f32> = if id >= start && id < end {
            table[(id - start) * dim..][..dim].to_vec()
        } else {
            vec![0.0; dim]
        };
        assert_eq!(
            &out[t * dim..][..dim],
            &want[..],
            "embedding row {t} id {id}"
        );
    }
}

#[test]
fn argmax_ties_lowest() {
    let mut rng = Rng::new("argmax");
    // 128 threads and the engine's 1024 (`row_threads`), rows long enough for the
    // kernel's four-loads-a-thread loop at either, with a tail.
    for threads in [128u32, 1024] {
        let rows = rng.range(1, 4);
        let vocab = rng.range(1, 9000);
        let mut x: Vec<f32> = (0..rows * vocab)
            .map(|_| (rng.range(0, 40) as f32) - 20.0)
            .collect();
        // plant ties at the max
        for r in 0..rows {
            let a = rng.range(0, vocab - 1);
            let b = rng.range(0, vocab - 1);
            x[r * vocab + a] = 100.0;
            x[r * vocab + b] = 100.0;
        }
        let xb = to_bf16(&x);
        let mut out = vec![u32::MAX; rows];
        let mut vals = vec![f32::NAN; rows];
        let (out_p, vals_p) = (out.as_mut_ptr(), vals.as_mut_ptr());
        unsafe {
            launch([rows as u32, 1, 1], threads, || {
                argmax_bf16(out_p, vals_p, xb.as_ptr(), vocab as u32)
            })
        };
        for r in 0..rows {
            let row = &x[r * vocab..][..vocab];
            let mut best = 0;
            for i in 0..vocab {
                if row[i] > row[best] {
                    best = i;
                }
            }
            assert_eq!(out[r] as usize, best, "row {r} ({threads} threads)");
            assert_eq!(vals[r], row[best], "row {r}'s value");
        }
        // Without `values` (null) only the indices are written.
        let mut again = vec![u32::MAX; rows];
        let again_p = again.as_mut_ptr();
        unsafe {
            launch([rows as u32, 1, 1], threads, || {
                argmax_bf16(again_p, std::ptr::null_mut(), xb.as_ptr(), vocab as u32)
            })
        };
        assert_eq!(again, out);
    }
}

#[test]
fn top_p_sampling() {
    let mut rng = Rng::new("top_p");
    for _ in 0..2 {
        let rows = rng.range(1, 3);
        let vocab = rng.range(2, 2000);
        let logits = rng.vec_f32(rows * vocab, 6.0);
        let temperature = rng.pick(&[0.5f32, 0.8, 1.0, 1.3]);
        let top_p = rng.pick(&[0.1f32, 0.5, 0.9, 0.95, 1.0]);
        let u: Vec<f32> = (0..rows).map(|_| rng.unit()).collect();
        let mut out = vec![u32::MAX; rows];
        let out_p = out.as_mut_ptr();
        unsafe {
            launch([rows as u32, 1, 1], 128, || {
                top_p_sample_f32(
                    out_p,
                    logits.as_ptr(),
                    vocab as u32,
                    temperature,
                    top_p,
                    u.as_ptr(),
                )
            })
        };
        for r in 0..rows {
            let row = &logits[r * vocab..][..vocab];
            let mx = row.iter().cloned().fold(f32::MIN, f32::max);
            let p: Vec<f64> = row
                .iter()
                .map(|&l| (((l - mx) / temperature) as f64).exp())
                .collect();
            let z: f64 = p.iter().sum();
            let mut sorted = p.clone();
            sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
            let mut acc = 0.0;
            let mut tau = 0.0;
            for &v in &sorted {
                acc += v;
                tau = v;
                if acc >= top_p as f64 * z * (1.0 - 1e-6) {
                    break;
                }
            }
            let kept: f64 = p.iter().filter(|&&v| v >= tau).sum();
            let target = u[r] as f64 * kept;
            let pick = out[r] as usize;
            assert!(pick < vocab, "row {r}: pick {pick}");
            // the pick is kept (or within rounding of the threshold)
            assert!(
                p[pick] >= tau * (1.0 - 1e-4),
                "row {r}: picked p={} below threshold {tau}",
                p[pick]
            );
            // and its cumulative interval contains the target, up to rounding
            let before: f64 = (0..pick).filter(|&i| p[i] >= tau).map(|i| p[i]).sum();
            let slack = 1e-4 * kept + 1e-4;
            assert!(
                before - slack <= target && target <= before + p[pick] + slack,
                "row {r}: target {target} not in [{before}, {}]",
                before + p[pick]
            );
        }
    }
}

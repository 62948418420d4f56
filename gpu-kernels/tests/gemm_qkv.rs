//! The grouped decode GEMM (`gemm_decode_qkv_bf16`: the q, k and v projections of a
//! layer in one launch) under the emulator: bit for bit equal to three
//! `gemm_decode_bf16` launches with the same block size (each block runs that kernel's
//! code for its matrix; the block size sets the K split, hence the summation order), on
//! fresh random shapes with ragged column counts (n_i not multiples of the 16-column
//! block, so matrix boundaries fall inside the grid's block order), with and without
//! biases, aligned (tensor-core path) and misaligned (scalar path) activations, both
//! block sizes.
mod common;
use common::*;
use remp_gpu_kernels::gemm::*;
use remp_gpu_kernels::prims::{emu::launch, Bf16};
use std::ptr::null;

#[test]
fn qkv_decode_gemm_equals_three_launches() {
    let mut rng = Rng::new("qkv_decode_gemm");
    for it in 0..6 {
        let m = rng.pick(&[1usize, 2, 5, 16, 33]);
        let k = rng.pick(&[64usize, 256, 264, 1000]);
        let ns = [rng.range(1, 70), rng.range(1, 40), rng.range(1, 40)];
        let aligned = it % 3 != 2;
        // misaligned rows (ldx odd) take the scalar path
        let ldx = if aligned { k } else { k + 1 };
        let block = if it % 2 == 0 {
            DEC_BLOCK
        } else {
            DEC_BLOCK_WIDE
        };
        let biased = it % 2 == 1;
        let x = ABuf::new(&to_bf16(&rng.vec_f32(m * ldx, 1.0)));
        let ws = rand_bf16_bufs(&mut rng, &ns.map(|n| n * k), 0.5);
        let bs = rand_bf16_bufs(&mut rng, &ns, 1.0);
        let bias = |i: usize| ptr_if(biased, &bs[i]);
        // outputs poisoned: every element must be written
        let poison = |n: usize| ABuf::new(&to_bf16(&vec![f32::NAN; m * n]));
        let (one, grouped): (Vec<_>, Vec<_>) = ns.iter().map(|&n| (poison(n), poison(n))).unzip();
        for i in 0..3 {
            let (y, w, n) = (one[i].ptr(), ws[i].ptr(), ns[i] as u32);
            let xp = x.ptr() as *const Bf16;
            // SAFETY: buffers sized for the launch (emulated threads).
            unsafe {
                launch([n.div_ceil(DEC_COLS), 1, 1], block, || {
                    gemm_decode_bf16(
                        y,
                        xp,
                        w,
                        bias(i),
                        null(),
                        m as u32,
                        n,
                        k as u32,
                        ldx as u32,
                        n,
                    )
                })
            };
        }
        let blocks: u32 = ns.iter().map(|&n| (n as u32).div_ceil(DEC_COLS)).sum();
        let (y0, y1, y2) = (grouped[0].ptr(), grouped[1].ptr(), grouped[2].ptr());
        let (w0, w1, w2) = (ws[0].ptr(), ws[1].ptr(), ws[2].ptr());
        let xp = x.ptr() as *const Bf16;
        // SAFETY: as above.
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
                    null(),
                    0.0,
                    m as u32,
                    ns[0] as u32,
                    ns[1] as u32,
                    ns[2] as u32,
                    k as u32,
                    ldx as u32,
                )
            })
        };
        for i in 0..3 {
            let (a, b) = (from_bf16(&one[i].to_vec()), from_bf16(&grouped[i].to_vec()));
            assert!(
                a.iter().all(|v| v.is_finite()),
                "case {it}: reference unwritten"
            );
            let same = a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(
                same,
                "case {it} (m {m} k {k} n {ns:?} block {block}): matrix {i} differs"
            );
        }
    }
}

/// `gemm_decode_qkv_rope_bf16` (RoPE and the K/V cache write as the grouped GEMM's
/// epilogue) equals `gemm_decode_qkv_bf16` then `rope_kv_write_bf16` to the bit: the
/// rotated q rows and every cache slot (caches filled with other values first, so an
/// unwritten or misplaced slot shows), on fresh random shapes: head_dim 64 and 128,
/// GQA groups, one and several 16-row passes, with and without biases and the fused
/// RMSNorm, both block sizes, scattered slots and a padding row (slot `U32_MAX`: not
/// written), positions up to 4000.
#[test]
fn qkv_rope_decode_gemm_equals_qkv_then_rope_kv_write() {
    use remp_gpu_kernels::attention::rope_kv_write_bf16;
    let mut rng = Rng::new("qkv_rope_decode_gemm");
    for it in 0..6 {
        let (kvh, group, d) = (
            rng.range(1, 3),
            rng.pick(&[1usize, 2, 4]),
            [64usize, 128][it % 2],
        );
        let qh = kvh * group;
        let (nq, nkv) = (qh * d, kvh * d);
        let m = [1usize, 5, 16, 17, 2, 33][it];
        let k = rng.pick(&[64usize, 256, 520]);
        let ldx = k + [0usize, 8][it % 2];
        let block = if it % 3 == 0 {
            DEC_BLOCK_WIDE
        } else {
            DEC_BLOCK
        };
        let (biased, normed) = (it % 2 == 1, it % 3 != 1);
        let eps = 1e-5f32;
        let x = ABuf::new(&to_bf16(&rng.vec_f32(m * ldx, 2.0)));
        let norm = ABuf::new(&to_bf16(&rng.vec_f32(k, 1.5)));
        let ns = [nq, nkv, nkv];
        let ws = rand_bf16_bufs(&mut rng, &ns.map(|n| n * k), 0.5);
        let bs = rand_bf16_bufs(&mut rng, &ns, 1.0);
        let bias = |i: usize| ptr_if(biased, &bs[i]);
        let normp = if normed {
            norm.ptr() as *const Bf16
        } else {
            null()
        };
        let pos: Vec<u32> = (0..m).map(|_| rng.range(0, 4000) as u32).collect();
        let inv: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / d as f32))
            .collect();
        let nslots = 2 * m + 3;
        let mut slots: Vec<u32> = (0..nslots as u32).collect();
        for i in (1..slots.len()).rev() {
            slots.swap(i, rng.range(0, i));
        }
        slots.truncate(m);
        if m > 1 {
            // a padding row (a single row is always written)
            slots[rng.range(0, m - 1)] = u32::MAX;
        }
        let cache = to_bf16(&rng.vec_f32(nslots * nkv, 1.0));
        let blocks = ((nq + 2 * nkv) / 16) as u32;
        let (w0, w1, w2) = (ws[0].ptr(), ws[1].ptr(), ws[2].ptr());
        let (xp, pp, ip, sp) = (
            x.ptr() as *const Bf16,
            pos.as_ptr(),
            inv.as_ptr(),
            slots.as_ptr(),
        );
        let (mu, nqu, nkvu, ku, ldxu, du) = (
            m as u32, nq as u32, nkv as u32, k as u32, ldx as u32, d as u32,
        );
        // (q rows, k cache, v cache) after each way
        let run = |fused: bool| {
            let q = ABuf::new(&to_bf16(&vec![f32::NAN; m * nq]));
            let (kc, vc) = (ABuf::new(&cache), ABuf::new(&cache));
            let (qp, kp, vp) = (q.ptr(), kc.ptr(), vc.ptr());
            // SAFETY: buffers sized for the launches (emulated threads).
            unsafe {
                if fused {
                    launch([blocks, 1, 1], block, || {
                        gemm_decode_qkv_rope_bf16(
                            qp,
                            xp,
                            w0,
                            w1,
                            w2,
                            bias(0),
                            bias(1),
                            bias(2),
                            normp,
                            eps,
                            pp,
                            ip,
                            kp,
                            vp,
                            sp,
                            mu,
                            nqu,
                            nkvu,
                            ku,
                            ldxu,
                            du,
                        )
                    });
                } else {
                    let kb = ABuf::new(&to_bf16(&vec![f32::NAN; m * nkv]));
                    let vb = ABuf::new(&to_bf16(&vec![f32::NAN; m * nkv]));
                    let (kbp, vbp) = (kb.ptr(), vb.ptr());
                    launch([blocks, 1, 1], block, || {
                        gemm_decode_qkv_bf16(
                            qp,
                            kbp,
                            vbp,
                            xp,
                            w0,
                            w1,
                            w2,
                            bias(0),
                            bias(1),
                            bias(2),
                            normp,
                            eps,
                            mu,
                            nqu,
                            nkvu,
                            nkvu,
                            ku,
                            ldxu,
                        )
                    });
                    launch([mu, 1, 1], 128, || {
                        rope_kv_write_bf16(
                            qp,
                            kbp,
                            vbp,
                            pp,
                            ip,
                            kp,
                            vp,
                            sp,
                            (nq / d) as u32,
                            (nkv / d) as u32,
                            du,
                            nqu,
                            nkvu,
                            nkvu,
                        )
                    });
                }
            }
            (q.to_vec(), kc.to_vec(), vc.to_vec())
        };
        let bits = |v: &[Bf16]| from_bf16(v).iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let (a, b) = (run(false), run(true));
        let what = format!(
            "case {it} (m {m} k {k} ldx {ldx} q/kv heads {qh}/{kvh} d {d} block {block} bias {biased} norm {normed})"
        );
        assert!(
            from_bf16(&b.0).iter().all(|v| v.is_finite()),
            "{what}: q unwritten"
        );
        assert_eq!(bits(&a.0), bits(&b.0), "{what}: rotated q");
        assert_eq!(bits(&a.1), bits(&b.1), "{what}: k cache");
        assert_eq!(bits(&a.2), bits(&b.2), "{what}: v cache");
        assert_ne!(bits(&a.1), bits(&cache), "{what}: nothing was written");
    }
}

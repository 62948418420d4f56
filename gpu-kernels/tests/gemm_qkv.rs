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
        let ws: Vec<ABuf<Bf16>> = ns
            .iter()
            .map(|&n| ABuf::new(&to_bf16(&rng.vec_f32(n * k, 0.5))))
            .collect();
        let bs: Vec<ABuf<Bf16>> = ns
            .iter()
            .map(|&n| ABuf::new(&to_bf16(&rng.vec_f32(n, 1.0))))
            .collect();
        let bias = |i: usize| {
            if biased {
                bs[i].ptr() as *const Bf16
            } else {
                null()
            }
        };
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

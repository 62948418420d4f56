//! Attention kernels under the emulator vs an f64 reference: paged decode (GQA, odd
//! group sizes and head dims, split-K + combine), causal varlen prefill over the paged
//! cache, and the KV cache write.
#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]
mod common;
use common::*;
use remp_gpu_kernels::attention::*;
use remp_gpu_kernels::prims::{emu::launch, Bf16};

struct Cache {
    kvh: usize,
    d: usize,
    bs: usize,
    max_blocks: usize,
    k: ABuf<Bf16>,
    v: ABuf<Bf16>,
    tables: Vec<u32>,
    kf: Vec<f32>,
    vf: Vec<f32>,
}

impl Cache {
    fn new(rng: &mut Rng, ctx: &[usize], kvh: usize, d: usize, bs: usize) -> Cache {
        let max_blocks = ctx.iter().map(|c| c.div_ceil(bs)).max().unwrap().max(1);
        let nblocks = ctx.len() * max_blocks + 3;
        // random block ids, each used once
        let mut ids: Vec<u32> = (0..nblocks as u32).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, rng.range(0, i));
        }
        let tables = ids[..ctx.len() * max_blocks].to_vec();
        let kf: Vec<f32> = rng
            .vec_f32(nblocks * bs * kvh * d, 1.0)
            .into_iter()
            .map(rbf16)
            .collect();
        let vf: Vec<f32> = rng
            .vec_f32(nblocks * bs * kvh * d, 1.0)
            .into_iter()
            .map(rbf16)
            .collect();
        Cache {
            kvh,
            d,
            bs,
            max_blocks,
            k: ABuf::new(&to_bf16(&kf)),
            v: ABuf::new(&to_bf16(&vf)),
            tables,
            kf,
            vf,
        }
    }
    fn at(&self, seq: usize, t: usize, h: usize) -> usize {
        let blk = self.tables[seq * self.max_blocks + t / self.bs] as usize;
        ((blk * self.bs + t % self.bs) * self.kvh + h) * self.d
    }
}

/// Launches paged prefill kernel `kernel` over cache `c` on the emulator: `qh` query
/// heads per row at `q` (rows `q_stride` apart) into `out`, sequences given as (ctx_lens,
/// q_lens, q_starts).
#[allow(clippy::too_many_arguments)]
fn run_prefill(
    kernel: PrefillKernel,
    grid: [u32; 3],
    block: u32,
    out: *mut Bf16,
    q: *const Bf16,
    q_stride: usize,
    qh: usize,
    c: &Cache,
    (ctx, qlen, starts): (&[usize], &[usize], &[u32]),
    scale: f32,
) {
    let ctx32: Vec<u32> = ctx.iter().map(|&x| x as u32).collect();
    let qlen32: Vec<u32> = qlen.iter().map(|&x| x as u32).collect();
    let (kp, vp) = (c.k.ptr() as *const Bf16, c.v.ptr() as *const Bf16);
    let (tp, cp, stp, qlp) = (
        c.tables.as_ptr(),
        ctx32.as_ptr(),
        starts.as_ptr(),
        qlen32.as_ptr(),
    );
    let dims = [qh, c.kvh, c.d, c.bs, c.max_blocks, q_stride].map(|v| v as u32);
    let [qh, kvh, d, bs, mb, qs] = dims;
    // SAFETY: the caller's buffers are sized for the launch (emulated threads).
    unsafe {
        launch(grid, block, || {
            kernel(
                out, q, kp, vp, tp, cp, stp, qlp, qh, kvh, d, bs, mb, qs, scale,
            )
        });
    }
}

/// The causal prefill reference: for every sequence's new tokens (row `starts[s] + i`
/// of `q`, stride `q_stride`) and every q head, attention over the sequence's positions
/// up to its own (`ctx - qlen + i`), rows in token order, heads within.
fn prefill_ref(
    c: &Cache,
    q: &[f32],
    q_stride: usize,
    qh: usize,
    group: usize,
    (ctx, qlen, starts): (&[usize], &[usize], &[u32]),
    scale: f32,
) -> Vec<f32> {
    let d = c.d;
    let mut want = vec![];
    for s in 0..ctx.len() {
        for i in 0..qlen[s] {
            let r = starts[s] as usize + i;
            for h in 0..qh {
                let n = ctx[s] - qlen[s] + i + 1;
                want.extend(attend_ref(
                    c,
                    s,
                    &q[r * q_stride + h * d..][..d],
                    h,
                    group,
                    n,
                    scale,
                ));
            }
        }
    }
    want
}

/// softmax(q·K[0..n]ᵀ · scale) · V[0..n] for one query row of head h.
fn attend_ref(
    c: &Cache,
    seq: usize,
    q: &[f32],
    h: usize,
    group: usize,
    n: usize,
    scale: f32,
) -> Vec<f32> {
    let kh = h / group;
    let s: Vec<f64> = (0..n)
        .map(|t| {
            let k = &c.kf[c.at(seq, t, kh)..][..c.d];
            q.iter()
                .zip(k)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>()
                * scale as f64
        })
        .collect();
    let mx = s.iter().cloned().fold(f64::MIN, f64::max);
    let p: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
    let z: f64 = p.iter().sum();
    (0..c.d)
        .map(|e| {
            (0..n)
                .map(|t| p[t] * c.vf[c.at(seq, t, kh) + e] as f64)
                .sum::<f64>()
                / z
        })
        .map(|x| rbf16(x as f32))
        .collect()
}

/// The signature shared by the decode kernels (`attn_decode_bf16` and its variants).
type DecodeKernel = unsafe fn(
    *mut Bf16,
    *mut f32,
    *mut f32,
    *const Bf16,
    *const Bf16,
    *const Bf16,
    *const u32,
    *const u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    f32,
);

#[test]
fn paged_decode_gqa_split_k() {
    paged_decode("attn_decode", attn_decode_bf16, 3, 70, &[8, 32, 4096]);
}

/// Longer contexts than above so each warp's 3-stage ring wraps several times (a stage is
/// 8–128 tokens per warp), and split starts that do and do not align to a stage (36, 100:
/// stages that straddle a KV block must take the per-slot table path).
#[test]
fn paged_decode_pipelined_gqa_split_k() {
    paged_decode(
        "attn_decode_pipelined",
        attn_decode_pipelined_bf16,
        8,
        600,
        &[8, 36, 100, 4096],
    );
}

/// `kernel` against the f64 reference on `rounds` random shapes: contexts `1..=max_ctx`,
/// split sizes from `split_sizes`, combined by `attn_decode_combine_bf16` when split.
fn paged_decode(
    name: &str,
    kernel: DecodeKernel,
    rounds: usize,
    max_ctx: usize,
    split_sizes: &[usize],
) {
    let mut rng = Rng::new(name);
    for _ in 0..rounds {
        let kvh = rng.range(1, 3);
        let group = rng.pick(&[1usize, 2, 3, 5, 8, 10]);
        let qh = kvh * group;
        let d = rng.pick(&[8usize, 24, 64, 128]);
        let bs = rng.pick(&[4usize, 16]);
        let nseq = rng.range(1, 2);
        let ctx: Vec<usize> = (0..nseq).map(|_| rng.range(1, max_ctx)).collect();
        let split_tokens = rng.pick(split_sizes);
        let splits = ctx.iter().max().unwrap().div_ceil(split_tokens);
        let c = Cache::new(&mut rng, &ctx, kvh, d, bs);
        let q_stride = qh * d + rng.pick(&[0usize, 8]);
        let qf: Vec<f32> = rng
            .vec_f32(nseq * q_stride, 1.0)
            .into_iter()
            .map(rbf16)
            .collect();
        let qb = ABuf::new(&to_bf16(&qf));
        let scale = 1.0 / (d as f32).sqrt();
        let out = ABuf::new(&to_bf16(&vec![f32::NAN; nseq * qh * d]));
        let o_part = ABuf::new(&vec![f32::NAN; nseq * qh * splits * d]);
        let ml_part = ABuf::new(&vec![f32::NAN; nseq * qh * splits * 2]);
        let ctx32: Vec<u32> = ctx.iter().map(|&x| x as u32).collect();
        let (op, pp, mp, qp) = (
            out.ptr(),
            o_part.ptr(),
            ml_part.ptr(),
            qb.ptr() as *const Bf16,
        );
        let (kp, vp, tp, cp) = (
            c.k.ptr() as *const Bf16,
            c.v.ptr() as *const Bf16,
            c.tables.as_ptr(),
            ctx32.as_ptr(),
        );
        let gchunks = group.div_ceil(4) as u32;
        unsafe {
            launch(
                [kvh as u32 * gchunks, nseq as u32, splits as u32],
                128,
                || {
                    kernel(
                        op,
                        pp,
                        mp,
                        qp,
                        kp,
                        vp,
                        tp,
                        cp,
                        qh as u32,
                        kvh as u32,
                        d as u32,
                        bs as u32,
                        c.max_blocks as u32,
                        q_stride as u32,
                        split_tokens as u32,
                        scale,
                    )
                },
            );
            if splits > 1 {
                launch([qh as u32, nseq as u32, 1], 128, || {
                    attn_decode_combine_bf16(
                        op,
                        pp,
                        mp,
                        cp,
                        qh as u32,
                        d as u32,
                        splits as u32,
                        split_tokens as u32,
                    )
                });
            }
        }
        let mut want = vec![];
        for s in 0..nseq {
            for h in 0..qh {
                want.extend(attend_ref(
                    &c,
                    s,
                    &qf[s * q_stride + h * d..][..d],
                    h,
                    group,
                    ctx[s],
                    scale,
                ));
            }
        }
        let what = format!(
            "{name} kvh {kvh} group {group} d {d} bs {bs} ctx {ctx:?} split {split_tokens}"
        );
        assert_close(&what, &from_bf16(&out.to_vec()), &want, 4e-3, 1.6e-2);
    }
}

#[test]
fn causal_prefill_varlen_with_cache_write() {
    let mut rng = Rng::new("attn_prefill");
    for _ in 0..2 {
        let kvh = rng.range(1, 3);
        let group = rng.pick(&[1usize, 3, 4, 9]);
        let qh = kvh * group;
        let d = rng.pick(&[16usize, 40, 64]);
        let bs = rng.pick(&[4usize, 16]);
        let nseq = rng.range(1, 2);
        let qlen: Vec<usize> = (0..nseq).map(|_| rng.range(1, 9)).collect();
        let ctx: Vec<usize> = qlen.iter().map(|&q| q + rng.range(0, 20)).collect();
        let mut c = Cache::new(&mut rng, &ctx, kvh, d, bs);
        // the new tokens' K/V come from a fused qkv buffer and are scattered by the kernel
        let stride = (qh + 2 * kvh) * d;
        let tokens: usize = qlen.iter().sum();
        let qkv: Vec<f32> = rng
            .vec_f32(tokens * stride, 1.0)
            .into_iter()
            .map(rbf16)
            .collect();
        let qkvb = ABuf::new(&to_bf16(&qkv));
        let mut slots = vec![];
        let mut starts = vec![];
        let mut row = 0;
        for s in 0..nseq {
            starts.push(row as u32);
            for i in 0..qlen[s] {
                let t = ctx[s] - qlen[s] + i;
                let blk = c.tables[s * c.max_blocks + t / bs] as usize;
                slots.push((blk * bs + t % bs) as u32);
                // mirror into the reference cache
                let base = c.at(s, t, 0);
                for h in 0..kvh {
                    for e in 0..d {
                        c.kf[base + h * d + e] = qkv[(row + i) * stride + qh * d + h * d + e];
                        c.vf[base + h * d + e] =
                            qkv[(row + i) * stride + (qh + kvh) * d + h * d + e];
                    }
                }
            }
            row += qlen[s];
        }
        slots.push(u32::MAX); // a padding row that must be skipped
        let qp = qkvb.ptr() as *const Bf16;
        let (kp, vp, sp) = (c.k.ptr(), c.v.ptr(), slots.as_ptr());
        unsafe {
            launch([tokens as u32 + 1, 1, 1], 64, || {
                kv_cache_write_bf16(
                    kp,
                    vp,
                    qp.add(qh * d),
                    qp.add((qh + kvh) * d),
                    sp,
                    kvh as u32,
                    d as u32,
                    stride as u32,
                    stride as u32,
                )
            });
        }
        assert_eq!(from_bf16(&c.k.to_vec()), c.kf, "kv_cache_write K");
        assert_eq!(from_bf16(&c.v.to_vec()), c.vf, "kv_cache_write V");
        let out = ABuf::new(&to_bf16(&vec![f32::NAN; tokens * qh * d]));
        let scale = 1.0 / (d as f32).sqrt();
        let gchunks = group.div_ceil(4) as u32;
        let maxq = *qlen.iter().max().unwrap() as u32;
        let grid = [kvh as u32 * gchunks, maxq.div_ceil(4), nseq as u32];
        let seqs = (&ctx[..], &qlen[..], &starts[..]);
        run_prefill(
            attn_prefill_bf16,
            grid,
            128,
            out.ptr(),
            qp,
            stride,
            qh,
            &c,
            seqs,
            scale,
        );
        let want = prefill_ref(&c, &qkv, stride, qh, group, (&ctx, &qlen, &starts), scale);
        let what =
            format!("prefill kvh {kvh} group {group} d {d} bs {bs} qlen {qlen:?} ctx {ctx:?}");
        assert_close(&what, &from_bf16(&out.to_vec()), &want, 4e-3, 1.6e-2);
    }
}

/// `attn_prefill_mma_bf16` (tensor cores) against the f64 reference: several sequences
/// per launch with different cached prefixes and new-token counts (chunked prefill:
/// q_len < ctx), q_len and ctx not multiples of the 64-query / 32-key tiles, GQA group
/// sizes 1, 4 and 8, head_dim 64 and 128, KV block sizes 16 and 12, q from a fused qkv
/// row (q_stride > q_heads * head_dim) and, in some rounds, a q_stride that is not
/// 16-byte aligned (the plain-load path for Q). The tolerance is the SIMT prefill
/// test's: both kernels round the output to bf16, but the mma kernel sums scores and
/// P·V in a different f32 order than the SIMT kernel (and feeds P to the tensor cores
/// as bf16), so it is compared with the exact f64 result, not bit for bit with
/// `attn_prefill_bf16`. Output rows past the tokens must stay unwritten. In rounds
/// without GQA each query's own key dominates its softmax, so losing the diagonal key
/// shows (a tile skipped one too early at the causal edge fails this test).
#[test]
fn causal_prefill_mma_varlen() {
    let mut rng = Rng::new("attn_prefill_mma");
    for round in 0..4 {
        let kvh = rng.range(1, 2);
        let group = [1usize, 4, 8][round % 3];
        let qh = kvh * group;
        let d = [64usize, 128][(round / 2) % 2];
        let bs = rng.pick(&[16usize, 12]);
        let nseq = rng.range(2, 3);
        let qlen: Vec<usize> = (0..nseq)
            .map(|_| rng.pick(&[1usize, 17, 64, 70, 100, 130]))
            .collect();
        let ctx: Vec<usize> = qlen
            .iter()
            .map(|&q| q + rng.pick(&[0usize, 5, 31, 40, 77]))
            .collect();
        let mut c = Cache::new(&mut rng, &ctx, kvh, d, bs);
        let tokens: usize = qlen.iter().sum();
        // q rows of a fused qkv projection; odd extra stride: not 16-byte aligned
        let q_stride = (qh + 2 * kvh) * d + rng.pick(&[0usize, 3]);
        let qf: Vec<f32> = rng
            .vec_f32((tokens + 1) * q_stride, 1.0)
            .into_iter()
            .map(rbf16)
            .collect();
        let qb = ABuf::new(&to_bf16(&qf));
        let mut starts = vec![];
        let mut row = 0;
        for &ql in &qlen {
            starts.push(row as u32);
            row += ql;
        }
        // With one q head per KV head, each query's own key is made dominant (k_t = 4·q_t:
        // a score of about 4·d/3 / √d against O(1) for the others), so its softmax weight
        // is ≈ 1 and a kernel that skips or masks the diagonal key (an off-by-one at the
        // causal edge) is off by O(1), far outside the bf16 tolerance.
        if group == 1 {
            for s in 0..nseq {
                for i in 0..qlen[s] {
                    let (r, t) = (starts[s] as usize + i, ctx[s] - qlen[s] + i);
                    for h in 0..qh {
                        let at = c.at(s, t, h);
                        for j in 0..d {
                            c.kf[at + j] = rbf16(4.0 * qf[r * q_stride + h * d + j]);
                        }
                    }
                }
            }
            c.k = ABuf::new(&to_bf16(&c.kf));
        }
        // one padding row past the last token: must stay NaN
        let out = ABuf::new(&to_bf16(&vec![f32::NAN; (tokens + 1) * qh * d]));
        let scale = 1.0 / (d as f32).sqrt();
        let maxq = *qlen.iter().max().unwrap() as u32;
        let grid = [qh as u32, maxq.div_ceil(FA_BM), nseq as u32];
        let seqs = (&ctx[..], &qlen[..], &starts[..]);
        let qp = qb.ptr() as *const Bf16;
        run_prefill(
            attn_prefill_mma_bf16,
            grid,
            FA_THREADS,
            out.ptr(),
            qp,
            q_stride,
            qh,
            &c,
            seqs,
            scale,
        );
        let want = prefill_ref(&c, &qf, q_stride, qh, group, (&ctx, &qlen, &starts), scale);
        let what = format!(
            "prefill_mma kvh {kvh} group {group} d {d} bs {bs} q_stride {q_stride} \
             qlen {qlen:?} ctx {ctx:?}"
        );
        let got = from_bf16(&out.to_vec());
        assert_close(&what, &got[..tokens * qh * d], &want, 4e-3, 1.6e-2);
        assert!(
            got[tokens * qh * d..].iter().all(|x| x.is_nan()),
            "{what}: wrote past the last token"
        );
    }
}

/// `rope_kv_write_bf16` (one launch) equals `rope_bf16` then `kv_cache_write_bf16` to the
/// bit: rotated q and k rows and every cache slot, on fresh random rows with GQA, strided
/// rows of a fused qkv buffer, scattered slots and a padding row (slot `U32_MAX`, not
/// written).
#[test]
fn rope_kv_write_equals_two_launches() {
    use remp_gpu_kernels::small::rope_bf16;
    let mut rng = Rng::new("rope_kv_write");
    for _ in 0..4 {
        let (kvh, group) = (rng.range(1, 3), rng.pick(&[1usize, 4]));
        let (qh, d) = (kvh * group, rng.pick(&[64usize, 128]));
        // (at least 2 rows: one of them is the padding row)
        let tokens = rng.range(2, 9);
        let stride = (qh + 2 * kvh) * d; // rows of a fused [q | k | v] projection
        let qkv = to_bf16(&rng.vec_f32(tokens * stride, 2.0));
        let pos: Vec<u32> = (0..tokens).map(|_| rng.range(0, 4000) as u32).collect();
        let inv: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / d as f32))
            .collect();
        let nslots = 2 * tokens + 3;
        let mut slots: Vec<u32> = (0..nslots as u32).collect();
        for i in (1..slots.len()).rev() {
            slots.swap(i, rng.range(0, i));
        }
        slots.truncate(tokens);
        slots[rng.range(0, tokens - 1)] = u32::MAX;
        let cache = to_bf16(&rng.vec_f32(nslots * kvh * d, 1.0));
        // (q, k, v rows in one buffer, k cache, v cache) after each way
        let run = |fused: bool| {
            let (x, kc, vc) = (ABuf::new(&qkv), ABuf::new(&cache), ABuf::new(&cache));
            let q = x.ptr();
            // SAFETY: in-bounds row pointers of the buffers above.
            let (k, v) = unsafe { (q.add(qh * d), q.add((qh + kvh) * d)) };
            let (pp, ip, sp) = (pos.as_ptr(), inv.as_ptr(), slots.as_ptr());
            let (kp, vp) = (kc.ptr(), vc.ptr());
            let (qh, kvh, d, s) = (qh as u32, kvh as u32, d as u32, stride as u32);
            // SAFETY: buffers sized for the launches (emulated threads).
            unsafe {
                if fused {
                    launch([tokens as u32, 1, 1], 128, || {
                        rope_kv_write_bf16(q, k, v, pp, ip, kp, vp, sp, qh, kvh, d, s, s, s)
                    });
                } else {
                    launch([tokens as u32, 1, 1], 128, || {
                        rope_bf16(q, k, pp, ip, qh, kvh, d, s, s)
                    });
                    launch([tokens as u32, 1, 1], 128, || {
                        kv_cache_write_bf16(kp, vp, k, v, sp, kvh, d, s, s)
                    });
                }
            }
            (x.to_vec(), kc.to_vec(), vc.to_vec())
        };
        let bits = |v: &[Bf16]| from_bf16(v).iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let (a, b) = (run(false), run(true));
        assert_eq!(bits(&a.0), bits(&b.0), "rotated q/k rows");
        assert_eq!(bits(&a.1), bits(&b.1), "k cache");
        assert_eq!(bits(&a.2), bits(&b.2), "v cache");
        assert_ne!(bits(&a.1), bits(&cache), "nothing was written");
    }
}

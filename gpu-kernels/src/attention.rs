//! Attention over the paged KV cache the runtime uses.
//!
//! KV layout, per layer: K cache `[num_blocks, block_size, kv_heads, head_dim]` bf16 and
//! V cache likewise; a sequence's token `t` lives in block `block_table[t / block_size]`
//! at slot `t % block_size` (block tables are `[num_seqs, max_blocks]` u32, row stride
//! `max_blocks`). `head_dim` must be a multiple of 8 and at most 256.
//! Queries are `[tokens, q_heads, head_dim]` with token stride `q_stride` (so q can be
//! a slice of a fused qkv projection); outputs `[tokens, q_heads, head_dim]`. GQA: q head
//! `h` reads kv head `h / (q_heads / kv_heads)`.
//!
//! Design (flash-decoding, written for clarity over the last few percent): one block
//! per (kv head, group of up to 4 q heads sharing it), so K/V are read once per 4 heads
//! of a GQA group (4 rather than 8 keeps registers low enough for 3 blocks per SM).
//! In a warp, `D/8` lanes (rounded up to a power of two) hold one token's 16-byte
//! chunks of K and V, so a warp works on `32 / lanes` tokens per slot and `TU` (4)
//! slots per iteration: all the slots' block-table lookups and K and V loads are issued
//! before any math, to keep many bytes in flight. q for the group is in registers,
//! pre-scaled by `scale * log2(e)`, scores are reduced with shuffles inside each lane
//! group, and each lane group keeps an online-softmax state (max, sum, 8 output dims
//! per head), updated once per iteration for its `TU` tokens and merged across groups
//! with shuffles at the end (base-2 exponentials throughout).
//! - `attn_decode_bf16`: one query per sequence. grid = (kv_heads * ceil(G / 4),
//!   num_seqs, splits), block 128: split `z` covers tokens `[z * split_tokens, ...)`
//!   (split-K), its 4 warps interleave over them and merge through shared memory. With
//!   one split the output is written directly; otherwise unnormalised partials go to
//!   `o_part[num_seqs, q_heads, splits, head_dim]` f32 and (max, sum) to
//!   `ml_part[num_seqs, q_heads, splits, 2]`, and `attn_decode_combine_bf16`
//!   (grid = (q_heads, num_seqs), block 128) merges them.
//! - `attn_decode_pipelined_bf16`: the same kernel (parameters, launch shape, outputs,
//!   split-K partials for the combine) with the K/V stream software-pipelined, since the
//!   loop above has nothing in flight while it computes and waits for two dependent
//!   latencies (block table, then K/V) per iteration. Each warp owns a 3-stage ring
//!   in shared memory (a stage = its `TU` slots' K and V chunks, 4 KiB, lane-major so a
//!   lane reads back only what it copied: no warp barrier) and issues the `cp.async`
//!   copies of stage `k + 2` before the math of stage `k`; the block-table entries of
//!   stage `k + 3` are loaded one iteration ahead, and when a stage cannot straddle a
//!   KV block (block size and split start multiples of the stage) one entry serves the
//!   whole stage. Masked slots are zero-filled without reading memory. 48 KiB static
//!   shared memory (4 warps x 3 x 4 KiB), reused for the cross-warp merge after a
//!   barrier. The math is `warp_attend`'s, except that for full 4-head groups the 16
//!   score reductions of a stage run interleaved (one shuffle latency per butterfly
//!   step, not 16 dependent chains one after another).
//! - `attn_prefill_bf16`: causal attention for a chunk of new tokens per sequence (varlen:
//!   sequence `s` has `q_lens[s]` queries starting at row `q_starts[s]`, the last of them
//!   at position `ctx_lens[s] - 1`; their K/V must already be in the cache, see
//!   `kv_cache_write_bf16`). grid = (kv_heads * ceil(G / 4), ceil(max_q_len / 4),
//!   num_seqs), block 128, one query per warp.
//! - `attn_prefill_mma_bf16`: the same prefill (arguments, paged layout, GQA mapping,
//!   causal varlen semantics, scale, bf16 output) on tensor cores, FlashAttention-2
//!   style; 15.3x `attn_prefill_bf16` on an H200 at 4 x 2048 causal tokens, the engine's
//!   prefill attention where head_dim allows. head_dim 64 or 128 only (a const-generic
//!   body per size; any other head_dim traps: use `attn_prefill_bf16`), block 128
//!   (`FA_THREADS`), K/V cache
//!   16-byte aligned. One block per (q head, 64-query tile, sequence): grid = (q_heads,
//!   ceil(max_q_len / 64), num_seqs), tiles with the most keys launched first; the q
//!   heads of a GQA group are neighbours in grid.x, so their K/V reads meet in L2. Each
//!   of the 4 warps owns 16 query rows. Q (64 x D) is copied to shared memory once
//!   (`cp.async` when q and q_stride are 16-byte aligned, else plain loads) and kept
//!   in registers as `ldmatrix` A fragments; K and V tiles of 32 keys are gathered from
//!   the paged cache (one block-table lookup per row, any block_size) by `cp.async`
//!   into XOR-swizzled tiles (chunk ^ row % 8), keys past the last query zero-filled.
//!   Per K/V tile (FlashAttention-2's two-buffer pipeline): issue V(j); S = Q·Kᵀ with
//!   `mma.sync.m16n8k16` (K fragments by `ldmatrix`); scale to base 2, causal mask only
//!   on tiles reaching past the block's first query; online softmax in f32 (row max
//!   over the 4 lanes of a row by shuffles, running max and per-lane partial sums,
//!   O rescaled); P packed to bf16 A fragments in registers (the S accumulator layout
//!   is the A layout); barrier; issue K(j + 1); O += P·V (V fragments by
//!   `ldmatrix.trans` from the row-major tile); barrier. A warp whose rows all precede
//!   a tile (or lie past the last query) skips its math; tiles past the block's last
//!   query are not visited. Static shared memory 32 KiB (Q 64, K 32, V 32 rows x 128
//!   bf16). 32-key tiles, not 64: with 64, sm_90's ptxas spills at head_dim 128 (the
//!   causal mask is a branch-free compare against a per-row limit for the same reason).
//!   Registers (ptx-report): 210 (sm_80) / 246 (sm_90), no spills.
//!   O / l rounded to bf16 at the end; rows past the sequence's queries not stored.
//! - `kv_cache_write_bf16`: scatter new K/V rows `[tokens, kv_heads, head_dim]` into
//!   their cache slots (`slot = block * block_size + offset`, `u32::MAX` = skip).
//!   grid.x = tokens, block 128.
use crate::prims::*;

/// The signature `attn_prefill_bf16` and `attn_prefill_mma_bf16` share (their host
/// builds, for tests that run either on the emulator).
#[cfg(not(target_arch = "nvptx64"))]
pub type PrefillKernel = unsafe fn(
    *mut Bf16,
    *const Bf16,
    *const Bf16,
    *const Bf16,
    *const u32,
    *const u32,
    *const u32,
    *const u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    f32,
);

/// Block `block_idx_x` copies token row t's K and V (`[kv_heads * head_dim]`, rows
/// `k_stride` / `v_stride` apart) into its paged-cache slot (`slots[t]`; `U32_MAX`:
/// none, e.g. a padding row).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn kv_write_row(
    k_cache: *mut Bf16,
    v_cache: *mut Bf16,
    k: *const Bf16,
    v: *const Bf16,
    slots: *const u32,
    kv_heads: u32,
    head_dim: u32,
    k_stride: u32,
    v_stride: u32,
) {
    let t = block_idx_x();
    let slot = *slots.add(t as usize);
    if slot != U32_MAX {
        let n = kv_heads * head_dim;
        let (kd, vd) = (
            k_cache.add(slot as usize * n as usize),
            v_cache.add(slot as usize * n as usize),
        );
        let (ks, vs) = (
            k.add((t * k_stride) as usize),
            v.add((t * v_stride) as usize),
        );
        let mut i = thread_idx();
        while i < n {
            *kd.add(i as usize) = *ks.add(i as usize);
            *vd.add(i as usize) = *vs.add(i as usize);
            i += block_dim();
        }
    }
}

const MAXG: u32 = 4;
const MAXD: u32 = 256;
const NEG_INF: f32 = -1.0 / 0.0;

struct Geo {
    kc: *const u16,
    vc: *const u16,
    table: *const u32,
    kvh: u32,
    kvh_idx: u32,
    d: u32,
    bs: u32,
    g: u32, // q heads in this block's group (<= MAXG)
    lpt: u32,
    tpw: u32,
    sub: u32,
    tg: u32,
    active: bool,
}

struct State {
    m: [f32; 4],
    l: [f32; 4],
    acc: [[f32; 8]; 4],
}

#[inline(always)]
fn next_pow2(x: u32) -> u32 {
    let mut p = 1;
    while p < x {
        p <<= 1;
    }
    p
}

#[inline(always)]
unsafe fn geo(
    kc: *const Bf16,
    vc: *const Bf16,
    table: *const u32,
    kvh: u32,
    q_heads: u32,
    d: u32,
    bs: u32,
) -> (Geo, u32) {
    if d % 8 != 0 || d > MAXD || d == 0 {
        trap();
    }
    let group = q_heads / kvh;
    let gchunks = div_ceil(group, MAXG);
    let kvh_idx = block_idx_x() / gchunks;
    let h0_in_group = (block_idx_x() - kvh_idx * gchunks) * MAXG;
    let g = umin(MAXG, group - h0_in_group);
    let lpt = next_pow2(d / 8);
    let lane = lane_id();
    let sub = lane & (lpt - 1);
    let h0 = kvh_idx * group + h0_in_group;
    let geo = Geo {
        kc: kc as *const u16,
        vc: vc as *const u16,
        table,
        kvh,
        kvh_idx,
        d,
        bs,
        g,
        lpt,
        tpw: 32 / lpt,
        sub,
        tg: lane / lpt,
        active: sub < d / 8,
    };
    (geo, h0)
}

/// The group's queries of one token, scaled, as this lane's 8-dim chunk.
#[inline(always)]
unsafe fn load_q(geo: &Geo, q: *const Bf16, h0: u32, scale: f32) -> [[f32; 8]; 4] {
    let mut qr = [[0.0f32; 8]; 4];
    if geo.active {
        let s = scale * LOG2E;
        unroll!(g in 0..4 => {
            if (g as u32) < geo.g {
                let p = q.add(((h0 + g as u32) * geo.d + geo.sub * 8) as usize);
                unroll!(e in 0..8 => {
                    qr[g][e] = (*p.add(e)).to_f32() * s;
                });
            }
        });
    }
    qr
}

/// Element offset of this lane's 16-byte chunk of token `t`'s K (or V) row.
#[inline(always)]
unsafe fn kv_off(geo: &Geo, t: u32) -> usize {
    let blk = *geo.table.add((t / geo.bs) as usize);
    chunk_off(geo, blk, t % geo.bs)
}

/// Element offset of this lane's chunk of the token at slot `pos` of KV block `blk`.
#[inline(always)]
fn chunk_off(geo: &Geo, blk: u32, pos: u32) -> usize {
    let slot = blk * geo.bs + pos;
    ((slot as usize * geo.kvh as usize + geo.kvh_idx as usize) * geo.d as usize)
        + (geo.sub * 8) as usize
}

#[inline(always)]
fn unpack8(v: [u32; 4]) -> [f32; 8] {
    let mut r = [0.0f32; 8];
    unroll!(i in 0..4 => {
        let (a, b) = bf16x2_to_f32(v[i]);
        r[2 * i] = a;
        r[2 * i + 1] = b;
    });
    r
}

/// Token slots per lane group per iteration of `warp_attend`: K and V of all of them
/// are loaded (`2 * TU` 16-byte loads per lane) before any of the math.
const TU: u32 = 4;

/// Online softmax over tokens `first + u * tpw + tg + k * step` (u < TU) below `end`
/// (all lanes of the warp call it with the same `first`, `end`, `step`; `step` is a
/// multiple of `TU * tpw`).
#[inline(always)]
unsafe fn warp_attend(
    geo: &Geo,
    qr: &[[f32; 8]; 4],
    st: &mut State,
    first: u32,
    end: u32,
    step: u32,
) {
    let mut base = first;
    while base < end {
        // issue every load first: TU tokens' K and V chunks
        let mut kraw = [[0u32; 4]; 4];
        let mut vraw = [[0u32; 4]; 4];
        // (branch-free: the table index is clamped to a valid token, the loads predicated)
        unroll!(u in 0..4 => {
            let t = base + u as u32 * geo.tpw + geo.tg;
            let ok = t < end && geo.active;
            let off = kv_off(geo, umin(t, end - 1));
            kraw[u] = ld_global_nc_v4_if(geo.kc.add(off) as *const u32, ok);
            vraw[u] = ld_global_nc_v4_if(geo.vc.add(off) as *const u32, ok);
        });
        let s = slot_scores(geo, qr, &kraw, base, end);
        softmax_step(geo, st, &s, &vraw, base, end);
        base += step;
    }
}

/// Stages of the per-warp `cp.async` ring of `attn_decode_pipelined_bf16`: `STAGES - 1`
/// are in flight while one is consumed (3: 48 KiB, the static shared-memory limit).
const STAGES: u32 = 3;
/// One warp's stage: `TU` slots x (K, V) x 32 lanes x 16 bytes, lane-major so each lane
/// reads back exactly the chunks it copied (no cross-lane hand-off, no warp barrier).
const STAGE_BYTES: u32 = TU * 2 * WARP * 16;
/// Shared memory of the pipelined kernel: the rings of 4 warps (block 128); the
/// cross-warp merge reuses the first `(4 * MAXG * MAXD + 4 * MAXG * 2) * 4` bytes.
const PIPE_SMEM: u32 = 4 * STAGES * STAGE_BYTES;

/// This lane's chunk of slot `u`'s K (`kv` 0) or V (`kv` 1) in stage buffer `sb`.
#[inline(always)]
unsafe fn stage_chunk(sb: *mut u8, u: u32, kv: u32) -> *mut u8 {
    sb.add((((u * 2 + kv) * WARP + lane_id()) * 16) as usize)
}

/// Block-table entries of the `TU` slots of the stage at `base` (token index clamped to
/// `end - 1`). `uniform`: the whole stage lies in one KV block, so one entry is read.
#[inline(always)]
unsafe fn stage_blocks(geo: &Geo, base: u32, end: u32, uniform: bool) -> [u32; 4] {
    let mut b = [0u32; 4];
    if uniform {
        let e = *geo.table.add((umin(base, end - 1) / geo.bs) as usize);
        b = [e; 4];
    } else {
        unroll!(u in 0..4 => {
            let t = umin(base + u as u32 * geo.tpw + geo.tg, end - 1);
            b[u] = *geo.table.add((t / geo.bs) as usize);
        });
    }
    b
}

/// Issue the `cp.async` copies of the stage at `base` (block entries `blk` from
/// [`stage_blocks`]) into `sb`; slots at or past `end` (and idle lanes) are zero-filled
/// without reading memory, so masked V is 0, never stale NaN.
#[inline(always)]
unsafe fn issue_stage(geo: &Geo, sb: *mut u8, blk: &[u32; 4], base: u32, end: u32, uniform: bool) {
    let b0 = (umin(base, end - 1) / geo.bs) * geo.bs; // first token of the block (uniform)
    unroll!(u in 0..4 => {
        let t = base + u as u32 * geo.tpw + geo.tg;
        let tc = umin(t, end - 1);
        let pos = if uniform { tc - b0 } else { tc % geo.bs };
        let off = chunk_off(geo, blk[u], pos);
        let ok = t < end && geo.active;
        // a zero-byte copy still names the cache base, never an address past a row
        let (ks, vs) = if ok { (geo.kc.add(off), geo.vc.add(off)) } else { (geo.kc, geo.vc) };
        let n = if ok { 16 } else { 0 };
        cp_async_16(stage_chunk(sb, u as u32, 0), ks as *const u8, n);
        cp_async_16(stage_chunk(sb, u as u32, 1), vs as *const u8, n);
    });
}

/// [`warp_attend`] as a software pipeline: each warp streams its stages through a
/// `STAGES`-deep `cp.async` ring in `ring` (`STAGES * STAGE_BYTES`, its own), issuing
/// the copies of stage `k + STAGES - 1` before the math of stage `k`, with the
/// block-table entries of the stage after that loaded one iteration before they are
/// needed. Same token order and math as `warp_attend` (`slot_scores_batched` for full
/// groups, the same sums in an interleaved order of shuffles).
#[inline(always)]
unsafe fn warp_attend_pipelined(
    geo: &Geo,
    qr: &[[f32; 8]; 4],
    st: &mut State,
    first: u32,
    end: u32,
    step: u32,
    ring: *mut u8,
) {
    let chunk = TU * geo.tpw;
    // stages never straddle a KV block when both the block size and the start are
    // multiples of the stage (`step` is too): then one table entry per stage
    let uniform = geo.bs % chunk == 0 && first % chunk == 0;
    // prologue: every table entry it needs requested first (one latency, not one per
    // stage), then stages 0..STAGES-1 in flight; the next stage's entries are pending
    let lead = (STAGES - 1) * step;
    // (unrolled with constant indices so `blks` stays in registers; STAGES <= 4)
    let mut blks = [[0u32; 4]; 4];
    unroll!(k in 0..4 => {
        let b = first + k as u32 * step;
        if (k as u32) < STAGES && b < end {
            blks[k] = stage_blocks(geo, b, end, uniform);
        }
    });
    unroll!(k in 0..4 => {
        let b = first + k as u32 * step;
        if (k as u32) < STAGES - 1 {
            if b < end {
                let sb = ring.add(k * STAGE_BYTES as usize);
                issue_stage(geo, sb, &blks[k], b, end, uniform);
            }
            cp_async_commit();
        }
    });
    let mut next = blks[STAGES as usize - 1];
    let mut base = first;
    let mut slot = 0; // ring index of `base`'s stage
    while base < end {
        let ahead = base + lead;
        let ahead_slot = if slot == 0 { STAGES - 1 } else { slot - 1 };
        if ahead < end {
            let sb = ring.add((ahead_slot * STAGE_BYTES) as usize);
            issue_stage(geo, sb, &next, ahead, end, uniform);
            if ahead + step < end {
                next = stage_blocks(geo, ahead + step, end, uniform);
            }
        }
        cp_async_commit(); // possibly empty: keeps one group per stage
        cp_async_wait::<{ STAGES - 1 }>(); // this stage has landed
        let sb = ring.add((slot * STAGE_BYTES) as usize);
        let mut kraw = [[0u32; 4]; 4];
        unroll!(u in 0..4 => {
            kraw[u] = ld_shared_v4(stage_chunk(sb, u as u32, 0));
        });
        let s = if geo.g == MAXG {
            slot_scores_batched(geo, qr, &kraw, base, end)
        } else {
            slot_scores(geo, qr, &kraw, base, end)
        };
        let mut vraw = [[0u32; 4]; 4];
        unroll!(u in 0..4 => {
            vraw[u] = ld_shared_v4(stage_chunk(sb, u as u32, 1));
        });
        softmax_step(geo, st, &s, &vraw, base, end);
        base += step;
        slot = if slot == STAGES - 1 { 0 } else { slot + 1 };
    }
    cp_async_wait::<0>(); // nothing in flight when the block reuses the rings
}

/// Scores of the `TU` token slots at `base` for the group's heads from this lane's raw K
/// chunks (all lanes shuffle; slots at or past `end` are -inf).
#[inline(always)]
fn slot_scores(
    geo: &Geo,
    qr: &[[f32; 8]; 4],
    kraw: &[[u32; 4]; 4],
    base: u32,
    end: u32,
) -> [[f32; 4]; 4] {
    let mut s = [[NEG_INF; 4]; 4];
    unroll!(u in 0..4 => {
        let kr = unpack8(kraw[u]);
        let valid = base + u as u32 * geo.tpw + geo.tg < end;
        unroll!(g in 0..4 => {
            if (g as u32) < geo.g {
                let mut d = 0.0f32;
                unroll!(e in 0..8 => {
                    d = fma(qr[g][e], kr[e], d);
                });
                let r = group_sum(d, geo.lpt);
                if valid {
                    s[u][g] = r;
                }
            }
        });
    });
    s
}

/// [`slot_scores`] for a full group (`geo.g == MAXG`) with the `TU * MAXG` lane-group
/// reductions interleaved: each butterfly step runs on all 16 partial dot products
/// before the next, so the shuffle latency is paid once per step instead of once per
/// (slot, head) chain. Same summation order, so the same results.
#[inline(always)]
fn slot_scores_batched(
    geo: &Geo,
    qr: &[[f32; 8]; 4],
    kraw: &[[u32; 4]; 4],
    base: u32,
    end: u32,
) -> [[f32; 4]; 4] {
    let mut s = [[0.0f32; 4]; 4];
    unroll!(u in 0..4 => {
        let kr = unpack8(kraw[u]);
        unroll!(g in 0..4 => {
            let mut d = 0.0f32;
            unroll!(e in 0..8 => {
                d = fma(qr[g][e], kr[e], d);
            });
            s[u][g] = d;
        });
    });
    let mut m = geo.lpt >> 1;
    while m > 0 {
        unroll!(u in 0..4 => {
            unroll!(g in 0..4 => {
                s[u][g] += shfl_xor_f32(s[u][g], m);
            });
        });
        m >>= 1;
    }
    unroll!(u in 0..4 => {
        if base + u as u32 * geo.tpw + geo.tg >= end {
            s[u] = [NEG_INF; 4];
        }
    });
    s
}

/// One online-softmax step for the `TU` token slots at `base` given their scores `s`
/// and this lane's raw V chunks (slot 0 valid => the max is finite).
#[inline(always)]
fn softmax_step(
    geo: &Geo,
    st: &mut State,
    s: &[[f32; 4]; 4],
    vraw: &[[u32; 4]; 4],
    base: u32,
    end: u32,
) {
    if base + geo.tg < end {
        let mut vr = [[0.0f32; 8]; 4];
        unroll!(u in 0..4 => {
            vr[u] = unpack8(vraw[u]);
        });
        unroll!(g in 0..4 => {
            if (g as u32) < geo.g {
                let mn = fmax(fmax(st.m[g], fmax(s[0][g], s[1][g])), fmax(s[2][g], s[3][g]));
                let alpha = exp2(st.m[g] - mn);
                let mut p = [0.0f32; 4];
                unroll!(u in 0..4 => {
                    p[u] = exp2(s[u][g] - mn);
                });
                st.m[g] = mn;
                st.l[g] = fma(st.l[g], alpha, (p[0] + p[1]) + (p[2] + p[3]));
                unroll!(e in 0..8 => {
                    let mut a = st.acc[g][e] * alpha;
                    unroll!(u in 0..4 => {
                        a = fma(p[u], vr[u][e], a);
                    });
                    st.acc[g][e] = a;
                });
            }
        });
    }
}

#[inline(always)]
fn merge_scale(m: f32, mn: f32) -> f32 {
    if m == NEG_INF {
        0.0
    } else {
        exp2(m - mn)
    }
}

/// Merge the lane groups' states (lanes with the same `sub`); all lanes end up with it.
#[inline(always)]
fn warp_merge(geo: &Geo, st: &mut State) {
    let mut off = geo.lpt;
    while off < 32 {
        unroll!(g in 0..4 => {
            if (g as u32) < geo.g {
                let mo = shfl_xor_f32(st.m[g], off);
                let lo = shfl_xor_f32(st.l[g], off);
                let mn = fmax(st.m[g], mo);
                let a = merge_scale(st.m[g], mn);
                let b = merge_scale(mo, mn);
                st.m[g] = mn;
                st.l[g] = st.l[g] * a + lo * b;
                unroll!(e in 0..8 => {
                    let ao = shfl_xor_f32(st.acc[g][e], off);
                    st.acc[g][e] = st.acc[g][e] * a + ao * b;
                });
            }
        });
        off <<= 1;
    }
}

#[inline(always)]
fn new_state() -> State {
    State {
        m: [NEG_INF; 4],
        l: [0.0; 4],
        acc: [[0.0; 8]; 4],
    }
}

#[inline(always)]
fn normalise(acc: f32, l: f32) -> f32 {
    if l > 0.0 {
        acc / l
    } else {
        0.0
    }
}

/// The decode kernels' body; `PIPE` selects `warp_attend_pipelined` (then `smem` is
/// `PIPE_SMEM` bytes holding the warps' rings, reused for the cross-warp merge).
#[inline(always)]
unsafe fn attn_decode<const PIPE: bool>(
    out: *mut Bf16,
    o_part: *mut f32,
    ml_part: *mut f32,
    q: *const Bf16,
    kc: *const Bf16,
    vc: *const Bf16,
    tables: *const u32,
    ctx_lens: *const u32,
    q_heads: u32,
    kvh: u32,
    d: u32,
    bs: u32,
    max_blocks: u32,
    q_stride: u32,
    split_tokens: u32,
    scale: f32,
    smem: *mut f32,
) {
    let seq = block_idx_y();
    let split = block_idx_z();
    let splits = grid_dim_z();
    let ctx = *ctx_lens.add(seq as usize);
    let t0 = split * split_tokens;
    if t0 >= ctx && split > 0 {
        return; // empty split: the combine kernel does not read it (whole block leaves)
    }
    let t1 = umin(ctx, t0 + split_tokens);
    let (geo, h0) = geo(
        kc,
        vc,
        tables.add((seq * max_blocks) as usize),
        kvh,
        q_heads,
        d,
        bs,
    );
    let qr = load_q(&geo, q.add((seq * q_stride) as usize), h0, scale);
    let mut st = new_state();
    let nw = block_dim() / WARP;
    let w = warp_id();
    let (first, step) = (t0 + w * TU * geo.tpw, nw * TU * geo.tpw);
    if PIPE {
        if nw > 4 {
            trap(); // the rings are sized for 4 warps
        }
        let ring = (smem as *mut u8).add((w * STAGES * STAGE_BYTES) as usize);
        warp_attend_pipelined(&geo, &qr, &mut st, first, t1, step, ring);
    } else {
        warp_attend(&geo, &qr, &mut st, first, t1, step);
    }
    warp_merge(&geo, &mut st);
    if PIPE {
        sync_threads(); // the merge below overwrites other warps' rings
    }
    // cross-warp merge through shared memory: [warp][g][D] accumulators, then [warp][g][2]
    let ml = smem.add((4 * MAXG * MAXD) as usize);
    if geo.tg == 0 {
        unroll!(g in 0..4 => {
            if (g as u32) < geo.g {
                let row = (w * MAXG + g as u32) as usize;
                if geo.active {
                    unroll!(e in 0..8 => {
                        *smem.add(row * MAXD as usize + (geo.sub * 8) as usize + e) = st.acc[g][e];
                    });
                }
                if geo.sub == 0 {
                    *ml.add(row * 2) = st.m[g];
                    *ml.add(row * 2 + 1) = st.l[g];
                }
            }
        });
    }
    sync_threads();
    let mut i = thread_idx();
    while i < geo.g * d {
        let g = i / d;
        let e = i - g * d;
        let mut mx = NEG_INF;
        let mut ww = 0;
        while ww < nw {
            mx = fmax(mx, *ml.add(((ww * MAXG + g) * 2) as usize));
            ww += 1;
        }
        let (mut l, mut o) = (0.0f32, 0.0f32);
        let mut ww = 0;
        while ww < nw {
            let row = (ww * MAXG + g) as usize;
            let a = merge_scale(*ml.add(row * 2), mx);
            l += *ml.add(row * 2 + 1) * a;
            o += *smem.add(row * MAXD as usize + e as usize) * a;
            ww += 1;
        }
        let h = h0 + g;
        if splits == 1 {
            *out.add(((seq * q_heads + h) * d + e) as usize) = Bf16::from_f32(normalise(o, l));
        } else {
            let pi = ((seq * q_heads + h) * splits + split) as usize;
            *o_part.add(pi * d as usize + e as usize) = o;
            if e == 0 {
                *ml_part.add(pi * 2) = mx;
                *ml_part.add(pi * 2 + 1) = l;
            }
        }
        i += block_dim();
    }
}

#[inline(always)]
unsafe fn attn_decode_combine(
    out: *mut Bf16,
    o_part: *const f32,
    ml_part: *const f32,
    ctx_lens: *const u32,
    q_heads: u32,
    d: u32,
    splits: u32,
    split_tokens: u32,
) {
    let h = block_idx_x();
    let seq = block_idx_y();
    let n = umax(
        1,
        umin(splits, div_ceil(*ctx_lens.add(seq as usize), split_tokens)),
    );
    let base = ((seq * q_heads + h) * splits) as usize;
    let mut mx = NEG_INF;
    let mut s = 0;
    while s < n {
        mx = fmax(mx, *ml_part.add((base + s as usize) * 2));
        s += 1;
    }
    let mut e = thread_idx();
    while e < d {
        let (mut l, mut o) = (0.0f32, 0.0f32);
        let mut s = 0;
        while s < n {
            let pi = base + s as usize;
            let a = merge_scale(*ml_part.add(pi * 2), mx);
            l += *ml_part.add(pi * 2 + 1) * a;
            o += *o_part.add(pi * d as usize + e as usize) * a;
            s += 1;
        }
        *out.add(((seq * q_heads + h) * d + e) as usize) = Bf16::from_f32(normalise(o, l));
        e += block_dim();
    }
}

#[inline(always)]
unsafe fn attn_prefill(
    out: *mut Bf16,
    q: *const Bf16,
    kc: *const Bf16,
    vc: *const Bf16,
    tables: *const u32,
    ctx_lens: *const u32,
    q_starts: *const u32,
    q_lens: *const u32,
    q_heads: u32,
    kvh: u32,
    d: u32,
    bs: u32,
    max_blocks: u32,
    q_stride: u32,
    scale: f32,
) {
    let seq = block_idx_z();
    let qi = block_idx_y() * (block_dim() / WARP) + warp_id();
    let qlen = *q_lens.add(seq as usize);
    if qi >= qlen {
        return; // whole warp; no block barriers in this kernel
    }
    let ctx = *ctx_lens.add(seq as usize);
    let pos = ctx - qlen + qi;
    let row = *q_starts.add(seq as usize) + qi;
    let (geo, h0) = geo(
        kc,
        vc,
        tables.add((seq * max_blocks) as usize),
        kvh,
        q_heads,
        d,
        bs,
    );
    let qr = load_q(&geo, q.add((row * q_stride) as usize), h0, scale);
    let mut st = new_state();
    warp_attend(&geo, &qr, &mut st, 0, pos + 1, TU * geo.tpw);
    warp_merge(&geo, &mut st);
    if geo.tg == 0 && geo.active {
        unroll!(g in 0..4 => {
            if (g as u32) < geo.g {
                let o = out.add(((row * q_heads + h0 + g as u32) * d + geo.sub * 8) as usize);
                unroll!(e in 0..8 => {
                    *o.add(e) = Bf16::from_f32(normalise(st.acc[g][e], st.l[g]));
                });
            }
        });
    }
}

// ---------------------------------------------------------------- tensor-core prefill

/// Query rows per block of `attn_prefill_mma_bf16` (16 per warp).
pub const FA_BM: u32 = 64;
/// Keys per K/V tile of `attn_prefill_mma_bf16` (32: with 64, sm_90's ptxas spills at
/// head_dim 128 — 255 registers — while 32 gives 210 (sm_80) / 246 (sm_90), no spills).
/// The code takes 32 or 64.
pub const FA_BN: u32 = 32;
/// Block size of `attn_prefill_mma_bf16` (4 warps); other sizes trap.
pub const FA_THREADS: u32 = 128;
/// Largest head_dim of `attn_prefill_mma_bf16` (it takes 64 and 128).
const FA_MAXD: u32 = 128;
/// Its static shared memory: the Q tile (64 rows), K and V tiles (32 rows each) of up
/// to 128 bf16 per row (32 KiB).
const FA_SMEM: u32 = (FA_BM + 2 * FA_BN) * FA_MAXD * 2;

/// Byte offset of 16-byte chunk `c` of row `r` in a tile of `D`-element rows (`D` 64
/// or 128: 128- or 256-byte rows, all starting in bank 0): the chunk is XORed with
/// `r % 8`, so the 8 rows one `ldmatrix` matrix reads (same logical chunk, consecutive
/// rows) and the rows a warp's `cp.async` copies fill hit 8 different bank groups.
#[inline(always)]
fn fa_swz<const D: u32>(r: u32, c: u32) -> u32 {
    r * (D * 2) + ((c ^ (r & 7)) << 4)
}

/// Issue the `cp.async` copies of K (or V) tile rows `t0 .. t0 + FA_BN` of kv head
/// `kvh_idx` from the paged cache `src` into the swizzled tile `dst`; keys at or past
/// `kend` are zero-filled without reading memory (so masked V is 0, never stale NaN).
#[inline(always)]
unsafe fn fa_load_kv<const D: u32>(
    dst: *mut u8,
    src: *const u16,
    table: *const u32,
    kvh: u32,
    kvh_idx: u32,
    bs: u32,
    t0: u32,
    kend: u32,
) {
    let cpr = D / 8; // 16-byte chunks per row
    let tid = thread_idx();
    unroll!(i in 0..8 => {
        let id = tid + i as u32 * FA_THREADS;
        if id < FA_BN * cpr {
            let (r, c) = (id / cpr, id % cpr);
            let t = t0 + r;
            let ok = t < kend;
            let p = if ok {
                let blk = *table.add((t / bs) as usize);
                let slot = (blk * bs + t % bs) as usize;
                src.add((slot * kvh as usize + kvh_idx as usize) * D as usize + (c * 8) as usize)
            } else {
                src
            };
            cp_async_16(dst.add(fa_swz::<D>(r, c) as usize), p as *const u8, if ok { 16 } else { 0 });
        }
    });
}

/// Copy query rows `row0 .. row0 + nrows` (head `h`) into the swizzled Q tile `dst`,
/// rows past `nrows` zero: `cp.async` when `vec` (q and q_stride 16-byte aligned), else
/// plain 2-byte loads and shared stores (visible after the caller's barrier).
#[inline(always)]
unsafe fn fa_load_q<const D: u32>(
    dst: *mut u8,
    q: *const u16,
    q_stride: u32,
    row0: u32,
    nrows: u32,
    h: u32,
    vec: bool,
) {
    let cpr = D / 8;
    let tid = thread_idx();
    unroll!(i in 0..8 => {
        let id = tid + i as u32 * FA_THREADS;
        if id < FA_BM * cpr {
            let (r, c) = (id / cpr, id % cpr);
            let ok = r < nrows;
            let p = q.add((row0 + r) as usize * q_stride as usize + (h * D + c * 8) as usize);
            let d = dst.add(fa_swz::<D>(r, c) as usize);
            if vec {
                let s = if ok { p } else { q };
                cp_async_16(d, s as *const u8, if ok { 16 } else { 0 });
            } else {
                let d = d as *mut u16;
                unroll!(e in 0..8 => {
                    *d.add(e) = if ok { *p.add(e) } else { 0 };
                });
            }
        }
    });
}

/// The body of `attn_prefill_mma_bf16` for head dim `D` (64 or 128); see the module
/// comment for the design. `smem` holds the Q, K and V tiles (`3 * FA_BM * D * 2` bytes).
#[inline(always)]
unsafe fn attn_prefill_mma<const D: u32>(
    out: *mut Bf16,
    q: *const Bf16,
    kc: *const Bf16,
    vc: *const Bf16,
    tables: *const u32,
    ctx_lens: *const u32,
    q_starts: *const u32,
    q_lens: *const u32,
    q_heads: u32,
    kvh: u32,
    bs: u32,
    max_blocks: u32,
    q_stride: u32,
    scale: f32,
    smem: *mut u8,
) {
    let seq = block_idx_z();
    let qlen = *q_lens.add(seq as usize);
    // the query tiles with the most keys (the last ones) are launched first
    let qt = grid_dim_y() - 1 - block_idx_y();
    let q0 = qt * FA_BM;
    if q0 >= qlen {
        return; // whole block, before any barrier
    }
    let h = block_idx_x();
    let kvh_idx = h / (q_heads / kvh);
    let ctx = *ctx_lens.add(seq as usize);
    let first = ctx - qlen + q0; // position of the block's first query
    let nq = umin(FA_BM, qlen - q0); // valid query rows in the tile
    let kend = first + nq; // keys 0 .. kend: the last query's position + 1
    let row0 = *q_starts.add(seq as usize) + q0;
    let table = tables.add((seq * max_blocks) as usize);
    let (kc, vc) = (kc as *const u16, vc as *const u16);
    let (qbytes, kvbytes) = ((FA_BM * D * 2) as usize, (FA_BN * D * 2) as usize);
    let (sq, sk, sv) = (smem, smem.add(qbytes), smem.add(qbytes + kvbytes));

    // prologue: Q tile and K tile 0 in flight together
    let vec_q = (q as usize) % 16 == 0 && q_stride % 8 == 0;
    fa_load_q::<D>(sq, q as *const u16, q_stride, row0, nq, h, vec_q);
    fa_load_kv::<D>(sk, kc, table, kvh, kvh_idx, bs, 0, kend);
    cp_async_commit();
    cp_async_wait::<0>();
    sync_threads();

    let lane = lane_id();
    let wr = warp_id() * 16; // the warp's first row in the tile
    let (j, r) = (lane >> 3, lane & 7); // ldmatrix roles: matrix j, row r
    let t = lane & 3; // accumulator column pair 2t, 2t + 1 of each n8 tile
                      // accumulator rows g, g + 8
    let g = lane >> 2;
    // Q fragments of the warp's 16 rows, D / 16 k16 steps, for the whole kernel
    let mut qf = [[0u32; 4]; 8];
    unroll!(kk in 0..8 => {
        if (kk as u32) < D / 16 {
            let row = wr + (j & 1) * 8 + r;
            qf[kk] = ldmatrix_x4(sq.add(fa_swz::<D>(row, kk as u32 * 2 + (j >> 1)) as usize));
        }
    });
    // positions of this lane's rows (rows past the valid queries take the last valid
    // position: computed, never stored) and the last one among the warp's rows
    let pos = [
        first + umin(wr + g, nq - 1),
        first + umin(wr + g + 8, nq - 1),
    ];
    let warp_rows = wr < nq;
    let warp_last = first + umin(wr + 15, nq - 1);
    let sl2 = scale * LOG2E;
    let mut acc = [[0.0f32; 4]; 16]; // O: D / 8 n8 tiles of the warp's 16 rows
    let mut m = [NEG_INF; 2]; // running max (base 2, scaled) of rows g, g + 8
    let mut l = [0.0f32; 2]; // this lane's part of the running sums
    let nkt = div_ceil(kend, FA_BN);
    let mut kt = 0;
    while kt < nkt {
        let k0 = kt * FA_BN;
        fa_load_kv::<D>(sv, vc, table, kvh, kvh_idx, bs, k0, kend);
        // V(kt) lands while S is computed
        cp_async_commit();
        // a warp whose rows all end before the tile skips its math (causal tiles past
        // the diagonal; rows past the last query)
        let live = warp_rows && k0 <= warp_last;
        let mut pf = [[0u32; 4]; 4]; // P as A fragments, one per k16 step of the tile
        if live {
            // S = Q Kᵀ (16 x 64 per warp)
            let mut s = [[0.0f32; 4]; 8];
            unroll!(kk in 0..8 => {
                if (kk as u32) < D / 16 {
                    let a = qf[kk];
                    unroll!(p in 0..4 => {
                        if (p as u32) < FA_BN / 16 {
                            let row = p as u32 * 16 + (j >> 1) * 8 + r;
                            let b = ldmatrix_x4(sk.add(fa_swz::<D>(row, kk as u32 * 2 + (j & 1)) as usize));
                            s[2 * p] = mma_bf16_16816(s[2 * p], a, [b[0], b[1]]);
                            s[2 * p + 1] = mma_bf16_16816(s[2 * p + 1], a, [b[2], b[3]]);
                        }
                    });
                }
            });
            // scale to base 2; causal mask only on tiles that reach past the block's
            // first query (zero-filled keys past `kend` are masked there too)
            // (branch-free: key k0 + 8n + 2t + e is masked when 8n + e > lim, lim = pos -
            // k0 - 2t; lim is out of reach on the other tiles)
            let diag = k0 + FA_BN - 1 > first;
            let base = (k0 + 2 * t) as i32;
            let lim = [
                if diag {
                    pos[0] as i32 - base
                } else {
                    FA_BN as i32
                },
                if diag {
                    pos[1] as i32 - base
                } else {
                    FA_BN as i32
                },
            ];
            unroll!(n in 0..8 => {
                if (n as u32) < FA_BN / 8 {
                    unroll!(i in 0..4 => {
                        let v = s[n][i] * sl2;
                        s[n][i] = if (n * 8 + (i & 1)) as i32 > lim[i / 2] { NEG_INF } else { v };
                    });
                }
            });
            // online softmax: row max over the 4 lanes of a row; every row sees key 0
            // in tile 0, so the max is finite from the first tile on
            let mut mx = m;
            unroll!(n in 0..8 => {
                if (n as u32) < FA_BN / 8 {
                    mx[0] = fmax(mx[0], fmax(s[n][0], s[n][1]));
                    mx[1] = fmax(mx[1], fmax(s[n][2], s[n][3]));
                }
            });
            unroll!(hh in 0..2 => {
                mx[hh] = fmax(mx[hh], shfl_xor_f32(mx[hh], 1));
                mx[hh] = fmax(mx[hh], shfl_xor_f32(mx[hh], 2));
            });
            let alpha = [exp2(m[0] - mx[0]), exp2(m[1] - mx[1])];
            m = mx;
            let mut ps = [0.0f32; 2];
            unroll!(n in 0..8 => {
                if (n as u32) < FA_BN / 8 {
                unroll!(i in 0..4 => {
                    let p = exp2(s[n][i] - mx[i / 2]);
                    s[n][i] = p;
                    ps[i / 2] += p;
                });
                }
            });
            l[0] = fma(l[0], alpha[0], ps[0]);
            l[1] = fma(l[1], alpha[1], ps[1]);
            unroll!(n in 0..16 => {
                if (n as u32) < D / 8 {
                    acc[n][0] *= alpha[0];
                    acc[n][1] *= alpha[0];
                    acc[n][2] *= alpha[1];
                    acc[n][3] *= alpha[1];
                }
            });
            // the accumulator layout of S is the A layout of P: bf16 pairs in registers
            unroll!(kk in 0..4 => {
                if (kk as u32) < FA_BN / 16 {
                pf[kk] = [
                    pack_bf16x2(s[2 * kk][0], s[2 * kk][1]),
                    pack_bf16x2(s[2 * kk][2], s[2 * kk][3]),
                    pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                    pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3]),
                ];
                }
            });
        }
        cp_async_wait::<0>();
        sync_threads(); // V(kt) is visible, and every warp is done reading K(kt)
        if kt + 1 < nkt {
            fa_load_kv::<D>(sk, kc, table, kvh, kvh_idx, bs, k0 + FA_BN, kend);
        }
        cp_async_commit(); // K(kt + 1) lands while P·V is computed
        if live {
            // O += P V: V fragments by ldmatrix.trans from the row-major [key][dim] tile
            unroll!(kk in 0..4 => {
                unroll!(dp in 0..8 => {
                    if (kk as u32) < FA_BN / 16 && (dp as u32) < D / 16 {
                        let key = kk as u32 * 16 + (j & 1) * 8 + r;
                        let b = ldmatrix_x4_trans(sv.add(fa_swz::<D>(key, dp as u32 * 2 + (j >> 1)) as usize));
                        acc[2 * dp] = mma_bf16_16816(acc[2 * dp], pf[kk], [b[0], b[1]]);
                        acc[2 * dp + 1] = mma_bf16_16816(acc[2 * dp + 1], pf[kk], [b[2], b[3]]);
                    }
                });
            });
        }
        cp_async_wait::<0>();
        sync_threads(); // K(kt + 1) is visible, and every warp is done reading V(kt)
        kt += 1;
    }
    // row sums over the 4 lanes of each row, then normalise and round to bf16
    unroll!(hh in 0..2 => {
        l[hh] += shfl_xor_f32(l[hh], 1);
        l[hh] += shfl_xor_f32(l[hh], 2);
    });
    unroll!(hh in 0..2 => {
        let rl = wr + g + 8 * hh as u32;
        if rl < nq {
            let o = out.add((((row0 + rl) * q_heads + h) * D + 2 * t) as usize);
            unroll!(n in 0..16 => {
                if (n as u32) < D / 8 {
                    *o.add(n * 8) = Bf16::from_f32(normalise(acc[n][2 * hh], l[hh]));
                    *o.add(n * 8 + 1) = Bf16::from_f32(normalise(acc[n][2 * hh + 1], l[hh]));
                }
            });
        }
    });
}

kernels! {
    /// Paged decode attention (one query per sequence), split-K; see the module comment.
    pub fn attn_decode_bf16(
        out: *mut Bf16, o_part: *mut f32, ml_part: *mut f32, q: *const Bf16,
        k_cache: *const Bf16, v_cache: *const Bf16, block_tables: *const u32, ctx_lens: *const u32,
        q_heads: u32, kv_heads: u32, head_dim: u32, block_size: u32, max_blocks: u32,
        q_stride: u32, split_tokens: u32, scale: f32,
    ) {
        let smem = shared_bytes!(attn_smem, 16512) as *mut f32;
        attn_decode::<false>(out, o_part, ml_part, q, k_cache, v_cache, block_tables, ctx_lens, q_heads, kv_heads,
            head_dim, block_size, max_blocks, q_stride, split_tokens, scale, smem);
    }
    /// `attn_decode_bf16` with a per-warp 3-stage `cp.async` pipeline (see the module
    /// comment): same parameters, launch shape (block 128) and outputs, including the
    /// split-K partials for `attn_decode_combine_bf16`.
    pub fn attn_decode_pipelined_bf16(
        out: *mut Bf16, o_part: *mut f32, ml_part: *mut f32, q: *const Bf16,
        k_cache: *const Bf16, v_cache: *const Bf16, block_tables: *const u32, ctx_lens: *const u32,
        q_heads: u32, kv_heads: u32, head_dim: u32, block_size: u32, max_blocks: u32,
        q_stride: u32, split_tokens: u32, scale: f32,
    ) {
        let smem = shared_bytes!(attn_pipe_smem, PIPE_SMEM as usize) as *mut f32;
        attn_decode::<true>(out, o_part, ml_part, q, k_cache, v_cache, block_tables, ctx_lens, q_heads,
            kv_heads, head_dim, block_size, max_blocks, q_stride, split_tokens, scale, smem);
    }
    /// Merge the split-K partials of `attn_decode_bf16`. grid = (q_heads, num_seqs), block 128.
    pub fn attn_decode_combine_bf16(
        out: *mut Bf16, o_part: *const f32, ml_part: *const f32, ctx_lens: *const u32,
        q_heads: u32, head_dim: u32, splits: u32, split_tokens: u32,
    ) {
        attn_decode_combine(out, o_part, ml_part, ctx_lens, q_heads, head_dim, splits, split_tokens);
    }
    /// Causal prefill attention over the paged cache (varlen batch); see the module comment.
    pub fn attn_prefill_bf16(
        out: *mut Bf16, q: *const Bf16, k_cache: *const Bf16, v_cache: *const Bf16,
        block_tables: *const u32, ctx_lens: *const u32, q_starts: *const u32, q_lens: *const u32,
        q_heads: u32, kv_heads: u32, head_dim: u32, block_size: u32, max_blocks: u32,
        q_stride: u32, scale: f32,
    ) {
        attn_prefill(out, q, k_cache, v_cache, block_tables, ctx_lens, q_starts, q_lens, q_heads,
            kv_heads, head_dim, block_size, max_blocks, q_stride, scale);
    }
    /// `attn_prefill_bf16` on tensor cores (FlashAttention-2 style; see the module
    /// comment): same arguments and results, head_dim 64 or 128 (others trap), launch
    /// grid = (q_heads, ceil(max_q_len / 64), num_seqs), block 128 (`FA_THREADS`).
    pub fn attn_prefill_mma_bf16(
        out: *mut Bf16, q: *const Bf16, k_cache: *const Bf16, v_cache: *const Bf16,
        block_tables: *const u32, ctx_lens: *const u32, q_starts: *const u32, q_lens: *const u32,
        q_heads: u32, kv_heads: u32, head_dim: u32, block_size: u32, max_blocks: u32,
        q_stride: u32, scale: f32,
    ) {
        let smem = shared_bytes!(attn_fa_smem, FA_SMEM as usize);
        if block_dim() != FA_THREADS || (k_cache as usize) % 16 != 0 || (v_cache as usize) % 16 != 0 {
            trap();
        }
        if head_dim == 128 {
            attn_prefill_mma::<128>(out, q, k_cache, v_cache, block_tables, ctx_lens, q_starts, q_lens,
                q_heads, kv_heads, block_size, max_blocks, q_stride, scale, smem);
        } else if head_dim == 64 {
            attn_prefill_mma::<64>(out, q, k_cache, v_cache, block_tables, ctx_lens, q_starts, q_lens,
                q_heads, kv_heads, block_size, max_blocks, q_stride, scale, smem);
        } else {
            trap();
        }
    }
    /// Write new K/V rows into their paged-cache slots. grid.x = tokens, block 128.
    pub fn kv_cache_write_bf16(
        k_cache: *mut Bf16, v_cache: *mut Bf16, k: *const Bf16, v: *const Bf16, slots: *const u32,
        kv_heads: u32, head_dim: u32, k_stride: u32, v_stride: u32,
    ) {
        kv_write_row(k_cache, v_cache, k, v, slots, kv_heads, head_dim, k_stride, v_stride);
    }
    /// `rope_bf16` then `kv_cache_write_bf16` in one launch (one token row per block:
    /// the row's rotation, a barrier, then its K/V written to the cache; the same results
    /// as the two launches, one launch fewer per layer). grid.x = tokens, block 128.
    pub fn rope_kv_write_bf16(
        q: *mut Bf16, k: *mut Bf16, v: *const Bf16, pos: *const u32, inv_freq: *const f32,
        k_cache: *mut Bf16, v_cache: *mut Bf16, slots: *const u32,
        q_heads: u32, kv_heads: u32, head_dim: u32, q_stride: u32, k_stride: u32, v_stride: u32,
    ) {
        let cs = shared_bytes!(rkv_cs, 2048) as *mut f32;
        crate::small::rope(q, k, pos, inv_freq, q_heads, kv_heads, head_dim, q_stride, k_stride, cs);
        sync_threads(); // the row's rotated K, written by other threads, is read below
        kv_write_row(k_cache, v_cache, k, v, slots, kv_heads, head_dim, k_stride, v_stride);
    }
}

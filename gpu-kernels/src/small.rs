//! Small ops of a Llama step. Element types bf16 / f16 / f32 (suffix `_bf16`, `_f16`,
//! `_f32`); arithmetic in f32, and every op rounds to the storage type where PyTorch's
//! Llama does, so bf16 results match Hugging Face's bf16 forward op for op.
//!
//! Layouts: activations are row-major `[rows, cols]` with an explicit row stride where
//! a tensor may be a column slice of a fused projection (q/k/v, gate/up).
//! Launch shapes (block = 128 threads unless noted):
//! - `rmsnorm`, `add_rmsnorm`: grid.x = rows, one block per row.
//! - `rope`: grid.x = tokens; q `[tokens, q_heads, head_dim]` and k likewise, rotated
//!   in place (HF rotate-half convention), cos/sin computed from `inv_freq[head_dim/2]`
//!   (Llama 3 scaling is applied to `inv_freq` on the host: [`llama3_inv_freq`]).
//! - `silu_mul`, `residual_add`: any grid (grid-stride loops).
//! - `embedding`: grid.x = tokens; vocab-parallel shard rows `[vocab_start, vocab_end)`,
//!   ids outside give zero rows (the TP all-reduce sums the shards).
//! - `argmax`, `top_p_sample`: grid.x = rows, one block per row of logits.
use crate::prims::*;

#[inline(always)]
unsafe fn rmsnorm_row<T: Elem>(
    out: *mut T,
    x: *const T,
    w: *const T,
    cols: u32,
    eps: f32,
    scratch: *mut f32,
) {
    let mut ss = 0.0f32;
    let mut i = thread_idx();
    while i < cols {
        let v = (*x.add(i as usize)).to_f32();
        ss = fma(v, v, ss);
        i += block_dim();
    }
    let total = block_sum(ss, scratch);
    let r = rsqrt(total / (cols as f32) + eps);
    let mut i = thread_idx();
    while i < cols {
        let v = T::round((*x.add(i as usize)).to_f32() * r);
        *out.add(i as usize) = T::from_f32((*w.add(i as usize)).to_f32() * v);
        i += block_dim();
    }
}

#[inline(always)]
unsafe fn rmsnorm<T: Elem>(
    out: *mut T,
    x: *const T,
    w: *const T,
    cols: u32,
    eps: f32,
    scratch: *mut f32,
) {
    let row = block_idx_x() as usize * cols as usize;
    rmsnorm_row(out.add(row), x.add(row), w, cols, eps, scratch);
}

/// residual += x (rounded to T); out = rmsnorm(residual).
#[inline(always)]
unsafe fn add_rmsnorm<T: Elem>(
    out: *mut T,
    residual: *mut T,
    x: *const T,
    w: *const T,
    cols: u32,
    eps: f32,
    scratch: *mut f32,
) {
    let row = block_idx_x() as usize * cols as usize;
    let res = residual.add(row);
    let xr = x.add(row);
    let mut i = thread_idx();
    while i < cols {
        let s = (*res.add(i as usize)).to_f32() + (*xr.add(i as usize)).to_f32();
        *res.add(i as usize) = T::from_f32(s);
        i += block_dim();
    }
    // Each thread re-reads only what it wrote itself, so no barrier is needed here.
    rmsnorm_row(out.add(row), res, w, cols, eps, scratch);
}

/// sin and cos of an f32 argument, accurate to ~1 ulp for |x| up to ~1e7: reduction by
/// pi/2 in f64, then single-precision minimax polynomials (Cephes `sinf`/`cosf`).
#[inline(always)]
pub fn sincos(x: f32) -> (f32, f32) {
    let xd = x as f64;
    let kf = xd * 0.636_619_772_367_581_4_f64;
    let k = if kf >= 0.0 {
        (kf + 0.5) as i64
    } else {
        (kf - 0.5) as i64
    };
    let r = (xd - (k as f64) * 1.570_796_326_794_896_6_f64) as f32;
    let z = r * r;
    let s = fma(
        fma(fma(-1.951_529_6e-4, z, 8.332_160_9e-3), z, -1.666_665_5e-1) * z,
        r,
        r,
    );
    let c = fma(
        fma(fma(2.443_315_7e-5, z, -1.388_731_6e-3), z, 4.166_664_6e-2) * z,
        z,
        fma(-0.5, z, 1.0),
    );
    match (k & 3) as u32 {
        0 => (s, c),
        1 => (c, -s),
        2 => (-s, -c),
        _ => (-c, s),
    }
}

#[inline(always)]
pub(crate) unsafe fn rope<T: Elem>(
    q: *mut T,
    k: *mut T,
    pos: *const u32,
    inv_freq: *const f32,
    q_heads: u32,
    k_heads: u32,
    head_dim: u32,
    q_stride: u32,
    k_stride: u32,
    cs: *mut f32,
) {
    let t = block_idx_x() as usize;
    let half = head_dim / 2;
    let p = *pos.add(t) as f32;
    let mut i = thread_idx();
    while i < half {
        let (s, c) = sincos(p * *inv_freq.add(i as usize));
        *cs.add(i as usize) = T::round(c);
        *cs.add((half + i) as usize) = T::round(s);
        i += block_dim();
    }
    sync_threads();
    let total = (q_heads + k_heads) * half;
    let mut j = thread_idx();
    while j < total {
        let h = j / half;
        let i = j - h * half;
        let base = if h < q_heads {
            q.add(t * q_stride as usize + (h * head_dim) as usize)
        } else {
            k.add(t * k_stride as usize + ((h - q_heads) * head_dim) as usize)
        };
        let x1 = (*base.add(i as usize)).to_f32();
        let x2 = (*base.add((i + half) as usize)).to_f32();
        let c = *cs.add(i as usize);
        let s = *cs.add((half + i) as usize);
        let o1 = T::round(x1 * c) + T::round(-x2 * s);
        let o2 = T::round(x2 * c) + T::round(x1 * s);
        *base.add(i as usize) = T::from_f32(o1);
        *base.add((i + half) as usize) = T::from_f32(o2);
        j += block_dim();
    }
}

#[inline(always)]
fn global_tid() -> u32 {
    block_idx_x() * block_dim() + thread_idx()
}
#[inline(always)]
fn global_threads() -> u32 {
    grid_dim_x() * block_dim()
}

#[inline(always)]
unsafe fn silu_mul<T: Elem>(
    out: *mut T,
    gate: *const T,
    up: *const T,
    rows: u32,
    cols: u32,
    in_stride: u32,
    out_stride: u32,
) {
    let n = rows * cols;
    let mut i = global_tid();
    while i < n {
        let r = i / cols;
        let c = i - r * cols;
        let src = (r * in_stride + c) as usize;
        let g = T::round(silu((*gate.add(src)).to_f32()));
        *out.add((r * out_stride + c) as usize) = T::from_f32(g * (*up.add(src)).to_f32());
        i += global_threads();
    }
}

#[inline(always)]
unsafe fn residual_add<T: Elem>(out: *mut T, a: *const T, b: *const T, n: u32) {
    let mut i = global_tid();
    while i < n {
        *out.add(i as usize) =
            T::from_f32((*a.add(i as usize)).to_f32() + (*b.add(i as usize)).to_f32());
        i += global_threads();
    }
}

#[inline(always)]
unsafe fn embedding<T: Elem>(
    out: *mut T,
    table: *const T,
    ids: *const u32,
    dim: u32,
    vocab_start: u32,
    vocab_end: u32,
) {
    let t = block_idx_x() as usize;
    let id = *ids.add(t);
    let o = out.add(t * dim as usize);
    let valid = id >= vocab_start && id < vocab_end;
    let row = if valid {
        table.add((id - vocab_start) as usize * dim as usize)
    } else {
        table
    };
    let mut i = thread_idx();
    while i < dim {
        *o.add(i as usize) = if valid {
            *row.add(i as usize)
        } else {
            T::from_f32(0.0)
        };
        i += block_dim();
    }
}

/// (value, index) of the larger, ties to the lower index; NaN never wins.
#[inline(always)]
fn better(v: f32, i: u32, bv: f32, bi: u32) -> bool {
    v > bv || (v == bv && i < bi)
}

/// Block-wide argmax of `x[0..n]`; returns (max, index) on every thread.
#[inline(always)]
unsafe fn block_argmax<T: Elem>(x: *const T, n: u32, sv: *mut f32, si: *mut u32) -> (f32, u32) {
    let mut bv = f32_from_bits(0xff80_0000); // -inf
    let mut bi = U32_MAX;
    let bd = block_dim();
    let mut i = thread_idx();
    // Four loads in flight per thread before the compares (one at a time, a 32k-logit
    // row on 128 threads waited for 250 load latencies in a row). `better` orders by
    // (value, index), so the order of the compares does not change the pick.
    while i < n && 3 * bd < n - i {
        let v = [
            (*x.add(i as usize)).to_f32(),
            (*x.add((i + bd) as usize)).to_f32(),
            (*x.add((i + 2 * bd) as usize)).to_f32(),
            (*x.add((i + 3 * bd) as usize)).to_f32(),
        ];
        let mut u = 0;
        while u < 4 {
            let j = i + u * bd;
            if better(v[u as usize], j, bv, bi) {
                bv = v[u as usize];
                bi = j;
            }
            u += 1;
        }
        i += 4 * bd;
    }
    while i < n {
        let v = (*x.add(i as usize)).to_f32();
        if better(v, i, bv, bi) {
            bv = v;
            bi = i;
        }
        i += bd;
    }
    let mut m = 16;
    while m > 0 {
        let ov = shfl_xor_f32(bv, m);
        let oi = shfl_xor_u32(bi, m);
        if better(ov, oi, bv, bi) {
            bv = ov;
            bi = oi;
        }
        m >>= 1;
    }
    if lane_id() == 0 {
        *sv.add(warp_id() as usize) = bv;
        *si.add(warp_id() as usize) = bi;
    }
    sync_threads();
    let mut w = 0;
    bv = *sv;
    bi = *si;
    while w < block_dim() / WARP {
        let ov = *sv.add(w as usize);
        let oi = *si.add(w as usize);
        if better(ov, oi, bv, bi) {
            bv = ov;
            bi = oi;
        }
        w += 1;
    }
    sync_threads();
    if bi == U32_MAX {
        // Every value NaN (-inf ties to the lowest index like any value): index 0, and a
        // NaN value, so that a driver picking across vocabulary slices skips the row.
        bi = 0;
        bv = f32_from_bits(0x7fc0_0000);
    }
    (bv, bi)
}

#[inline(always)]
unsafe fn argmax<T: Elem>(
    out: *mut u32,
    values: *mut f32,
    logits: *const T,
    vocab: u32,
    sv: *mut f32,
    si: *mut u32,
) {
    let row = block_idx_x() as usize;
    let (v, i) = block_argmax(logits.add(row * vocab as usize), vocab, sv, si);
    if thread_idx() == 0 {
        *out.add(row) = i;
        if values as usize != 0 {
            *values.add(row) = v;
        }
    }
}

/// Mass of the probabilities (relative to the max, so the max has p = 1) at or above `tau`.
#[inline(always)]
unsafe fn kept_mass(x: *const f32, n: u32, mx: f32, k: f32, tau: f32, scratch: *mut f32) -> f32 {
    let mut s = 0.0f32;
    let mut i = thread_idx();
    while i < n {
        let p = exp2((*x.add(i as usize) - mx) * k);
        if p >= tau {
            s += p;
        }
        i += block_dim();
    }
    block_sum(s, scratch)
}

/// Nucleus sampling of one row: keep the largest probabilities whose mass reaches
/// `top_p` (found by bisection on the threshold, no sort), then draw with `u` in [0, 1)
/// by walking the kept tokens in index order.
#[inline(always)]
unsafe fn top_p_sample(
    out: *mut u32,
    logits: *const f32,
    vocab: u32,
    inv_temperature: f32,
    top_p: f32,
    uniforms: *const f32,
    sv: *mut f32,
    si: *mut u32,
    part: *mut f32,
) {
    let row = block_idx_x() as usize;
    let x = logits.add(row * vocab as usize);
    let (mx, imax) = block_argmax(x, vocab, sv, si);
    let k = inv_temperature * LOG2E;
    let total = kept_mass(x, vocab, mx, k, 0.0, sv);
    let target = top_p * total;
    // Invariant: mass(lo) >= target > mass(hi); thresholds as f32 bit patterns in [0, 1].
    let mut lo = 0u32;
    let mut hi = 0x3f80_0001u32;
    if top_p < 1.0 {
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if kept_mass(x, vocab, mx, k, f32_from_bits(mid), sv) >= target {
                lo = mid;
            } else {
                hi = mid;
            }
        }
    }
    let tau = f32_from_bits(lo);
    let kept = kept_mass(x, vocab, mx, k, tau, sv);
    let r = *uniforms.add(row) * kept;
    // Each thread owns a contiguous range; serial scan of the per-thread sums.
    let per = div_ceil(vocab, block_dim());
    let start = umin(thread_idx() * per, vocab);
    let end = umin(start + per, vocab);
    let mut s = 0.0f32;
    let mut i = start;
    while i < end {
        let p = exp2((*x.add(i as usize) - mx) * k);
        if p >= tau {
            s += p;
        }
        i += 1;
    }
    *part.add(thread_idx() as usize) = s;
    sync_threads();
    if thread_idx() == 0 {
        let mut acc = 0.0f32;
        let mut owner = U32_MAX;
        let mut t = 0;
        while t < block_dim() {
            let v = *part.add(t as usize);
            if owner == U32_MAX && v > 0.0 && r < acc + v {
                owner = t;
                *sv = acc; // prefix before the owner's range
            }
            acc += v;
            t += 1;
        }
        *si = owner;
    }
    sync_threads();
    let owner = *si;
    if thread_idx() == 0 && owner == U32_MAX {
        *out.add(row) = imax; // rounding pushed r past the end: take the mode
    }
    if thread_idx() == owner {
        let mut acc = *sv;
        let mut pick = imax;
        let mut last = U32_MAX;
        let mut i = start;
        while i < end {
            let p = exp2((*x.add(i as usize) - mx) * k);
            if p >= tau {
                acc += p;
                last = i;
                if r < acc {
                    pick = i;
                    break;
                }
            }
            i += 1;
        }
        if pick == imax && last != U32_MAX && r >= acc {
            pick = last;
        }
        *out.add(row) = pick;
    }
}

macro_rules! small_ops {
    ($T:ty, $rms:ident, $addrms:ident, $rope:ident, $silu:ident, $add:ident, $emb:ident, $argmax:ident) => {
        kernels! {
            /// RMSNorm, HF Llama semantics. grid.x = rows, block 128.
            pub fn $rms(out: *mut $T, x: *const $T, w: *const $T, cols: u32, eps: f32) {
                let scratch = shared_bytes!(rms_scratch, 128) as *mut f32;
                rmsnorm(out, x, w, cols, eps, scratch);
            }
            /// residual += x; out = RMSNorm(residual). grid.x = rows, block 128.
            pub fn $addrms(out: *mut $T, residual: *mut $T, x: *const $T, w: *const $T, cols: u32, eps: f32) {
                let scratch = shared_bytes!(rms_scratch, 128) as *mut f32;
                add_rmsnorm(out, residual, x, w, cols, eps, scratch);
            }
            /// In-place rotary embedding of q and k. grid.x = tokens, block 128.
            pub fn $rope(q: *mut $T, k: *mut $T, pos: *const u32, inv_freq: *const f32, q_heads: u32, k_heads: u32, head_dim: u32, q_stride: u32, k_stride: u32) {
                let cs = shared_bytes!(rope_cs, 2048) as *mut f32;
                rope(q, k, pos, inv_freq, q_heads, k_heads, head_dim, q_stride, k_stride, cs);
            }
            /// out[r, c] = silu(gate[r, c]) * up[r, c].
            pub fn $silu(out: *mut $T, gate: *const $T, up: *const $T, rows: u32, cols: u32, in_stride: u32, out_stride: u32) {
                silu_mul(out, gate, up, rows, cols, in_stride, out_stride);
            }
            /// out = a + b (out may alias a or b).
            pub fn $add(out: *mut $T, a: *const $T, b: *const $T, n: u32) {
                residual_add(out, a, b, n);
            }
            /// Vocab-parallel embedding lookup. grid.x = tokens, block 128.
            pub fn $emb(out: *mut $T, table: *const $T, ids: *const u32, dim: u32, vocab_start: u32, vocab_end: u32) {
                embedding(out, table, ids, dim, vocab_start, vocab_end);
            }
            /// Greedy sampling, ties to the lowest index, NaN never wins (a row of NaN
            /// gives 0): out[row] = the index; values[row] = that logit as f32 (NaN
            /// for a row of NaN) unless `values` is null (a vocabulary-parallel LM
            /// head's ranks send both, the driver picks across them). grid.x = rows,
            /// block 128.
            pub fn $argmax(out: *mut u32, values: *mut f32, logits: *const $T, vocab: u32) {
                let sv = shared_bytes!(am_v, 128) as *mut f32;
                let si = shared_bytes!(am_i, 128) as *mut u32;
                argmax(out, values, logits, vocab, sv, si);
            }
        }
    };
}
small_ops!(
    Bf16,
    rmsnorm_bf16,
    add_rmsnorm_bf16,
    rope_bf16,
    silu_mul_bf16,
    residual_add_bf16,
    embedding_bf16,
    argmax_bf16
);
small_ops!(
    F16,
    rmsnorm_f16,
    add_rmsnorm_f16,
    rope_f16,
    silu_mul_f16,
    residual_add_f16,
    embedding_f16,
    argmax_f16
);
small_ops!(
    f32,
    rmsnorm_f32,
    add_rmsnorm_f32,
    rope_f32,
    silu_mul_f32,
    residual_add_f32,
    embedding_f32,
    argmax_f32
);

kernels! {
    /// Top-p (nucleus) sampling with temperature over f32 logits `[rows, vocab]`;
    /// `uniforms[row]` in [0, 1). grid.x = rows, block 128 (at most 128 threads).
    pub fn top_p_sample_f32(out: *mut u32, logits: *const f32, vocab: u32, temperature: f32, top_p: f32, uniforms: *const f32) {
        let sv = shared_bytes!(tp_v, 128) as *mut f32;
        let si = shared_bytes!(tp_i, 128) as *mut u32;
        let part = shared_bytes!(tp_part, 512) as *mut f32;
        top_p_sample(out, logits, vocab, 1.0 / temperature, top_p, uniforms, sv, si, part);
    }
}

/// Llama 3 RoPE frequencies (HF `_compute_llama3_parameters`), host side.
#[cfg(not(target_arch = "nvptx64"))]
pub fn llama3_inv_freq(
    head_dim: usize,
    theta: f64,
    factor: f64,
    low_freq_factor: f64,
    high_freq_factor: f64,
    original_max_position: f64,
) -> std::vec::Vec<f32> {
    let low_wavelen = original_max_position / low_freq_factor;
    let high_wavelen = original_max_position / high_freq_factor;
    (0..head_dim / 2)
        .map(|i| {
            let f = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
            let f = f as f32 as f64;
            let wavelen = 2.0 * std::f64::consts::PI / f;
            let r = if wavelen > low_wavelen {
                f / factor
            } else if wavelen < high_wavelen {
                f
            } else {
                let smooth = (original_max_position / wavelen - low_freq_factor)
                    / (high_freq_factor - low_freq_factor);
                (1.0 - smooth) * f / factor + smooth * f
            };
            r as f32
        })
        .collect()
}

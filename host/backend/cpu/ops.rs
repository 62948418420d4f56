//! CPU reference kernels, f32 throughout. Activations are row-major `[tokens, features]`;
//! weights keep the Hugging Face layout `W[out, in]` so `y = x · Wᵀ` reads each weight
//! row once per step and dots it with every token row while it sits in L1.

use crate::model::{ModelConfig, RopeScaling};

/// Dot product with 8 independent accumulators so LLVM vectorises it (summation order
/// differs from a sequential sum by rounding only; tolerances in tests allow for it).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut tail = 0.0;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// `y[t, o] = Σ_i x[t, i] · w[o, i]` for `t < tokens`; `y` is overwritten.
///
/// On x86-64 CPUs with AVX2 and FMA (detected at run time) a micro-kernel computes four
/// token rows against each weight row at once, so a weight row is loaded once per four
/// tokens; elsewhere a portable loop with the vectorisable [`dot`].
pub fn matmul_t(x: &[f32], tokens: usize, w: &[f32], out_dim: usize, y: &mut [f32]) {
    let in_dim = w.len().checked_div(out_dim).unwrap_or(0);
    assert_eq!(x.len(), tokens * in_dim, "matmul_t: x shape");
    assert_eq!(y.len(), tokens * out_dim, "matmul_t: y shape");
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features the function is compiled for, and the
            // shapes were checked above.
            unsafe { avx2::matmul_t(x, tokens, w, in_dim, out_dim, y) };
            return;
        }
    }
    for (o, wr) in w.chunks_exact(in_dim.max(1)).enumerate().take(out_dim) {
        for t in 0..tokens {
            y[t * out_dim + o] = dot(&x[t * in_dim..(t + 1) * in_dim], wr);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Four tokens (`T = 4`) or fewer against one weight row.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn row<const T: usize>(xs: [*const f32; T], wr: *const f32, n: usize) -> [f32; T] {
        let mut acc = [_mm256_setzero_ps(); T];
        let mut i = 0;
        while i + 8 <= n {
            let wv = _mm256_loadu_ps(wr.add(i));
            for t in 0..T {
                acc[t] = _mm256_fmadd_ps(_mm256_loadu_ps(xs[t].add(i)), wv, acc[t]);
            }
            i += 8;
        }
        let mut out = [0.0f32; T];
        for t in 0..T {
            let mut s = hsum(acc[t]);
            for k in i..n {
                s += *xs[t].add(k) * *wr.add(k);
            }
            out[t] = s;
        }
        out
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn matmul_t(
        x: &[f32],
        tokens: usize,
        w: &[f32],
        n: usize,
        out_dim: usize,
        y: &mut [f32],
    ) {
        let xp = x.as_ptr();
        for o in 0..out_dim {
            let wr = w.as_ptr().add(o * n);
            let mut t = 0;
            while t + 4 <= tokens {
                let r = row::<4>(
                    [
                        xp.add(t * n),
                        xp.add((t + 1) * n),
                        xp.add((t + 2) * n),
                        xp.add((t + 3) * n),
                    ],
                    wr,
                    n,
                );
                for (k, v) in r.into_iter().enumerate() {
                    y[(t + k) * out_dim + o] = v;
                }
                t += 4;
            }
            while t < tokens {
                y[t * out_dim + o] = row::<1>([xp.add(t * n)], wr, n)[0];
                t += 1;
            }
        }
    }
}

/// Adds `bias[o]` to every row of `y[tokens, bias.len()]`.
pub fn add_bias(y: &mut [f32], bias: &[f32]) {
    for row in y.chunks_exact_mut(bias.len()) {
        for (a, b) in row.iter_mut().zip(bias) {
            *a += *b;
        }
    }
}

pub fn add_into(y: &mut [f32], x: &[f32]) {
    for (a, b) in y.iter_mut().zip(x) {
        *a += *b;
    }
}

/// RMSNorm as Hugging Face Llama computes it in f32: `w * (x * rsqrt(mean(x²) + eps))`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let h = w.len();
    for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let ss: f64 = xr.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let inv = 1.0 / ((ss / h as f64) as f32 + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = g * (v * inv);
        }
    }
}

/// `gate = silu(gate) * up`, in place.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        let s = *g / (1.0 + (-*g).exp());
        *g = s * u;
    }
}

/// Rotary inverse frequencies, computed as transformers does (f32, then scaled, then
/// rounded to the checkpoint's dtype).
pub fn rope_inv_freq(cfg: &ModelConfig) -> Vec<f32> {
    let d = cfg.head_dim;
    let base = cfg.rope_theta as f32;
    let mut inv: Vec<f32> = (0..d / 2)
        .map(|i| 1.0f32 / base.powf((2 * i) as f32 / d as f32))
        .collect();
    match cfg.rope_scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => inv.iter_mut().for_each(|f| *f /= factor as f32),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => {
            let (factor, lo, hi, old) = (
                factor as f32,
                low_freq_factor as f32,
                high_freq_factor as f32,
                old as f32,
            );
            let low_wavelen = old / lo;
            let high_wavelen = old / hi;
            for f in inv.iter_mut() {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                let scaled = if wavelen > low_wavelen {
                    *f / factor
                } else {
                    *f
                };
                let smooth = (old / wavelen - lo) / (hi - lo);
                let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                *f = if medium {
                    (1.0 - smooth) * scaled / factor + smooth * scaled
                } else {
                    scaled
                };
            }
        }
    }
    // transformers keeps inv_freq in the checkpoint's dtype (see CheckpointDType).
    inv.iter().map(|&f| cfg.dtype.round(f)).collect()
}

/// Applies rotary embeddings (rotate-half convention) to `x[tokens, heads, head_dim]`.
pub fn rope(x: &mut [f32], heads: usize, head_dim: usize, positions: &[usize], inv_freq: &[f32]) {
    let half = head_dim / 2;
    let mut cs = vec![(0.0f32, 0.0f32); half];
    for (t, row) in x.chunks_exact_mut(heads * head_dim).enumerate() {
        let p = positions[t] as f32;
        for (i, c) in cs.iter_mut().enumerate() {
            let a = p * inv_freq[i];
            *c = (a.cos(), a.sin());
        }
        for hv in row.chunks_exact_mut(head_dim) {
            for (i, &(cos, sin)) in cs.iter().enumerate() {
                let (x1, x2) = (hv[i], hv[i + half]);
                hv[i] = x1 * cos - x2 * sin;
                hv[i + half] = x2 * cos + x1 * sin;
            }
        }
    }
}

/// Index of the largest value; the first on ties (as `torch.argmax`). A NaN never wins
/// (a row of NaN gives 0), as in the GPU argmax kernel; torch would pick the NaN.
///
/// Two passes that vectorize: the largest value over 16 independent lanes, then the
/// first 16-value chunk holding it (compared whole, no early exit inside a chunk) and
/// its position there. The one-chain loop does not vectorize (about a nanosecond per
/// element: greedy sampling of a 32k vocabulary at batch 16 took 0.3 ms of the driver's
/// time per step, a GPU decode step's worth); `cargo bench --bench sampling`
/// compares the two.
pub fn argmax(x: &[f32]) -> usize {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks.clone() {
        for (m, &v) in lanes.iter_mut().zip(c) {
            // `v > m`, not `max`: a NaN `v` leaves the lane as it was.
            if v > *m {
                *m = v;
            }
        }
    }
    let mut best = f32::NEG_INFINITY;
    for &v in lanes.iter().chain(rest) {
        if v > best {
            best = v;
        }
    }
    // -0.0 == 0.0: the first of either wins, as a one-chain loop's `>` keeps it.
    // Nothing equals `best` only when every value is NaN (or there is none).
    let found = chunks
        .enumerate()
        .find(|(_, c)| c.iter().fold(false, |hit, &v| hit | (v == best)))
        .map(|(ci, _)| ci * LANES)
        .unwrap_or(x.len() - rest.len());
    x[found..]
        .iter()
        .position(|&v| v == best)
        .map_or(0, |i| found + i)
}

/// The plain loop (argmax before it was split into lanes): the tests' reference.
#[cfg(test)]
fn argmax_one_chain(x: &[f32]) -> usize {
    let mut best: Option<usize> = None;
    for (i, &v) in x.iter().enumerate() {
        if !v.is_nan() && best.is_none_or(|b| v > x[b]) {
            best = Some(i);
        }
    }
    best.unwrap_or(0)
}

/// Softmax in place (f32, max-subtracted).
pub fn softmax(x: &mut [f32]) {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut s = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        s += *v;
    }
    for v in x.iter_mut() {
        *v /= s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_matches_naive() {
        let (t, i, o) = (3, 19, 5);
        let x: Vec<f32> = (0..t * i).map(|k| (k as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..o * i).map(|k| (k as f32 * 0.11).cos()).collect();
        let mut y = vec![0.0; t * o];
        matmul_t(&x, t, &w, o, &mut y);
        for a in 0..t {
            for b in 0..o {
                let r: f64 = (0..i).map(|k| (x[a * i + k] * w[b * i + k]) as f64).sum();
                assert!((y[a * o + b] as f64 - r).abs() < 1e-5, "{a},{b}");
            }
        }
    }

    #[test]
    fn rope_preserves_norm_and_is_identity_at_zero() {
        let cfg = crate::model::random::tiny_config();
        let inv = rope_inv_freq(&cfg);
        let orig: Vec<f32> = (0..64).map(|k| (k as f32).sin()).collect();
        let mut x = orig.clone();
        rope(&mut x, 2, 32, &[0], &inv);
        assert_eq!(x, orig);
        rope(&mut x, 2, 32, &[7], &inv);
        let n0: f32 = orig.iter().map(|v| v * v).sum();
        let n1: f32 = x.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-4);
    }

    #[test]
    fn argmax_takes_first_of_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[f32::NAN, 5.0, f32::NAN]), 1);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY]), 1);
        assert_eq!(argmax(&[-0.0, 0.0]), 0);
    }

    #[test]
    fn argmax_equals_the_scalar_loop() {
        // Fresh random rows of every length around the lane count, drawn from a few
        // values so that ties (across and within lanes), ±0, -inf and NaN all occur.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        let mut rng = crate::runtime::sampling::Rng::new(seed);
        let pool = [
            -1.5,
            -0.0,
            0.0,
            0.25,
            2.0,
            2.0,
            7.0,
            f32::NEG_INFINITY,
            f32::NAN,
        ];
        for n in (0..70).chain([1000, 32000]) {
            for _ in 0..20 {
                // Each row draws from its own few values (so that rows of only NaN and
                // -inf, or a maximum found late, occur too).
                let few: Vec<f32> = (0..1 + rng.next_u64() % 3)
                    .map(|_| pool[(rng.next_u64() % pool.len() as u64) as usize])
                    .collect();
                let x: Vec<f32> = (0..n)
                    .map(|_| few[(rng.next_u64() % few.len() as u64) as usize])
                    .collect();
                assert_eq!(argmax(&x), argmax_one_chain(&x), "seed {seed}, {x:?}");
            }
        }
    }
}

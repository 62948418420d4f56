//! Shared helpers of the emulator tests: a splitmix64 RNG seeded from the clock (or
//! `REMP_TEST_SEED`), bf16/f16 helpers, tolerance checks.
#![allow(
    clippy::neg_cmp_op_on_partial_ord,
    clippy::needless_range_loop,
    clippy::too_many_arguments
)]
#![allow(dead_code)]

use remp_gpu_kernels::prims::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16, Bf16, F16};

pub struct Rng(u64);

impl Rng {
    /// Fresh RNG; the seed is printed (shown by the test harness when a test fails).
    pub fn new(test: &str) -> Rng {
        let seed = std::env::var("REMP_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap();
                t.as_nanos() as u64 ^ (test.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            });
        eprintln!("{test}: seed {seed} (rerun with REMP_TEST_SEED={seed})");
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [lo, hi] (inclusive).
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Uniform in [-a, a).
    pub fn sym(&mut self, a: f32) -> f32 {
        (self.unit() * 2.0 - 1.0) * a
    }
    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.range(0, xs.len() - 1)]
    }
    pub fn vec_f32(&mut self, n: usize, a: f32) -> Vec<f32> {
        (0..n).map(|_| self.sym(a)).collect()
    }
}

pub fn to_bf16(xs: &[f32]) -> Vec<Bf16> {
    xs.iter().map(|&x| Bf16(f32_to_bf16(x))).collect()
}
pub fn from_bf16(xs: &[Bf16]) -> Vec<f32> {
    xs.iter().map(|x| bf16_to_f32(x.0)).collect()
}
pub fn to_f16(xs: &[f32]) -> Vec<F16> {
    xs.iter().map(|&x| F16(f32_to_f16(x))).collect()
}
pub fn from_f16(xs: &[F16]) -> Vec<f32> {
    xs.iter().map(|x| f16_to_f32(x.0)).collect()
}
pub fn rbf16(x: f32) -> f32 {
    bf16_to_f32(f32_to_bf16(x))
}
pub fn rf16(x: f32) -> f32 {
    f16_to_f32(f32_to_f16(x))
}

/// Assert |got - want| <= atol + rtol * |want| elementwise, with a helpful message.
#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    let scale: Vec<f32> = want.iter().map(|w| w.abs()).collect();
    assert_close_scaled(what, got, want, atol, rtol, &scale);
}

/// [`assert_close`] with the relative part of element i's tolerance taken from
/// `scale[i]` instead of |want[i]| (where an intermediate larger than the result was
/// rounded, e.g. before a cancelling residual add).
pub fn assert_close_scaled(
    what: &str,
    got: &[f32],
    want: &[f32],
    atol: f32,
    rtol: f32,
    scale: &[f32],
) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    assert_eq!(scale.len(), want.len(), "{what}: scale length");
    let mut worst = (0usize, 0.0f32);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        let tol = atol + rtol * scale[i];
        if !(err <= tol) {
            let excess = if err.is_nan() {
                f32::INFINITY
            } else {
                err / tol
            };
            if excess > worst.1 {
                worst = (i, excess);
            }
        }
    }
    if worst.1 > 0.0 {
        let i = worst.0;
        let bad = got
            .iter()
            .zip(want)
            .zip(scale)
            .filter(|((g, w), s)| !((*g - *w).abs() <= atol + rtol * *s))
            .count();
        panic!(
            "{what}: {bad}/{} elements out of tolerance; worst at {i}: got {} want {}",
            got.len(),
            got[i],
            want[i]
        );
    }
}

/// A 16-byte-aligned buffer of `T` (GPU allocations are at least 256-byte aligned; the
/// tests offset into it to create misalignment on purpose).
pub struct ABuf<T> {
    raw: Vec<u128>,
    len: usize,
    _t: std::marker::PhantomData<T>,
}
impl<T: Copy> ABuf<T> {
    pub fn new(xs: &[T]) -> Self {
        let bytes = std::mem::size_of_val(xs);
        let mut raw = vec![0u128; bytes / 16 + 2];
        unsafe {
            std::ptr::copy_nonoverlapping(
                xs.as_ptr() as *const u8,
                raw.as_mut_ptr() as *mut u8,
                bytes,
            )
        };
        ABuf {
            raw,
            len: xs.len(),
            _t: std::marker::PhantomData,
        }
    }
    pub fn ptr(&self) -> *mut T {
        self.raw.as_ptr() as *mut T
    }
    pub fn to_vec(&self) -> Vec<T> {
        unsafe { std::slice::from_raw_parts(self.ptr(), self.len).to_vec() }
    }
}

/// A fresh random bf16 buffer (uniform ±`a`) of each length in `lens`: the weights or
/// biases of several GEMMs.
pub fn rand_bf16_bufs(rng: &mut Rng, lens: &[usize], a: f32) -> Vec<ABuf<Bf16>> {
    lens.iter()
        .map(|&n| ABuf::new(&to_bf16(&rng.vec_f32(n, a))))
        .collect()
}

/// `b`'s pointer when `on`, else null (an optional kernel argument).
pub fn ptr_if(on: bool, b: &ABuf<Bf16>) -> *const Bf16 {
    if on {
        b.ptr()
    } else {
        std::ptr::null()
    }
}

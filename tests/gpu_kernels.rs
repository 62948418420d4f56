//! Every kernel family on a real GPU against a CPU reference, on fresh random inputs
//! (seed printed; rerun with `REMP_TEST_SEED=N`). Run by `tools/gpu-check` with
//! `--include-ignored --test-threads=1`; ignored elsewhere (CI has no GPU).
//!
//! The reference for most kernels is the *same kernel source* compiled for the host and
//! run by the emulator of `remp-gpu-kernels` (itself checked against plain f64
//! references by `cargo test -p remp-gpu-kernels`), on byte-identical inputs: so the
//! GPU must reproduce the emulated result up to the GPU's approximate transcendentals.
//! Copies, the KV write, embedding and argmax are checked bit for bit, and one large
//! tensor-core GEMM against a plain f64 dot product (too big for the emulator).
//!
//! Tolerances: kernels do the same f32 operations in the same order on both sides
//! (the emulator reproduces shuffles, `mma.sync` fragments and the reduction trees), but
//! the GPU's `ex2.approx` / `rsqrt.approx` are ≈2 ulp off the emulator's exact ones, and
//! a tiny f32 difference can flip one bf16 rounding (2^-8 relative). So bf16 results
//! must agree within ~2 bf16 ulps (atol 1e-2, rtol 1e-2), f16 within 1e-3, f32 within
//! 1e-3 (tensor cores accumulate in a different order and precision than `fma`).
//!
//! Outputs are poisoned (0xFF bytes: NaN for floats) on both sides before the launch;
//! every element the kernel must write is checked to be non-poison, and every element
//! it must not write (row padding, skipped slots) to still hold the poison.
#![allow(clippy::too_many_arguments, clippy::needless_range_loop)]

use std::sync::OnceLock;

use remp::backend::cuda::{Arg, CudaDevice, DevBuf};
use remp::kernels::gemm_args;
use remp_gpu_kernels::prims::emu::{launch as emu, launch_dyn as emu_dyn};
use remp_gpu_kernels::prims::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16, Bf16, F16};
use remp_gpu_kernels::{attention::*, gemm::*, gemm_wgmma::*, small::*};

const GPU: &str = "needs a CUDA device";

fn dev() -> &'static CudaDevice {
    static DEV: OnceLock<CudaDevice> = OnceLock::new();
    DEV.get_or_init(|| {
        let d = CudaDevice::open(0).unwrap_or_else(|e| panic!("{e}"));
        d.set_sync_check(true);
        d.load_kernels().unwrap_or_else(|e| panic!("{e}"));
        eprintln!(
            "device: {} sm_{}{}",
            d.name(),
            d.compute_capability().0,
            d.compute_capability().1
        );
        d
    })
}

// ------------------------------------------------------------------ random inputs

struct Rng(u64);
impl Rng {
    fn new(test: &str) -> Rng {
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
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.range(0, xs.len() - 1)]
    }
    fn sym(&mut self, a: f32) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a
    }
    fn bf16(&mut self, n: usize, a: f32) -> Vec<u16> {
        (0..n).map(|_| f32_to_bf16(self.sym(a))).collect()
    }
    fn f16(&mut self, n: usize, a: f32) -> Vec<u16> {
        (0..n).map(|_| f32_to_f16(self.sym(a))).collect()
    }
    fn f32(&mut self, n: usize, a: f32) -> Vec<f32> {
        (0..n).map(|_| self.sym(a)).collect()
    }
}

// ------------------------------------------------------------------ paired buffers

/// Buffers that exist twice: on the host (16-byte aligned, for the emulator) and on the
/// device, with identical initial bytes.
struct Pair {
    host: Vec<Vec<u128>>,
    lens: Vec<usize>,
    dev: Vec<DevBuf>,
}

/// A kernel argument for both sides.
#[derive(Clone, Copy)]
enum A {
    /// buffer `id` at byte offset
    B(usize, usize),
    Null,
    U(u32),
    F(f32),
}
use A::{Null, F, U};
#[allow(non_snake_case)]
fn B(id: usize) -> A {
    A::B(id, 0)
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Bf16,
    F16,
    F32,
    /// bit-exact, element size in bytes
    Exact(usize),
}

impl Pair {
    fn new() -> Pair {
        Pair {
            host: vec![],
            lens: vec![],
            dev: vec![],
        }
    }
    fn bytes<T: Copy>(&mut self, data: &[T]) -> usize {
        let n = std::mem::size_of_val(data);
        let mut h = vec![0u128; n / 16 + 1];
        // SAFETY: plain bytes into a large enough buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr() as *const u8, h.as_mut_ptr() as *mut u8, n)
        };
        let d = dev().upload(data).unwrap();
        self.host.push(h);
        self.lens.push(n);
        self.dev.push(d);
        self.host.len() - 1
    }
    /// An output of `n` elements of `elem` bytes, poisoned with 0xFF.
    fn out(&mut self, n: usize, elem: usize) -> usize {
        self.bytes(&vec![0xFFu8; n * elem])
    }
    /// Host pointer of buffer `id` (for the emulator).
    fn h<T>(&self, id: usize) -> *mut T {
        self.host[id].as_ptr() as *mut T
    }
    fn hat<T>(&self, id: usize, elems: usize) -> *mut T {
        // SAFETY: callers stay in bounds
        unsafe { (self.host[id].as_ptr() as *mut T).add(elems) }
    }
    fn host_bytes(&self, id: usize) -> &[u8] {
        // SAFETY: lens[id] bytes were allocated
        unsafe { std::slice::from_raw_parts(self.host[id].as_ptr() as *const u8, self.lens[id]) }
    }
    fn gpu(&self, name: &str, grid: [u32; 3], block: u32, args: &[A]) {
        let args: Vec<Arg> = args
            .iter()
            .map(|a| match *a {
                A::B(id, off) => Arg::Ptr(self.dev[id].at(off)),
                Null => Arg::Ptr(0),
                U(v) => Arg::U32(v),
                F(v) => Arg::F32(v),
            })
            .collect();
        // SAFETY: argument lists mirror the kernel signatures (and the emulator call)
        unsafe { dev().launch(name, grid, block, &args) }.unwrap_or_else(|e| panic!("{e}"));
    }
    /// Compare output `id` on the GPU with the emulator's. `written(i)`: element `i`
    /// must have been written (else it must still hold the poison / initial bytes).
    fn check(&self, what: &str, id: usize, kind: Kind, written: &dyn Fn(usize) -> bool) {
        self.check_tol(what, id, kind, written, &|_| 0.0)
    }
    /// [`Pair::check`] with an extra per-element absolute tolerance `extra(i)` (added to
    /// the kind's atol + rtol·|ref|).
    fn check_tol(
        &self,
        what: &str,
        id: usize,
        kind: Kind,
        written: &dyn Fn(usize) -> bool,
        extra: &dyn Fn(usize) -> f32,
    ) {
        let g = self.dev[id].download::<u8>().unwrap();
        let h = self.host_bytes(id);
        let es = match kind {
            Kind::Bf16 | Kind::F16 => 2,
            Kind::F32 => 4,
            Kind::Exact(e) => e,
        };
        let val = |b: &[u8], i: usize| -> f32 {
            let s = &b[i * es..(i + 1) * es];
            match kind {
                Kind::Bf16 => bf16_to_f32(u16::from_le_bytes([s[0], s[1]])),
                Kind::F16 => f16_to_f32(u16::from_le_bytes([s[0], s[1]])),
                Kind::F32 => f32::from_le_bytes([s[0], s[1], s[2], s[3]]),
                Kind::Exact(_) => 0.0,
            }
        };
        let (atol, rtol) = match kind {
            Kind::Bf16 => (1e-2, 1e-2),
            Kind::F16 => (1e-3, 2e-3),
            // f32 outputs: tensor-core accumulation order/precision differs from the
            // emulator's sequential fma by a few f32 ulps per partial sum
            _ => (1e-3, 1e-3),
        };
        let n = h.len() / es;
        let (mut bad, mut first) = (0usize, None);
        for i in 0..n {
            let (gb, hb) = (&g[i * es..(i + 1) * es], &h[i * es..(i + 1) * es]);
            let ok = if !written(i) || matches!(kind, Kind::Exact(_)) {
                gb == hb
                    && (!written(i)
                        || gb.iter().any(|&b| b != 0xFF)
                        || hb.iter().any(|&b| b != 0xFF))
            } else {
                let (gv, hv) = (val(&g, i), val(h, i));
                gv.is_finite()
                    && hv.is_finite()
                    && (gv - hv).abs() <= atol + rtol * hv.abs() + extra(i)
            };
            if !ok {
                bad += 1;
                if first.is_none() {
                    first = Some(i);
                }
            }
        }
        if let Some(i) = first {
            let desc = |b: &[u8]| match kind {
                Kind::Exact(_) => format!("{:02x?}", &b[i * es..(i + 1) * es]),
                _ => format!("{}", val(b, i)),
            };
            panic!(
                "{what}: {bad}/{n} elements wrong; first at {i} (written: {}): gpu {} emulator/reference {}",
                written(i),
                desc(&g),
                desc(h)
            );
        }
    }
}

fn all(_: usize) -> bool {
    true
}

// ------------------------------------------------------------------ reshard copy

/// `reshard_copy2d` on random regions (misaligned starts, mutually misaligned
/// src/dst, all element sizes, long rows spanning several 8 KiB segments) against a
/// byte-exact CPU copy; bytes outside the region must keep their poison.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_reshard_copy2d() {
    let _ = GPU;
    let mut rng = Rng::new("gpu_reshard_copy2d");
    let sms = dev().sm_count().unwrap();
    for case in 0..16 {
        let elem = [2usize, 4, 2, 1][case % 4].max(2);
        let rows = rng.pick(&[1usize, 3, 17, 64]);
        let cols = rng.pick(&[1usize, 7, 64, 255, 1000, 5000, 20000]);
        let src_stride = cols + rng.pick(&[0usize, 0, 1, 5, 64]);
        let dst_stride = cols + rng.pick(&[0usize, 0, 3, 8]);
        let (so, dof) = (rng.range(0, 37), rng.range(0, 37));
        let src: Vec<u8> = (0..(so + rows * src_stride) * elem)
            .map(|_| rng.next() as u8)
            .collect();
        let dst_len = (dof + rows * dst_stride) * elem + 16;
        let s = dev().upload(&src).unwrap();
        let d = dev().alloc_poisoned(dst_len, 0xA5).unwrap();
        let items = rows * (cols * elem).div_ceil(8192);
        let grid = (items.div_ceil(4) as u32).clamp(1, 8 * sms);
        let args = [
            Arg::Ptr(d.ptr()),
            Arg::U64(dof as u64),
            Arg::U64(dst_stride as u64),
            Arg::Ptr(s.ptr()),
            Arg::U64(so as u64),
            Arg::U64(src_stride as u64),
            Arg::U32(rows as u32),
            Arg::U32(cols as u32),
            Arg::U32(elem as u32),
        ];
        unsafe { dev().launch("reshard_copy2d", [grid, 1, 1], 128, &args) }.unwrap();
        let got = d.download::<u8>().unwrap();
        let mut want = vec![0xA5u8; dst_len];
        for r in 0..rows {
            let (a, b) = ((so + r * src_stride) * elem, (dof + r * dst_stride) * elem);
            want[b..b + cols * elem].copy_from_slice(&src[a..a + cols * elem]);
        }
        if got != want {
            let i = got.iter().zip(&want).position(|(a, b)| a != b).unwrap();
            panic!("copy2d elem {elem} rows {rows} cols {cols} strides {src_stride}/{dst_stride} offs {so}/{dof}: first diff at byte {i}");
        }
    }
}

/// `reshard_copy2d_batched`: pack a head slice of paged KV blocks into a send buffer
/// and unpack it into blocks with fewer heads (as the KV reshard does), byte-exact.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_reshard_copy2d_batched_kv_heads() {
    let mut rng = Rng::new("gpu_reshard_batched");
    for _ in 0..4 {
        let (bs, kvh, hd) = (
            rng.pick(&[16usize, 32]),
            rng.range(2, 8),
            rng.pick(&[64usize, 128, 40]),
        );
        let nblocks = rng.range(1, 300);
        let h0 = rng.range(0, kvh - 1);
        let h1 = rng.range(h0 + 1, kvh);
        let nh = h1 - h0;
        let e = 2usize;
        let src: Vec<u16> = (0..nblocks * bs * kvh * hd)
            .map(|_| rng.next() as u16)
            .collect();
        let s = dev().upload(&src).unwrap();
        let packed = dev()
            .alloc_poisoned(nblocks * bs * nh * hd * e, 0xFF)
            .unwrap();
        let descs: Vec<u64> = (0..nblocks)
            .flat_map(|b| {
                [
                    packed.at(b * bs * nh * hd * e),
                    s.at((b * bs * kvh + h0) * hd * e),
                    (nh * hd * e) as u64,
                    (kvh * hd * e) as u64,
                    ((bs as u64) << 32) | (nh * hd * e) as u64,
                ]
            })
            .collect();
        let db = dev().upload(&descs).unwrap();
        let args = [Arg::Ptr(db.ptr()), Arg::U32(nblocks as u32)];
        unsafe {
            dev().launch(
                "reshard_copy2d_batched",
                [4, nblocks.min(1024) as u32, 1],
                128,
                &args,
            )
        }
        .unwrap();
        let dst = dev()
            .alloc_poisoned(nblocks * bs * nh * hd * e, 0xFF)
            .unwrap();
        let n = (bs * nh * hd * e) as u64;
        let descs2: Vec<u64> = (0..nblocks)
            .flat_map(|b| {
                [
                    dst.at(b * n as usize),
                    packed.at(b * n as usize),
                    n,
                    n,
                    (1u64 << 32) | n,
                ]
            })
            .collect();
        let db2 = dev().upload(&descs2).unwrap();
        let args = [Arg::Ptr(db2.ptr()), Arg::U32(nblocks as u32)];
        unsafe { dev().launch("reshard_copy2d_batched", [2, 7, 1], 128, &args) }.unwrap();
        let got = dst.download::<u16>().unwrap();
        for b in 0..nblocks {
            for sl in 0..bs {
                for h in 0..nh {
                    for d in 0..hd {
                        let want = src[((b * bs + sl) * kvh + h0 + h) * hd + d];
                        assert_eq!(
                            got[((b * bs + sl) * nh + h) * hd + d],
                            want,
                            "block {b} slot {sl} head {h} d {d}"
                        );
                    }
                }
            }
        }
    }
}

// ------------------------------------------------------------------ GEMM

struct Gemm {
    m: usize,
    n: usize,
    k: usize,
    ldx: usize,
    ldy: usize,
}

/// One GEMM kernel (decode, mma or wgmma; plain, f32-out or SiLU) on GPU and emulator,
/// launched with `block` threads (mma: 128; wide mma: `MMA_WIDE_BM` = 256, wgmma:
/// `WG_THREADS` = 256, both with their dynamic shared memory; decode: `DEC_BLOCK` or
/// `DEC_BLOCK_WIDE`).
/// `kchunk > 0` (decode `gemm_decode_bf16` / `_f32out` only): split-K instead —
/// `gemm_decode_splitk_bf16` into an f32 workspace `[splits, m, n]`, grid
/// (ceil(n / 16), ceil(k / kchunk)), then `gemm_splitk_reduce_bf16` / `_f32out` with
/// block 256, grid ceil(m·n / 256), exactly as the bench launches them.
fn gemm_case(rng: &mut Rng, kernel: &str, g: Gemm, block: u32, bias: bool, res: bool, kchunk: u32) {
    let Gemm { m, n, k, ldx, ldy } = g;
    let silu = kernel.contains("silu");
    let f32out = kernel.ends_with("f32out");
    let mma = kernel.contains("mma");
    let bm = if kernel.contains("wide") {
        MMA_WIDE_BM as usize
    } else {
        128
    };
    // output columns per block (SiLU: half of them)
    let bn = if kernel.contains("wgmma") {
        WG_BN as usize
    } else {
        128
    };
    let mut p = Pair::new();
    let x = p.bytes(&rng.bf16(m * ldx, 1.0));
    let w = p.bytes(&rng.bf16(n * k, 0.5));
    let w2 = p.bytes(&rng.bf16(n * k, 0.5));
    let b = if bias {
        Some(p.bytes(&rng.bf16(n, 1.0)))
    } else {
        None
    };
    let r = if res {
        Some(p.bytes(&rng.bf16(m * ldy, 2.0)))
    } else {
        None
    };
    let y = p.out(m * ldy, if f32out { 4 } else { 2 });
    let grid = match (mma, silu) {
        (false, false) => [(n as u32).div_ceil(DEC_COLS), 1, 1],
        (false, true) => [(n as u32).div_ceil(DEC_COLS / 2), 1, 1],
        (true, false) => [n.div_ceil(bn) as u32, m.div_ceil(bm) as u32, 1],
        (true, true) => [n.div_ceil(bn / 2) as u32, m.div_ceil(bm) as u32, 1],
    };
    let dims = [
        U(m as u32),
        U(n as u32),
        U(k as u32),
        U(ldx as u32),
        U(ldy as u32),
    ];
    let opt = |o: Option<usize>| o.map(B).unwrap_or(Null);
    let mut args = vec![B(y), B(x), B(w)];
    if silu {
        // no fused norm here (gpu_decode_gemms_with_fused_norm tests it)
        args.extend([B(w2), Null, F(0.0)]);
    } else {
        args.extend([opt(b), opt(r)]);
    }
    args.extend(dims);
    let split = kchunk > 0;
    assert!(!split || (!mma && !silu), "split-K is decode-only");
    let splits = if split {
        (k as u32).div_ceil(kchunk)
    } else {
        1
    };
    let ws = p.out(if split { splits as usize * m * n } else { 1 }, 4);
    let (grid, rgrid) = if split {
        ([grid[0], splits, 1], [((m * n) as u32).div_ceil(256), 1, 1])
    } else {
        (grid, [1, 1, 1])
    };
    let reduce = if f32out {
        "gemm_splitk_reduce_bf16_f32out"
    } else {
        "gemm_splitk_reduce_bf16"
    };
    let (mu, nu, ku, ldxu, ldyu) = (m as u32, n as u32, k as u32, ldx as u32, ldy as u32);
    if split {
        let pargs = [B(ws), B(x), B(w), U(mu), U(nu), U(ku), U(ldxu), U(kchunk)];
        p.gpu("gemm_decode_splitk_bf16", grid, block, &pargs);
        let rargs = [
            B(y),
            B(ws),
            opt(b),
            opt(r),
            U(mu),
            U(nu),
            U(ldyu),
            U(splits),
        ];
        p.gpu(reduce, rgrid, 256, &rargs);
    } else {
        p.gpu(kernel, grid, block, &args);
    }
    let (yh, xh, wh, w2h) = (
        p.h::<u8>(y),
        p.h::<Bf16>(x),
        p.h::<Bf16>(w),
        p.h::<Bf16>(w2),
    );
    let bh = b
        .map(|i| p.h::<Bf16>(i) as *const Bf16)
        .unwrap_or(std::ptr::null());
    let rh = r
        .map(|i| p.h::<Bf16>(i) as *const Bf16)
        .unwrap_or(std::ptr::null());
    let (m, n, k, ldx, ldy) = (mu, nu, ku, ldxu, ldyu);
    let wsh = p.h::<f32>(ws);
    if split {
        unsafe {
            emu(grid, block, || {
                gemm_decode_splitk_bf16(wsh, xh, wh, m, n, k, ldx, kchunk)
            });
            emu(rgrid, 256, || {
                if f32out {
                    gemm_splitk_reduce_bf16_f32out(yh as _, wsh, bh, rh, m, n, ldy, splits)
                } else {
                    gemm_splitk_reduce_bf16(yh as _, wsh, bh, rh, m, n, ldy, splits)
                }
            });
        }
    } else {
        // the kernel's dynamic shared memory, as the CUDA backend passes it
        let smem = remp::kernels::dynamic_smem(kernel);
        unsafe {
            emu_dyn(grid, block, smem, || match kernel {
                "gemm_decode_bf16" => gemm_decode_bf16(yh as _, xh, wh, bh, rh, m, n, k, ldx, ldy),
                "gemm_decode_bf16_f32out" => {
                    gemm_decode_bf16_f32out(yh as _, xh, wh, bh, rh, m, n, k, ldx, ldy)
                }
                "gemm_decode_silu_bf16" => gemm_decode_silu_bf16(
                    yh as _,
                    xh,
                    wh,
                    w2h,
                    std::ptr::null(),
                    0.0,
                    m,
                    n,
                    k,
                    ldx,
                    ldy,
                ),
                "gemm_mma_bf16" => gemm_mma_bf16(yh as _, xh, wh, bh, rh, m, n, k, ldx, ldy),
                "gemm_mma_bf16_f32out" => {
                    gemm_mma_bf16_f32out(yh as _, xh, wh, bh, rh, m, n, k, ldx, ldy)
                }
                "gemm_mma_silu_bf16" => gemm_mma_silu_bf16(yh as _, xh, wh, w2h, m, n, k, ldx, ldy),
                "gemm_mma_wide_bf16" => {
                    gemm_mma_wide_bf16(yh as _, xh, wh, bh, rh, m, n, k, ldx, ldy)
                }
                "gemm_mma_wide_bf16_f32out" => {
                    gemm_mma_wide_bf16_f32out(yh as _, xh, wh, bh, rh, m, n, k, ldx, ldy)
                }
                "gemm_mma_wide_silu_bf16" => {
                    gemm_mma_wide_silu_bf16(yh as _, xh, wh, w2h, m, n, k, ldx, ldy)
                }
                "gemm_wgmma_bf16" => gemm_wgmma_bf16(yh as _, xh, wh, bh, rh, m, n, k, ldx, ldy),
                "gemm_wgmma_bf16_f32out" => {
                    gemm_wgmma_bf16_f32out(yh as _, xh, wh, bh, rh, m, n, k, ldx, ldy)
                }
                "gemm_wgmma_silu_bf16" => {
                    gemm_wgmma_silu_bf16(yh as _, xh, wh, w2h, m, n, k, ldx, ldy)
                }
                _ => unreachable!(),
            })
        };
    }
    let what = format!(
        "{kernel} m {m} n {n} k {k} ldx {ldx} ldy {ldy} bias {bias} res {res} kchunk {kchunk}"
    );
    let written = |i: usize| (i % ldy as usize) < n as usize;
    if split {
        // every partial written; f32 tolerance plus the tensor-core allowance of the whole
        // dot product (an upper bound for each split's share)
        let (xb, wb) = (p.h::<u16>(x), p.h::<u16>(w));
        let (mz, nz, kz, ldxz) = (m as usize, n as usize, k as usize, ldx as usize);
        let mut tol = vec![0f32; splits as usize * mz * nz];
        for i in 0..mz {
            for j in 0..nz {
                let mut s = 0f64;
                for kk in 0..kz {
                    // SAFETY: in bounds of the uploaded x [m, ldx], W [n, k]
                    s += unsafe {
                        (bf16_to_f32(*xb.add(i * ldxz + kk)) as f64
                            * bf16_to_f32(*wb.add(j * kz + kk)) as f64)
                            .abs()
                    };
                }
                for sp in 0..splits as usize {
                    tol[(sp * mz + i) * nz + j] = (s / 65536.0) as f32;
                }
            }
        }
        p.check_tol(&format!("{what} (partials)"), ws, Kind::F32, &all, &|i| {
            tol[i]
        });
    }
    if f32out || (!silu && (bias || res)) {
        // Both GEMM paths accumulate on tensor cores (`mma.sync`), whose f32
        // accumulation is not bit-IEEE on Hopper: products and partial sums are aligned
        // and truncated inside the unit in an order the emulator's exact per-element
        // f32 sums do not reproduce. The difference is a few f32 ulps of the *partial
        // sums*, so it scales with S = Σ_k |x_k·w_k| of the element (not with |y|,
        // which cancellation can make tiny): allow 2^-16·S. With a bias or residual the
        // epilogue rounds `acc (+ bias)` to bf16 like PyTorch, and a tiny accumulator
        // difference can flip that rounding: one bf16 ulp of the rounded value v =
        // acc + bias (≤ 2^-7·|v|, |v| from an f64 dot product) is then also allowed.
        // A layout/indexing bug is O(S). bf16 outputs with a bias or residual get the
        // same flip allowance on top of their tolerance: when the residual cancels
        // most of v, one ulp of v is several of the output's (run 7: v in [2, 4),
        // output 0.5, off by 2^-6 = one ulp of v, under compute-sanitizer's seed).
        let (xb, wb) = (p.h::<u16>(x), p.h::<u16>(w));
        let bv = b.map(|i| p.h::<u16>(i));
        let (m, n, k, ldx, ldy) = (
            m as usize,
            n as usize,
            k as usize,
            ldx as usize,
            ldy as usize,
        );
        let mut tol = vec![0f32; m * ldy];
        for i in 0..m {
            for j in 0..n {
                // SAFETY: in bounds of the uploaded x [m, ldx], W [n, k], bias [n]
                let (mut s, mut dot) = (0f64, 0f64);
                for kk in 0..k {
                    // SAFETY: see above
                    let t = unsafe {
                        bf16_to_f32(*xb.add(i * ldx + kk)) as f64
                            * bf16_to_f32(*wb.add(j * k + kk)) as f64
                    };
                    s += t.abs();
                    dot += t;
                }
                // SAFETY: see above
                let bias_v = bv
                    .map(|bp| unsafe { bf16_to_f32(*bp.add(j)) as f64 })
                    .unwrap_or(0.0);
                let tc = s / 65536.0;
                let flip = if bias || res {
                    ((dot + bias_v).abs() + tc) / 128.0
                } else {
                    0.0
                };
                tol[i * ldy + j] = (tc + flip) as f32;
            }
        }
        let kind = if f32out { Kind::F32 } else { Kind::Bf16 };
        p.check_tol(&what, y, kind, &written, &|i| tol[i]);
    } else {
        p.check(&what, y, Kind::Bf16, &written);
    }
}

/// Decode GEMMs (M 1..16, aligned and scalar-fallback K, bias/residual epilogues,
/// SiLU·mul) against the emulator.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_gemm_decode() {
    let mut rng = Rng::new("gpu_gemm_decode");
    for kernel in [
        "gemm_decode_bf16",
        "gemm_decode_bf16_f32out",
        "gemm_decode_silu_bf16",
    ] {
        // (M, K, block): the wide block on an aligned and a scalar-path shape; K = 2312
        // spans several 4-chunk iterations of the tensor-core loop plus a tail
        for &(m, k, block) in &[
            (1usize, 512usize, DEC_BLOCK),
            (5, 520, DEC_BLOCK_WIDE),
            (16, 264, DEC_BLOCK),
            (3, 77, DEC_BLOCK_WIDE),
            (2, 2312, DEC_BLOCK),
            (9, 2312, DEC_BLOCK_WIDE),
        ] {
            let n = rng.range(60, 300);
            let ldx = k + rng.pick(&[0usize, 8, 3]);
            let ldy = n + rng.pick(&[0usize, 5]);
            let (bias, res) = (rng.next().is_multiple_of(2), rng.next().is_multiple_of(2));
            gemm_case(
                &mut rng,
                kernel,
                Gemm { m, n, k, ldx, ldy },
                block,
                bias,
                res,
                0,
            );
        }
    }
}

/// Split-K decode GEMM (partials kernel into an f32 `[splits, m, n]` workspace, then
/// the ordered reduce with the bias / residual / output epilogue) against the emulator:
/// aligned (tensor-core) and scalar-fallback K, ragged last split, both block sizes,
/// bf16 and f32 out, and the plan `dec_splitk` picks for a decode shape on this GPU.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_gemm_decode_split_k() {
    let mut rng = Rng::new("gpu_gemm_decode_split_k");
    let sms = dev().sm_count().unwrap();
    for kernel in ["gemm_decode_bf16", "gemm_decode_bf16_f32out"] {
        // (M, K, kchunk, block)
        for &(m, k, kchunk, block) in &[
            (1usize, 2048usize, 512u32, DEC_BLOCK),
            (5, 1000, 256, DEC_BLOCK_WIDE),
            (16, 2312, 1024, DEC_BLOCK),
            (3, 77, 24, DEC_BLOCK),
            (9, 520, 136, DEC_BLOCK_WIDE),
        ] {
            let n = rng.range(60, 300);
            let ldx = k + rng.pick(&[0usize, 8, 3]);
            let ldy = n + rng.pick(&[0usize, 5]);
            let (bias, res) = (rng.next().is_multiple_of(2), rng.next().is_multiple_of(2));
            gemm_case(
                &mut rng,
                kernel,
                Gemm { m, n, k, ldx, ldy },
                block,
                bias,
                res,
                kchunk,
            );
        }
    }
    // the host's plan for a small-N decode shape (K 4096: the emulator stays quick)
    let (m, n, k) = (4usize, 256usize, 4096usize);
    let (splits, kchunk) = dec_splitk(n as u32, k as u32, sms);
    assert!(splits > 1, "{n}x{k} on {sms} SMs should split");
    let block = dec_block((n as u32).div_ceil(DEC_COLS) * splits, sms);
    let g = Gemm {
        m,
        n,
        k,
        ldx: k,
        ldy: n,
    };
    gemm_case(&mut rng, "gemm_decode_bf16", g, block, true, true, kchunk);
}

/// Tensor-core GEMMs with ragged M/N/K tails, against the emulator (which reproduces
/// the `mma.sync` / `ldmatrix` fragment layouts).
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_gemm_mma() {
    tensor_core_cases(
        "gpu_gemm_mma",
        &[
            "gemm_mma_bf16",
            "gemm_mma_bf16_f32out",
            "gemm_mma_silu_bf16",
        ],
        &[(128, 128, 256), (130, 200, 264), (37, 136, 96)],
        128,
    );
}

/// Every kernel of a tensor-core family on every shape, with random padded strides and
/// a random choice of bias and residual per case.
fn tensor_core_cases(seed: &str, kernels: &[&str], shapes: &[(usize, usize, usize)], block: u32) {
    let mut rng = Rng::new(seed);
    for kernel in kernels {
        for &(m, n, k) in shapes {
            let ldx = k + rng.pick(&[0usize, 8]);
            let ldy = n + rng.pick(&[0usize, 3]);
            let (bias, res) = (rng.next().is_multiple_of(2), rng.next().is_multiple_of(2));
            gemm_case(
                &mut rng,
                kernel,
                Gemm { m, n, k, ldx, ldy },
                block,
                bias,
                res,
                0,
            );
        }
    }
}

/// The wide tensor-core GEMMs (256x128 block tiles, 8 warps, 4-stage `cp.async` ring in
/// 96 KiB of dynamic shared memory, grouped rasterization) against the emulator: ragged
/// M/N/K tails, K over the 4 stages, and 9 block rows (more than a rasterization group
/// of 8, the last group short) with several column blocks.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_gemm_mma_wide() {
    tensor_core_cases(
        "gpu_gemm_mma_wide",
        &[
            "gemm_mma_wide_bf16",
            "gemm_mma_wide_bf16_f32out",
            "gemm_mma_wide_silu_bf16",
        ],
        &[
            (256, 128, 256),
            (300, 200, 264),
            (37, 136, 96),
            (2100, 300, 64),
        ],
        MMA_WIDE_BM,
    );
}

/// The wide kernels against `gemm_mma_*` on the GPU, bit for bit, on a larger shape
/// (grouped rasterization over 9 block rows, 33 K stages, bias + in-place residual,
/// bf16 / f32 / SiLU outputs): for each output both run the same `mma.sync` sequence
/// (k16 steps in K order from zero accumulators, BK 32 in both, same fragments) and the
/// same epilogue, so any difference is a tile-mapping or pipeline bug.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_gemm_mma_wide_equals_mma() {
    let mut rng = Rng::new("gpu_gemm_mma_wide_equals_mma");
    let (m, n, k) = (2100usize, 520usize, 1056usize);
    let (ldx, ldy) = (k + 8, n + 3);
    let x = dev().upload(&rng.bf16(m * ldx, 1.0)).unwrap();
    let w = dev().upload(&rng.bf16(n * k, 0.5)).unwrap();
    let w2 = dev().upload(&rng.bf16(n * k, 0.5)).unwrap();
    let bias = dev().upload(&rng.bf16(n, 1.0)).unwrap();
    let res = rng.bf16(m * ldy, 2.0);
    for (old, wide, elem) in [
        ("gemm_mma_bf16", "gemm_mma_wide_bf16", 2usize),
        ("gemm_mma_bf16_f32out", "gemm_mma_wide_bf16_f32out", 4),
        ("gemm_mma_silu_bf16", "gemm_mma_wide_silu_bf16", 2),
    ] {
        let silu = old.contains("silu");
        let mut outs = vec![];
        for (name, bm, block) in [
            (old, 128usize, 128u32),
            (wide, MMA_WIDE_BM as usize, MMA_WIDE_BM),
        ] {
            // bf16 out: in place over the residual; f32 out: a separate bf16 residual;
            // SiLU: no residual, y poisoned
            let resb = dev().upload(&res).unwrap();
            let y = if elem == 2 && !silu {
                dev().upload(&res).unwrap()
            } else {
                dev().alloc_poisoned(m * ldy * elem, 0xFF).unwrap()
            };
            let r = if elem == 2 { y.ptr() } else { resb.ptr() };
            let mut args = vec![Arg::Ptr(y.ptr()), Arg::Ptr(x.ptr()), Arg::Ptr(w.ptr())];
            if silu {
                args.push(Arg::Ptr(w2.ptr()));
            } else {
                args.extend([Arg::Ptr(bias.ptr()), Arg::Ptr(r)]);
            }
            args.extend([m, n, k, ldx, ldy].map(|v| Arg::U32(v as u32)));
            let cols = if silu { 64 } else { 128 };
            let grid = [n.div_ceil(cols) as u32, m.div_ceil(bm) as u32, 1];
            unsafe { dev().launch(name, grid, block, &args) }.unwrap_or_else(|e| panic!("{e}"));
            outs.push(y.download::<u8>().unwrap());
        }
        let es = elem;
        let diff = (0..m * ldy).find(|&i| {
            i % ldy < n && outs[0][i * es..(i + 1) * es] != outs[1][i * es..(i + 1) * es]
        });
        if let Some(i) = diff {
            panic!(
                "{wide} differs from {old} at element {i} (row {}, col {}): {:02x?} vs {:02x?}",
                i / ldy,
                i % ldy,
                &outs[1][i * es..(i + 1) * es],
                &outs[0][i * es..(i + 1) * es]
            );
        }
        let poison = (0..m * ldy)
            .filter(|&i| i % ldy < n)
            .any(|i| outs[1][i * es..(i + 1) * es].iter().all(|&b| b == 0xFF));
        assert!(!poison, "{wide}: an output left unwritten");
    }
}

/// The sm_90a wgmma GEMMs (128x256 block tiles, two warpgroups, m64n256k16 from
/// 128-byte-swizzled shared memory through matrix descriptors, 4-stage `cp.async` ring,
/// 193 KiB of dynamic shared memory) against the emulator (which reproduces descriptor
/// addressing, swizzle and accumulator fragments), with the mma tests' tolerances:
/// ragged M/N/K tails, K over the ring twice, 9 block rows (more than a rasterization
/// group) with two column blocks; then a larger f32-out case against f64. Only on
/// compute capability 9.0 (the sm_90a module); skipped with a message elsewhere.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_gemm_wgmma() {
    if dev().compute_capability() != (9, 0) {
        let (a, b) = dev().compute_capability();
        eprintln!(
            "gpu_gemm_wgmma: skipped: wgmma needs sm_90a (compute capability 9.0), this is {a}.{b}"
        );
        return;
    }
    assert_eq!(
        dev().arch(),
        remp::kernels::Arch::Sm90a,
        "compute capability 9.0 but the sm_90a module is not loaded (its load failed: see the warning above)"
    );
    tensor_core_cases(
        "gpu_gemm_wgmma",
        &[
            "gemm_wgmma_bf16",
            "gemm_wgmma_bf16_f32out",
            "gemm_wgmma_silu_bf16",
        ],
        &[
            (128, 256, 256),
            (130, 300, 264),
            (37, 136, 96),
            (200, 260, 648),
            (1100, 300, 128),
        ],
        WG_THREADS,
    );
    large_vs_f64(
        "gpu_gemm_wgmma_large",
        "gemm_wgmma_bf16_f32out",
        WG_BM,
        WG_BN,
        WG_THREADS,
    );
}

/// A larger tensor-core GEMM (many blocks, long K pipeline) against a plain f64 dot
/// product on the CPU: f32-out, so only accumulation order/precision differs (tolerance
/// 2e-3 + 1e-3·|y| for sums of 1024 products of magnitude ≤ 0.5; a layout bug is O(1)).
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_gemm_mma_large_vs_f64() {
    large_vs_f64("gpu_gemm_mma_large", "gemm_mma_bf16_f32out", 128, 128, 128);
}

/// `kernel` (an f32-out tensor-core GEMM with `bm` x `bn` block tiles and `block`
/// threads) on 384x520x1024 against f64; see `gpu_gemm_mma_large_vs_f64`.
fn large_vs_f64(seed: &str, kernel: &str, bm: u32, bn: u32, block: u32) {
    let mut rng = Rng::new(seed);
    let (m, n, k) = (384usize, 520usize, 1024usize);
    let x = rng.bf16(m * k, 1.0);
    let w = rng.bf16(n * k, 0.5);
    let (xd, wd) = (dev().upload(&x).unwrap(), dev().upload(&w).unwrap());
    let y = dev().alloc_poisoned(m * n * 4, 0xFF).unwrap();
    let args = gemm_args([y.ptr(), xd.ptr(), wd.ptr(), 0, 0], (m, n, k), (k, n));
    let grid = [
        n.div_ceil(bn as usize) as u32,
        m.div_ceil(bm as usize) as u32,
        1,
    ];
    unsafe { dev().launch(kernel, grid, block, &args) }.unwrap_or_else(|e| panic!("{e}"));
    let got = y.download::<f32>().unwrap();
    let xf: Vec<f64> = x.iter().map(|&v| bf16_to_f32(v) as f64).collect();
    let wf: Vec<f64> = w.iter().map(|&v| bf16_to_f32(v) as f64).collect();
    for i in 0..m {
        for j in 0..n {
            let want: f64 = (0..k).map(|kk| xf[i * k + kk] * wf[j * k + kk]).sum();
            let g = got[i * n + j] as f64;
            assert!(
                (g - want).abs() <= 2e-3 + 1e-3 * want.abs(),
                "{kernel}: y[{i},{j}] = {g}, want {want}"
            );
        }
    }
}

// ------------------------------------------------------------------ attention

struct Paged {
    max_blocks: usize,
    nblocks: usize,
    tables: Vec<u32>,
}

fn paged(rng: &mut Rng, ctx: &[usize], kvh: usize, d: usize, bs: usize) -> Paged {
    let max_blocks = ctx.iter().map(|c| c.div_ceil(bs)).max().unwrap().max(1);
    let nblocks = ctx.len() * max_blocks + 3;
    let mut ids: Vec<u32> = (0..nblocks as u32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.range(0, i));
    }
    let _ = (kvh, d, bs);
    Paged {
        max_blocks,
        nblocks,
        tables: ids[..ctx.len() * max_blocks].to_vec(),
    }
}

/// The signature shared by the decode attention kernels.
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

/// Paged decode attention (GQA group sizes 1–10, head dims 40–128, split-K with the
/// combine kernel and without) against the emulator.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_attn_decode() {
    gpu_decode("attn_decode_bf16", attn_decode_bf16, &[64, 128, 4096]);
}

/// The `cp.async`-pipelined decode kernel, same checks; split 100 starts splits off a
/// stage boundary (the per-slot block-table path).
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_attn_decode_pipelined() {
    gpu_decode(
        "attn_decode_pipelined_bf16",
        attn_decode_pipelined_bf16,
        &[64, 100, 4096],
    );
}

/// Decode kernel `name` (host twin `kernel`) on the GPU vs the emulator, split sizes
/// from `split_sizes`.
fn gpu_decode(name: &str, kernel: DecodeKernel, split_sizes: &[usize]) {
    let mut rng = Rng::new(&format!("gpu_{name}"));
    for case in 0..6 {
        let kvh = rng.range(1, 3);
        let group = [1usize, 4, 8, 10, 5, 2][case];
        let qh = kvh * group;
        let d = rng.pick(&[40usize, 64, 128]);
        let bs = rng.pick(&[16usize, 32]);
        let nseq = rng.range(1, 3);
        let ctx: Vec<usize> = (0..nseq).map(|_| rng.range(1, 300)).collect();
        let split_tokens = rng.pick(split_sizes);
        let splits = ctx.iter().max().unwrap().div_ceil(split_tokens);
        let c = paged(&mut rng, &ctx, kvh, d, bs);
        let q_stride = qh * d + rng.pick(&[0usize, 8]);
        let mut p = Pair::new();
        let kc = p.bytes(&rng.bf16(c.nblocks * bs * kvh * d, 1.0));
        let vc = p.bytes(&rng.bf16(c.nblocks * bs * kvh * d, 1.0));
        let q = p.bytes(&rng.bf16(nseq * q_stride, 1.0));
        let tb = p.bytes(&c.tables);
        let ctx32: Vec<u32> = ctx.iter().map(|&x| x as u32).collect();
        let cl = p.bytes(&ctx32);
        let out = p.out(nseq * qh * d, 2);
        let op = p.out(nseq * qh * splits * d, 4);
        let ml = p.out(nseq * qh * splits * 2, 4);
        let scale = 1.0 / (d as f32).sqrt();
        let grid = [(kvh * group.div_ceil(4)) as u32, nseq as u32, splits as u32];
        let cgrid = [qh as u32, nseq as u32, 1];
        let dims = [
            U(qh as u32),
            U(kvh as u32),
            U(d as u32),
            U(bs as u32),
            U(c.max_blocks as u32),
            U(q_stride as u32),
            U(split_tokens as u32),
            F(scale),
        ];
        let mut args = vec![B(out), B(op), B(ml), B(q), B(kc), B(vc), B(tb), B(cl)];
        args.extend(dims);
        p.gpu(name, grid, 128, &args);
        if splits > 1 {
            let args = [
                B(out),
                B(op),
                B(ml),
                B(cl),
                U(qh as u32),
                U(d as u32),
                U(splits as u32),
                U(split_tokens as u32),
            ];
            p.gpu("attn_decode_combine_bf16", cgrid, 128, &args);
        }
        let (o, opp, mlp) = (p.h::<Bf16>(out), p.h::<f32>(op), p.h::<f32>(ml));
        let (qp, kp, vp, tp, cp) = (
            p.h::<Bf16>(q),
            p.h::<Bf16>(kc),
            p.h::<Bf16>(vc),
            p.h::<u32>(tb),
            p.h::<u32>(cl),
        );
        unsafe {
            emu(grid, 128, || {
                kernel(
                    o,
                    opp,
                    mlp,
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
            });
            if splits > 1 {
                emu(cgrid, 128, || {
                    attn_decode_combine_bf16(
                        o,
                        opp,
                        mlp,
                        cp,
                        qh as u32,
                        d as u32,
                        splits as u32,
                        split_tokens as u32,
                    )
                });
            }
        }
        let what = format!(
            "{name} kvh {kvh} group {group} d {d} bs {bs} ctx {ctx:?} split {split_tokens}"
        );
        p.check(&what, out, Kind::Bf16, &all);
    }
}

/// KV cache write (byte-exact, a skipped padding slot) then causal varlen prefill
/// attention over the paged cache with a cached prefix, against the emulator.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_kv_write_and_attn_prefill() {
    let mut rng = Rng::new("gpu_attn_prefill");
    for case in 0..4 {
        let kvh = rng.range(1, 3);
        let group = [1usize, 3, 4, 9][case];
        let qh = kvh * group;
        let d = rng.pick(&[40usize, 64, 128]);
        let bs = 16;
        let nseq = rng.range(1, 3);
        let qlen: Vec<usize> = (0..nseq).map(|_| rng.range(1, 40)).collect();
        let ctx: Vec<usize> = qlen.iter().map(|&q| q + rng.range(0, 60)).collect();
        let c = paged(&mut rng, &ctx, kvh, d, bs);
        let stride = (qh + 2 * kvh) * d;
        let tokens: usize = qlen.iter().sum();
        let mut slots = vec![];
        let mut starts = vec![];
        let mut row = 0;
        for s in 0..nseq {
            starts.push(row as u32);
            for i in 0..qlen[s] {
                let t = ctx[s] - qlen[s] + i;
                let blk = c.tables[s * c.max_blocks + t / bs] as usize;
                slots.push((blk * bs + t % bs) as u32);
            }
            row += qlen[s];
        }
        slots.push(u32::MAX); // padding row: must be skipped
        let mut p = Pair::new();
        let qkv = p.bytes(&rng.bf16((tokens + 1) * stride, 1.0));
        let kc = p.bytes(&rng.bf16(c.nblocks * bs * kvh * d, 1.0));
        let vc = p.bytes(&rng.bf16(c.nblocks * bs * kvh * d, 1.0));
        let sl = p.bytes(&slots);
        let tb = p.bytes(&c.tables);
        let ctx32: Vec<u32> = ctx.iter().map(|&x| x as u32).collect();
        let qlen32: Vec<u32> = qlen.iter().map(|&x| x as u32).collect();
        let (cl, st, ql) = (p.bytes(&ctx32), p.bytes(&starts), p.bytes(&qlen32));
        let out = p.out(tokens * qh * d, 2);
        let wgrid = [tokens as u32 + 1, 1, 1];
        p.gpu(
            "kv_cache_write_bf16",
            wgrid,
            128,
            &[
                B(kc),
                B(vc),
                A::B(qkv, qh * d * 2),
                A::B(qkv, (qh + kvh) * d * 2),
                B(sl),
                U(kvh as u32),
                U(d as u32),
                U(stride as u32),
                U(stride as u32),
            ],
        );
        let (kp, vp) = (p.h::<Bf16>(kc), p.h::<Bf16>(vc));
        let (kin, vin) = (
            p.hat::<Bf16>(qkv, qh * d),
            p.hat::<Bf16>(qkv, (qh + kvh) * d),
        );
        let slp = p.h::<u32>(sl);
        unsafe {
            emu(wgrid, 128, || {
                kv_cache_write_bf16(
                    kp,
                    vp,
                    kin,
                    vin,
                    slp,
                    kvh as u32,
                    d as u32,
                    stride as u32,
                    stride as u32,
                )
            });
        }
        p.check("kv_cache_write K", kc, Kind::Exact(2), &all);
        p.check("kv_cache_write V", vc, Kind::Exact(2), &all);
        let scale = 1.0 / (d as f32).sqrt();
        let maxq = *qlen.iter().max().unwrap() as u32;
        let grid = [
            (kvh * group.div_ceil(4)) as u32,
            maxq.div_ceil(4),
            nseq as u32,
        ];
        let a = Prefill {
            bufs: [out, qkv, kc, vc, tb, cl, st, ql],
            dims: [qh, kvh, d, bs, c.max_blocks, stride],
            scale,
        };
        prefill_on_both(&p, "attn_prefill_bf16", attn_prefill_bf16, grid, 128, &a);
        let what = format!("attn_prefill kvh {kvh} group {group} d {d} qlen {qlen:?} ctx {ctx:?}");
        p.check(&what, out, Kind::Bf16, &all);
    }
}

/// A paged prefill launch: buffers (out, qkv, K cache, V cache, tables, ctx_lens,
/// q_starts, q_lens; `Pair` ids) and q heads, kv heads, head_dim, block size,
/// max_blocks, q stride.
struct Prefill {
    bufs: [usize; 8],
    dims: [usize; 6],
    scale: f32,
}

/// Prefill kernel `name` on the GPU and `kernel`, its host build, on the emulator, on
/// the same inputs (compared by the caller's `Pair::check`).
fn prefill_on_both(
    p: &Pair,
    name: &str,
    kernel: PrefillKernel,
    grid: [u32; 3],
    block: u32,
    a: &Prefill,
) {
    let [out, qkv, kc, vc, tb, cl, st, ql] = a.bufs;
    let [qh, kvh, d, bs, mb, stride] = a.dims.map(|v| v as u32);
    let mut args: Vec<A> = a.bufs.iter().map(|&b| B(b)).collect();
    args.extend([qh, kvh, d, bs, mb, stride].map(U));
    args.push(F(a.scale));
    p.gpu(name, grid, block, &args);
    let (o, qp, kp, vp) = (
        p.h::<Bf16>(out),
        p.h::<Bf16>(qkv),
        p.h::<Bf16>(kc),
        p.h::<Bf16>(vc),
    );
    let (tp, cp, stp, qlp) = (
        p.h::<u32>(tb),
        p.h::<u32>(cl),
        p.h::<u32>(st),
        p.h::<u32>(ql),
    );
    unsafe {
        emu(grid, block, || {
            kernel(
                o, qp, kp, vp, tp, cp, stp, qlp, qh, kvh, d, bs, mb, stride, a.scale,
            )
        });
    }
}

/// `attn_prefill_mma_bf16` (tensor-core causal prefill) on the GPU against the emulator
/// on the same inputs: several sequences with cached prefixes (chunked prefill), q_len
/// and ctx not multiples of the 64-query / 32-key tiles, GQA groups 1, 4 and 8, head_dim
/// 64 and 128, block sizes 16 and 12, a padding output row that must stay poisoned.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_attn_prefill_mma() {
    let mut rng = Rng::new("gpu_attn_prefill_mma");
    for case in 0..6 {
        let kvh = rng.range(1, 2);
        let group = [1usize, 4, 8][case % 3];
        let qh = kvh * group;
        let d = [64usize, 128][case % 2];
        let bs = rng.pick(&[16usize, 12]);
        let nseq = rng.range(2, 4);
        let qlen: Vec<usize> = (0..nseq).map(|_| rng.range(1, 300)).collect();
        let ctx: Vec<usize> = qlen
            .iter()
            .map(|&q| {
                q + if rng.range(0, 1) == 0 {
                    0
                } else {
                    rng.range(1, 500)
                }
            })
            .collect();
        let c = paged(&mut rng, &ctx, kvh, d, bs);
        let stride = (qh + 2 * kvh) * d;
        let tokens: usize = qlen.iter().sum();
        let mut starts = vec![];
        let mut row = 0;
        for &ql in &qlen {
            starts.push(row as u32);
            row += ql;
        }
        let mut p = Pair::new();
        let qkv = p.bytes(&rng.bf16((tokens + 1) * stride, 1.0));
        let kc = p.bytes(&rng.bf16(c.nblocks * bs * kvh * d, 1.0));
        let vc = p.bytes(&rng.bf16(c.nblocks * bs * kvh * d, 1.0));
        let tb = p.bytes(&c.tables);
        let ctx32: Vec<u32> = ctx.iter().map(|&x| x as u32).collect();
        let qlen32: Vec<u32> = qlen.iter().map(|&x| x as u32).collect();
        let (cl, st, ql) = (p.bytes(&ctx32), p.bytes(&starts), p.bytes(&qlen32));
        let out = p.out((tokens + 1) * qh * d, 2);
        let scale = 1.0 / (d as f32).sqrt();
        let maxq = *qlen.iter().max().unwrap() as u32;
        let grid = [qh as u32, maxq.div_ceil(FA_BM), nseq as u32];
        let a = Prefill {
            bufs: [out, qkv, kc, vc, tb, cl, st, ql],
            dims: [qh, kvh, d, bs, c.max_blocks, stride],
            scale,
        };
        prefill_on_both(
            &p,
            "attn_prefill_mma_bf16",
            attn_prefill_mma_bf16,
            grid,
            FA_THREADS,
            &a,
        );
        let what = format!(
            "attn_prefill_mma kvh {kvh} group {group} d {d} bs {bs} qlen {qlen:?} ctx {ctx:?}"
        );
        let n = tokens * qh * d;
        p.check(&what, out, Kind::Bf16, &|i| i < n);
    }
}

// ------------------------------------------------------------------ small ops

macro_rules! rms_case {
    ($p:ident, $rng:ident, $kind:expr, $gen:ident, $T:ty, $rms:ident, $addrms:ident, $es:expr) => {{
        let rows = $rng.range(1, 9);
        let cols = $rng.pick(&[64usize, 100, 4096, 5120, 8192]);
        let eps = 1e-5f32;
        let x = $p.bytes(&$rng.$gen(rows * cols, 2.0));
        let w = $p.bytes(&$rng.$gen(cols, 1.0));
        let res = $p.bytes(&$rng.$gen(rows * cols, 2.0));
        let out = $p.out(rows * cols, $es);
        let out2 = $p.out(rows * cols, $es);
        let n1 = concat!(stringify!($rms));
        let n2 = concat!(stringify!($addrms));
        let grid = [rows as u32, 1, 1];
        // RMSNorm at the engine's block for hidden >= 2048 (`row_threads`: 1024), the
        // fused add + norm at 128.
        $p.gpu(
            n1,
            grid,
            1024,
            &[B(out), B(x), B(w), U(cols as u32), F(eps)],
        );
        $p.gpu(
            n2,
            grid,
            128,
            &[B(out2), B(res), B(x), B(w), U(cols as u32), F(eps)],
        );
        let (o, o2, xp, wp, rp) = (
            $p.h::<$T>(out),
            $p.h::<$T>(out2),
            $p.h::<$T>(x),
            $p.h::<$T>(w),
            $p.h::<$T>(res),
        );
        unsafe {
            emu(grid, 1024, || $rms(o, xp, wp, cols as u32, eps));
            emu(grid, 128, || $addrms(o2, rp, xp, wp, cols as u32, eps));
        }
        $p.check(&format!("{n1} rows {rows} cols {cols}"), out, $kind, &all);
        $p.check(
            &format!("{n2} out rows {rows} cols {cols}"),
            out2,
            $kind,
            &all,
        );
        $p.check(
            &format!("{n2} residual rows {rows} cols {cols}"),
            res,
            $kind,
            &all,
        );
    }};
}

/// RMSNorm and fused residual-add + RMSNorm, bf16 / f16 / f32.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_rmsnorm() {
    let mut rng = Rng::new("gpu_rmsnorm");
    let mut p = Pair::new();
    rms_case!(
        p,
        rng,
        Kind::Bf16,
        bf16,
        Bf16,
        rmsnorm_bf16,
        add_rmsnorm_bf16,
        2
    );
    rms_case!(p, rng, Kind::F16, f16, F16, rmsnorm_f16, add_rmsnorm_f16, 2);
    rms_case!(p, rng, Kind::F32, f32, f32, rmsnorm_f32, add_rmsnorm_f32, 4);
}

/// RoPE in place on strided q and k (a fused qkv row), positions up to 200k, Llama 3
/// scaled frequencies: sin/cos use the GPU's approximate functions after an f64 range
/// reduction, so the tolerance is the bf16 one (f32: 1e-3 relative).
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_rope() {
    let mut rng = Rng::new("gpu_rope");
    for (kind, name) in [(Kind::Bf16, "rope_bf16"), (Kind::F32, "rope_f32")] {
        let d = rng.pick(&[64usize, 128]);
        let (qh, kh) = (rng.range(1, 8), rng.range(1, 4));
        let tokens = rng.range(1, 20);
        let stride = (qh + 2 * kh) * d;
        let inv = llama3_inv_freq(d, 500000.0, 8.0, 1.0, 4.0, 8192.0);
        let pos: Vec<u32> = (0..tokens)
            .map(|_| rng.pick(&[0u32, 1, 17, 4095, 131071, 200000]) + rng.range(0, 9) as u32)
            .collect();
        let mut p = Pair::new();
        let es = if matches!(kind, Kind::F32) { 4 } else { 2 };
        let qkv = if es == 4 {
            p.bytes(&rng.f32(tokens * stride, 1.0))
        } else {
            p.bytes(&rng.bf16(tokens * stride, 1.0))
        };
        let (pp, ip) = (p.bytes(&pos), p.bytes(&inv));
        let grid = [tokens as u32, 1, 1];
        let args = [
            B(qkv),
            A::B(qkv, qh * d * es),
            B(pp),
            B(ip),
            U(qh as u32),
            U(kh as u32),
            U(d as u32),
            U(stride as u32),
            U(stride as u32),
        ];
        p.gpu(name, grid, 128, &args);
        let (posp, invp) = (p.h::<u32>(pp), p.h::<f32>(ip));
        unsafe {
            if es == 4 {
                let (q, k) = (p.h::<f32>(qkv), p.hat::<f32>(qkv, qh * d));
                emu(grid, 128, || {
                    rope_f32(
                        q,
                        k,
                        posp,
                        invp,
                        qh as u32,
                        kh as u32,
                        d as u32,
                        stride as u32,
                        stride as u32,
                    )
                });
            } else {
                let (q, k) = (p.h::<Bf16>(qkv), p.hat::<Bf16>(qkv, qh * d));
                emu(grid, 128, || {
                    rope_bf16(
                        q,
                        k,
                        posp,
                        invp,
                        qh as u32,
                        kh as u32,
                        d as u32,
                        stride as u32,
                        stride as u32,
                    )
                });
            }
        }
        p.check(
            &format!("{name} d {d} qh {qh} kh {kh} pos {pos:?}"),
            qkv,
            kind,
            &all,
        );
    }
}

/// SiLU·mul over a fused [gate | up] row, residual add (in place), embedding lookup
/// (vocab-parallel shard, out-of-shard ids give zeros; byte-exact).
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_silu_residual_embedding() {
    let mut rng = Rng::new("gpu_small");
    let mut p = Pair::new();
    // silu_mul
    let (rows, cols) = (rng.range(1, 9), rng.pick(&[100usize, 1000, 14336]));
    let gu = p.bytes(&rng.bf16(rows * 2 * cols, 4.0));
    let out = p.out(rows * (cols + 3), 2);
    let args = [
        B(out),
        B(gu),
        A::B(gu, cols * 2),
        U(rows as u32),
        U(cols as u32),
        U(2 * cols as u32),
        U(cols as u32 + 3),
    ];
    p.gpu("silu_mul_bf16", [64, 1, 1], 128, &args);
    let (o, g, u) = (p.h::<Bf16>(out), p.h::<Bf16>(gu), p.hat::<Bf16>(gu, cols));
    unsafe {
        emu([64, 1, 1], 128, || {
            silu_mul_bf16(
                o,
                g,
                u,
                rows as u32,
                cols as u32,
                2 * cols as u32,
                cols as u32 + 3,
            )
        })
    };
    p.check(
        &format!("silu_mul rows {rows} cols {cols}"),
        out,
        Kind::Bf16,
        &|i| i % (cols + 3) < cols,
    );
    // residual_add in place: a += b
    let n = rng.range(1, 100_000);
    let a = p.bytes(&rng.bf16(n, 2.0));
    let b = p.bytes(&rng.bf16(n, 2.0));
    p.gpu(
        "residual_add_bf16",
        [40, 1, 1],
        128,
        &[B(a), B(a), B(b), U(n as u32)],
    );
    let (ap, bp) = (p.h::<Bf16>(a), p.h::<Bf16>(b));
    unsafe { emu([40, 1, 1], 128, || residual_add_bf16(ap, ap, bp, n as u32)) };
    p.check(&format!("residual_add n {n}"), a, Kind::Bf16, &all);
    // embedding, vocab shard [vs, ve)
    let (vocab, dim) = (rng.range(100, 3000), rng.pick(&[64usize, 4096]));
    let (vs, ve) = (rng.range(0, vocab / 2), vocab);
    let table = p.bytes(&rng.bf16((ve - vs) * dim, 1.0));
    let tokens = rng.range(1, 32);
    let ids: Vec<u32> = (0..tokens)
        .map(|_| rng.range(0, vocab + 5) as u32)
        .collect();
    let idb = p.bytes(&ids);
    let emb = p.out(tokens * dim, 2);
    let grid = [tokens as u32, 1, 1];
    p.gpu(
        "embedding_bf16",
        grid,
        128,
        &[
            B(emb),
            B(table),
            B(idb),
            U(dim as u32),
            U(vs as u32),
            U(ve as u32),
        ],
    );
    let (ep, tp, ip) = (p.h::<Bf16>(emb), p.h::<Bf16>(table), p.h::<u32>(idb));
    unsafe {
        emu(grid, 128, || {
            embedding_bf16(ep, tp, ip, dim as u32, vs as u32, ve as u32)
        })
    };
    p.check(
        &format!("embedding vocab [{vs},{ve}) dim {dim} ids {ids:?}"),
        emb,
        Kind::Exact(2),
        &all,
    );
}

/// Greedy argmax (ties to the lowest index; bf16 logits make ties likely) and top-p
/// sampling: argmax is exact; a top-p draw may legitimately differ only when the
/// uniform falls within exp-approximation error of a bucket edge, so at most one row
/// in the batch may differ.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_argmax_top_p() {
    let mut rng = Rng::new("gpu_sampling");
    let mut p = Pair::new();
    let rows = rng.range(1, 16);
    let vocab = rng.pick(&[1000usize, 32000, 128256]);
    let lb = p.bytes(&rng.bf16(rows * vocab, 8.0));
    let lf = p.bytes(&rng.f32(rows * vocab, 8.0));
    let (ob, of, vf) = (p.out(rows, 4), p.out(rows, 4), p.out(rows, 4));
    let grid = [rows as u32, 1, 1];
    // bf16 without values (null) at 128 threads, f32 with them at 1024 (the engine's
    // LM head: `row_threads` over a vocabulary slice of 8k or more).
    p.gpu(
        "argmax_bf16",
        grid,
        128,
        &[B(ob), Null, B(lb), U(vocab as u32)],
    );
    p.gpu(
        "argmax_f32",
        grid,
        1024,
        &[B(of), B(vf), B(lf), U(vocab as u32)],
    );
    let (obp, ofp, vfp, lbp, lfp) = (
        p.h::<u32>(ob),
        p.h::<u32>(of),
        p.h::<f32>(vf),
        p.h::<Bf16>(lb),
        p.h::<f32>(lf),
    );
    unsafe {
        emu(grid, 128, || {
            argmax_bf16(obp, std::ptr::null_mut(), lbp, vocab as u32)
        });
        emu(grid, 1024, || argmax_f32(ofp, vfp, lfp, vocab as u32));
    }
    p.check("argmax_bf16", ob, Kind::Exact(4), &all);
    p.check("argmax_f32", of, Kind::Exact(4), &all);
    p.check("argmax_f32 values", vf, Kind::Exact(4), &all);
    // top-p
    let uni: Vec<f32> = (0..rows).map(|_| rng.sym(0.5) + 0.5).collect();
    let ub = p.bytes(&uni);
    let ot = p.out(rows, 4);
    let (temp, top_p) = (rng.pick(&[0.7f32, 1.0]), rng.pick(&[0.5f32, 0.9, 1.0]));
    p.gpu(
        "top_p_sample_f32",
        grid,
        128,
        &[B(ot), B(lf), U(vocab as u32), F(temp), F(top_p), B(ub)],
    );
    let (otp, up) = (p.h::<u32>(ot), p.h::<f32>(ub));
    unsafe {
        emu(grid, 128, || {
            top_p_sample_f32(otp, lfp, vocab as u32, temp, top_p, up)
        })
    };
    let g = p.dev[ot].download::<u32>().unwrap();
    let h: Vec<u32> = unsafe { std::slice::from_raw_parts(otp, rows).to_vec() };
    assert!(
        g.iter().all(|&t| (t as usize) < vocab),
        "top-p sample out of range: {g:?}"
    );
    let differ = g.iter().zip(&h).filter(|(a, b)| a != b).count();
    assert!(
        differ <= 1,
        "top-p temp {temp} p {top_p}: gpu {g:?} emulator {h:?}"
    );
}

/// The grouped q/k/v decode GEMM equals three `gemm_decode_bf16` launches with the same
/// block size (the grouped grid's `dec_block`: it sets how many warps split K) to the bit
/// on the GPU (each of its blocks runs that kernel's code for its matrix): TinyLlama's and
/// Llama-8B's q/k/v shapes at M = 1 and 16 and a ragged small case, with biases; every
/// output written.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_gemm_decode_qkv_equals_three_launches() {
    let mut rng = Rng::new("gpu_gemm_decode_qkv");
    let sms = dev().sm_count().unwrap();
    let cases: [(usize, usize, [usize; 3]); 4] = [
        (1, 2048, [2048, 256, 256]),
        (16, 2048, [2048, 256, 256]),
        (1, 4096, [4096, 1024, 1024]),
        (5, 1000, [72, 40, 8]),
    ];
    for (m, k, ns) in cases {
        let x = dev().upload(&rng.bf16(m * k, 1.0)).unwrap();
        let up = |rng: &mut Rng, len: usize| dev().upload(&rng.bf16(len, 0.5)).unwrap();
        let ws: Vec<DevBuf> = ns.iter().map(|&n| up(&mut rng, n * k)).collect();
        let bs: Vec<DevBuf> = ns.iter().map(|&n| up(&mut rng, n)).collect();
        let out = |n: usize| dev().alloc_poisoned(m * n * 2, 0xFF).unwrap();
        let gx: u32 = ns.iter().map(|&n| (n as u32).div_ceil(DEC_COLS)).sum();
        let block = dec_block(gx, sms);
        let launch = |name: &str, grid: u32, args: &[Arg]| {
            unsafe { dev().launch(name, [grid, 1, 1], block, args) }
                .unwrap_or_else(|e| panic!("{name}: {e}"))
        };
        let mut one = vec![];
        for i in 0..3 {
            let y = out(ns[i]);
            let mut args = vec![
                Arg::Ptr(y.ptr()),
                Arg::Ptr(x.ptr()),
                Arg::Ptr(ws[i].ptr()),
                Arg::Ptr(bs[i].ptr()),
                Arg::Ptr(0),
            ];
            args.extend([m, ns[i], k, k, ns[i]].map(|v| Arg::U32(v as u32)));
            launch("gemm_decode_bf16", (ns[i] as u32).div_ceil(DEC_COLS), &args);
            one.push(y.download::<u8>().unwrap());
        }
        let ys: Vec<DevBuf> = ns.iter().map(|&n| out(n)).collect();
        let mut args: Vec<Arg> = ys.iter().map(|y| Arg::Ptr(y.ptr())).collect();
        args.push(Arg::Ptr(x.ptr()));
        args.extend(ws.iter().map(|w| Arg::Ptr(w.ptr())));
        args.extend(bs.iter().map(|b| Arg::Ptr(b.ptr())));
        args.extend([Arg::Ptr(0), Arg::F32(0.0)]); // no fused norm
        args.push(Arg::U32(m as u32));
        args.extend(ns.iter().map(|&n| Arg::U32(n as u32)));
        args.extend([Arg::U32(k as u32), Arg::U32(k as u32)]);
        launch("gemm_decode_qkv_bf16", gx, &args);
        for i in 0..3 {
            let got = ys[i].download::<u8>().unwrap();
            assert!(
                got == one[i],
                "m {m} k {k} n {ns:?}: matrix {i} differs from gemm_decode_bf16"
            );
            assert!(
                !got.chunks(2).any(|c| c == [0xFF, 0xFF]),
                "m {m} k {k} n {ns:?}: matrix {i} has an output left unwritten"
            );
        }
    }
}

/// The decode GEMMs with a fused RMSNorm (`gemm_decode_qkv_bf16` and
/// `gemm_decode_silu_bf16` given the norm weight, as the engine launches them for decode
/// steps) equal `rmsnorm_bf16` (at the engine's 1024 threads) followed by the same kernel
/// without the norm, to the bit on the GPU, on activations whose sum of squares adds
/// exactly in f32 in any order (multiples of 1/4 up to 3): the order of that sum is the
/// one thing the fusion changes (see gpu-kernels/tests/gemm_norm.rs, which also checks
/// general activations against f64 under the emulator). TinyLlama's q/k/v and gate/up
/// shapes at M = 1 and 16, Llama-8B's at M = 1, a ragged small case; every output
/// written.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_decode_gemms_with_fused_norm() {
    let mut rng = Rng::new("gpu_decode_gemms_fused_norm");
    let sms = dev().sm_count().unwrap();
    let eps = 1e-5f32;
    let cases: [(usize, usize, [usize; 3], usize); 4] = [
        (1, 2048, [2048, 256, 256], 5632),
        (16, 2048, [2048, 256, 256], 5632),
        (1, 4096, [4096, 1024, 1024], 14336),
        (5, 1000, [72, 40, 8], 90),
    ];
    for (m, k, ns, inter) in cases {
        let xs: Vec<u16> = (0..m * k)
            .map(|_| f32_to_bf16((rng.range(0, 24) as f32 - 12.0) / 4.0))
            .collect();
        let x = dev().upload(&xs).unwrap();
        let norm = dev().upload(&rng.bf16(k, 1.5)).unwrap();
        let up = |rng: &mut Rng, len: usize| dev().upload(&rng.bf16(len, 0.5)).unwrap();
        let out = |len: usize| dev().alloc_poisoned(len * 2, 0xFF).unwrap();
        let launch = |name: &str, grid: u32, block: u32, args: &[Arg]| {
            unsafe { dev().launch(name, [grid, 1, 1], block, args) }
                .unwrap_or_else(|e| panic!("{name}: {e}"))
        };
        // rmsnorm_bf16 into xn, as the engine launched it before the fusion
        let xn = out(m * k);
        let rms_args = [
            Arg::Ptr(xn.ptr()),
            Arg::Ptr(x.ptr()),
            Arg::Ptr(norm.ptr()),
            Arg::U32(k as u32),
            Arg::F32(eps),
        ];
        unsafe { dev().launch("rmsnorm_bf16", [m as u32, 1, 1], 1024, &rms_args) }
            .unwrap_or_else(|e| panic!("rmsnorm_bf16: {e}"));
        let check = |what: &str, fused: &DevBuf, unfused: &DevBuf| {
            let (a, b) = (
                fused.download::<u8>().unwrap(),
                unfused.download::<u8>().unwrap(),
            );
            assert!(
                !a.chunks(2).any(|c| c == [0xFF, 0xFF]),
                "m {m} k {k}: {what}: an output left unwritten"
            );
            assert!(
                a == b,
                "m {m} k {k}: {what}: fused differs from rmsnorm + GEMM"
            );
        };

        // q/k/v: (x, norm) against (xn, no norm)
        let ws: Vec<DevBuf> = ns.iter().map(|&n| up(&mut rng, n * k)).collect();
        let bs: Vec<DevBuf> = ns.iter().map(|&n| up(&mut rng, n)).collect();
        let gx: u32 = ns.iter().map(|&n| (n as u32).div_ceil(DEC_COLS)).sum();
        let qkv = |src: &DevBuf, norm: u64| {
            let ys: Vec<DevBuf> = ns.iter().map(|&n| out(m * n)).collect();
            let mut args: Vec<Arg> = ys.iter().map(|y| Arg::Ptr(y.ptr())).collect();
            args.push(Arg::Ptr(src.ptr()));
            args.extend(ws.iter().map(|w| Arg::Ptr(w.ptr())));
            args.extend(bs.iter().map(|b| Arg::Ptr(b.ptr())));
            args.extend([Arg::Ptr(norm), Arg::F32(eps), Arg::U32(m as u32)]);
            args.extend(ns.iter().map(|&n| Arg::U32(n as u32)));
            args.extend([Arg::U32(k as u32), Arg::U32(k as u32)]);
            launch("gemm_decode_qkv_bf16", gx, dec_block(gx, sms), &args);
            ys
        };
        let (fused, unfused) = (qkv(&x, norm.ptr()), qkv(&xn, 0));
        for i in 0..3 {
            check(&format!("qkv matrix {i}"), &fused[i], &unfused[i]);
        }

        // gate/up with SiLU·mul
        let (wg, wu) = (up(&mut rng, inter * k), up(&mut rng, inter * k));
        let gx = (inter as u32).div_ceil(DEC_COLS / 2);
        let silu = |src: &DevBuf, norm: u64| {
            let y = out(m * inter);
            let mut args = vec![
                Arg::Ptr(y.ptr()),
                Arg::Ptr(src.ptr()),
                Arg::Ptr(wg.ptr()),
                Arg::Ptr(wu.ptr()),
                Arg::Ptr(norm),
                Arg::F32(eps),
            ];
            args.extend([m, inter, k, k, inter].map(|v| Arg::U32(v as u32)));
            launch("gemm_decode_silu_bf16", gx, dec_block(gx, sms), &args);
            y
        };
        check("gate/up", &silu(&x, norm.ptr()), &silu(&xn, 0));
    }
}

/// The grouped q/k/v decode GEMM with RoPE and the KV-cache write as its epilogue
/// (`gemm_decode_qkv_rope_bf16`, with the fused RMSNorm, as the engine launches it for
/// decode steps) equals `gemm_decode_qkv_bf16` then `rope_kv_write_bf16` to the bit on
/// the GPU: rotated q rows and both caches (filled with other bytes first; one padding
/// row with slot `U32_MAX`). TinyLlama's and Llama-8B's shapes at M = 1 and 16, a
/// small ragged one.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_gemm_decode_qkv_rope_equals_qkv_then_rope_kv_write() {
    let mut rng = Rng::new("gpu_gemm_decode_qkv_rope");
    let sms = dev().sm_count().unwrap();
    let eps = 1e-5f32;
    // (m, k, q heads, kv heads, head_dim)
    let cases = [
        (1usize, 2048usize, 32usize, 4usize, 64usize),
        (16, 2048, 32, 4, 64),
        (1, 4096, 32, 8, 128),
        (5, 1000, 2, 1, 64),
    ];
    for (m, k, qh, kvh, hd) in cases {
        let (nq, nkv) = (qh * hd, kvh * hd);
        let up = |rng: &mut Rng, len: usize, a: f32| dev().upload(&rng.bf16(len, a)).unwrap();
        let x = up(&mut rng, m * k, 2.0);
        let norm = up(&mut rng, k, 1.5);
        let ns = [nq, nkv, nkv];
        let ws: Vec<DevBuf> = ns.iter().map(|&n| up(&mut rng, n * k, 0.5)).collect();
        let bs: Vec<DevBuf> = ns.iter().map(|&n| up(&mut rng, n, 1.0)).collect();
        let pos: Vec<u32> = (0..m).map(|_| rng.range(0, 4000) as u32).collect();
        let inv: Vec<f32> = (0..hd / 2)
            .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / hd as f32))
            .collect();
        let nslots = 2 * m + 3;
        let mut slots: Vec<u32> = (0..nslots as u32).collect();
        for i in (1..slots.len()).rev() {
            slots.swap(i, rng.range(0, i));
        }
        slots.truncate(m);
        if m > 1 {
            slots[rng.range(0, m - 1)] = u32::MAX;
        }
        let (pos, inv, slots) = (
            dev().upload(&pos).unwrap(),
            dev().upload(&inv).unwrap(),
            dev().upload(&slots).unwrap(),
        );
        let cache = rng.bf16(nslots * nkv, 1.0);
        let gx = ((nq + 2 * nkv) / 16) as u32;
        let block = dec_block(gx, sms);
        let launch = |name: &str, grid: u32, block: u32, args: &[Arg]| {
            unsafe { dev().launch(name, [grid, 1, 1], block, args) }
                .unwrap_or_else(|e| panic!("{name}: {e}"))
        };
        let weights = |args: &mut Vec<Arg>| {
            args.extend(ws.iter().map(|w| Arg::Ptr(w.ptr())));
            args.extend(bs.iter().map(|b| Arg::Ptr(b.ptr())));
            args.extend([Arg::Ptr(norm.ptr()), Arg::F32(eps)]);
        };
        let run = |fused: bool| {
            let q = dev().alloc_poisoned(m * nq * 2, 0xFF).unwrap();
            let (kc, vc) = (dev().upload(&cache).unwrap(), dev().upload(&cache).unwrap());
            if fused {
                let mut args = vec![Arg::Ptr(q.ptr()), Arg::Ptr(x.ptr())];
                weights(&mut args);
                args.extend([pos.ptr(), inv.ptr(), kc.ptr(), vc.ptr(), slots.ptr()].map(Arg::Ptr));
                args.extend([m, nq, nkv, k, k, hd].map(|v| Arg::U32(v as u32)));
                launch("gemm_decode_qkv_rope_bf16", gx, block, &args);
            } else {
                let kb = dev().alloc_poisoned(m * nkv * 2, 0xFF).unwrap();
                let vb = dev().alloc_poisoned(m * nkv * 2, 0xFF).unwrap();
                let mut args: Vec<Arg> = [q.ptr(), kb.ptr(), vb.ptr(), x.ptr()]
                    .map(Arg::Ptr)
                    .to_vec();
                weights(&mut args);
                args.push(Arg::U32(m as u32));
                args.extend([nq, nkv, nkv, k, k].map(|v| Arg::U32(v as u32)));
                launch("gemm_decode_qkv_bf16", gx, block, &args);
                let mut args: Vec<Arg> = [
                    q.ptr(),
                    kb.ptr(),
                    vb.ptr(),
                    pos.ptr(),
                    inv.ptr(),
                    kc.ptr(),
                    vc.ptr(),
                    slots.ptr(),
                ]
                .map(Arg::Ptr)
                .to_vec();
                args.extend([qh, kvh, hd, nq, nkv, nkv].map(|v| Arg::U32(v as u32)));
                launch("rope_kv_write_bf16", m as u32, 128, &args);
            }
            [q, kc, vc].map(|b| b.download::<u8>().unwrap())
        };
        let (want, got) = (run(false), run(true));
        let what = format!("m {m} k {k} heads {qh}/{kvh} d {hd}");
        assert!(
            !got[0].chunks(2).any(|c| c == [0xFF, 0xFF]),
            "{what}: q left unwritten"
        );
        for (i, name) in ["rotated q", "k cache", "v cache"].iter().enumerate() {
            assert!(got[i] == want[i], "{what}: {name} differs");
        }
        let before: Vec<u8> = cache.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert!(got[1] != before, "{what}: nothing was written");
    }
}

/// The register-capped decode GEMM (`gemm_decode_bf16`: all 16 loads per lane issued
/// before its mmas, see `gpu-kernels/src/maxnreg.txt`) equals the uncapped build of the
/// same code (`gemm_decode64_bf16`) to the bit on the GPU: the cap moves loads, not the
/// order of the sums. Both block sizes, M = 1, 8 and 16, ragged N and K tails, bias and
/// residual; every output written.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_gemm_decode_capped_equals_uncapped() {
    let mut rng = Rng::new("gpu_gemm_decode_capped");
    for (m, k, n, block) in [
        (1usize, 4096usize, 1024usize, 512u32),
        (8, 2048, 2560, 256),
        (16, 8192, 1000, 512),
        (3, 1032, 72, 256),
    ] {
        let x = dev().upload(&rng.bf16(m * k, 1.0)).unwrap();
        let w = dev().upload(&rng.bf16(n * k, 0.5)).unwrap();
        let b = dev().upload(&rng.bf16(n, 0.5)).unwrap();
        let r = dev().upload(&rng.bf16(m * n, 1.0)).unwrap();
        let mut outs = vec![];
        for name in ["gemm_decode_bf16", "gemm_decode64_bf16"] {
            let y = dev().alloc_poisoned(m * n * 2, 0xFF).unwrap();
            let mut args = vec![
                Arg::Ptr(y.ptr()),
                Arg::Ptr(x.ptr()),
                Arg::Ptr(w.ptr()),
                Arg::Ptr(b.ptr()),
                Arg::Ptr(r.ptr()),
            ];
            args.extend([m, n, k, k, n].map(|v| Arg::U32(v as u32)));
            let grid = [(n as u32).div_ceil(DEC_COLS), 1, 1];
            unsafe { dev().launch(name, grid, block, &args) }
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            outs.push(y.download::<u8>().unwrap());
        }
        assert!(
            outs[0] == outs[1],
            "m {m} k {k} n {n} block {block}: capped != uncapped"
        );
        assert!(
            !outs[0].chunks(2).any(|c| c == [0xFF, 0xFF]),
            "m {m} k {k} n {n}: an output left unwritten"
        );
    }
}

/// `rope_kv_write_bf16` equals `rope_bf16` then `kv_cache_write_bf16` to the bit on the
/// GPU: rotated q/k rows of a fused qkv buffer and every cache slot (GQA 32/8 heads,
/// head_dim 128, 7 tokens with scattered slots and one padding row).
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_rope_kv_write_equals_two_launches() {
    let mut rng = Rng::new("gpu_rope_kv_write");
    let (qh, kvh, d, tokens) = (32usize, 8usize, 128usize, 7usize);
    let stride = (qh + 2 * kvh) * d;
    let qkv = rng.bf16(tokens * stride, 2.0);
    let pos: Vec<u32> = (0..tokens as u32).map(|i| 17 * i + 3).collect();
    let inv: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / 500000f32.powf(2.0 * i as f32 / d as f32))
        .collect();
    let slots: Vec<u32> = vec![9, 2, u32::MAX, 15, 0, 7, 11];
    let cache = rng.bf16(16 * kvh * d, 1.0);
    let (pd, id, sd) = (
        dev().upload(&pos).unwrap(),
        dev().upload(&inv).unwrap(),
        dev().upload(&slots).unwrap(),
    );
    let run = |fused: bool| {
        let (x, kc, vc) = (
            dev().upload(&qkv).unwrap(),
            dev().upload(&cache).unwrap(),
            dev().upload(&cache).unwrap(),
        );
        let (q, k, v) = (x.ptr(), x.at(qh * d * 2), x.at((qh + kvh) * d * 2));
        let u = |n: usize| Arg::U32(n as u32);
        let launch = |name: &str, args: &[Arg]| {
            unsafe { dev().launch(name, [tokens as u32, 1, 1], 128, args) }
                .unwrap_or_else(|e| panic!("{name}: {e}"))
        };
        let (p, i, s) = (Arg::Ptr(pd.ptr()), Arg::Ptr(id.ptr()), Arg::Ptr(sd.ptr()));
        let (q, k, v, kp, vp) = (
            Arg::Ptr(q),
            Arg::Ptr(k),
            Arg::Ptr(v),
            Arg::Ptr(kc.ptr()),
            Arg::Ptr(vc.ptr()),
        );
        if fused {
            launch(
                "rope_kv_write_bf16",
                &[
                    q,
                    k,
                    v,
                    p,
                    i,
                    kp,
                    vp,
                    s,
                    u(qh),
                    u(kvh),
                    u(d),
                    u(stride),
                    u(stride),
                    u(stride),
                ],
            );
        } else {
            launch(
                "rope_bf16",
                &[q, k, p, i, u(qh), u(kvh), u(d), u(stride), u(stride)],
            );
            launch(
                "kv_cache_write_bf16",
                &[kp, vp, k, v, s, u(kvh), u(d), u(stride), u(stride)],
            );
        }
        [x, kc, vc].map(|b| b.download::<u8>().unwrap())
    };
    let (a, b) = (run(false), run(true));
    for (i, what) in ["rotated q/k rows", "k cache", "v cache"]
        .iter()
        .enumerate()
    {
        assert!(
            a[i] == b[i],
            "{what} differ between the fused and the two launches"
        );
    }
}

//! Prefill GEMM on Hopper's warpgroup tensor-core instructions (sm_90a only; compiled
//! into the sm_90a PTX module, which the host loads on compute capability 9.0, and for
//! the host emulator): `y[M, N] = x[M, K] · W[N, K]ᵀ`, same arguments, epilogues and
//! results as `gemm_mma_*` (see `gemm.rs`): `gemm_wgmma_bf16`, `_f32out`, `_silu`. 1.56x
//! `gemm_mma_bf16` at 4096³ on an H200 (70.9% of cuBLAS): the engine's prefill GEMMs on
//! devices that load the sm_90a module.
//!
//! Design:
//! - **Block tile 128x256x64, two consumer warpgroups** (256 threads). Warpgroup `wg`
//!   owns rows `64·wg ..+64` of the block tile and all 256 columns: one
//!   `wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16` per k16 step (4 per stage),
//!   128 f32 accumulators per thread. 128x256 moves 85 FLOP per byte of L2 -> SM traffic
//!   (the 128x128 mma kernel: 64), the shape CUTLASS's Hopper GEMMs use for large bf16
//!   problems.
//! - **Both operands from shared memory through matrix descriptors**, K-major (x rows
//!   and W rows are K-contiguous: no transpose), in the **128-byte swizzle** layout: a
//!   tile row is 64 bf16 = 128 bytes, 8 rows form a 1024-byte atom, and the 16-byte chunk
//!   `c` of row `r` is stored at chunk `c ^ (r % 8)`. The hardware applies that XOR to
//!   address bits 4-6 from bits 7-9, so every tile starts on a 1024-byte boundary (the
//!   ring is aligned at run time: `WGMMA_SMEM` has 1 KiB of slack). Descriptor
//!   ([`wg_desc`], PTX ISA "Matrix Descriptor Format"): start address >> 4 in bits
//!   0-13, leading byte offset 1 (unused by swizzled K-major layouts, as CUTLASS's
//!   `make_gmma_desc<Major::K>` sets it), stride byte offset 1024 >> 4 (next 8-row atom)
//!   in bits 32-45, swizzle mode 1 (128 B) in bits 62-63. The k16 step `kk` of a stage
//!   starts `32·kk` bytes into the rows (CUTLASS's `DescriptorIterator` does the same):
//!   the swizzle, applied to the full address, still finds the right chunks.
//! - **`cp.async` ring, 4 stages** of (128 + 256) rows x 128 B = 48 KiB (no TMA: it
//!   would need a tensor map built on the host). Thread `t` copies 16-byte chunk `t % 8`
//!   of rows `t / 8 + 32i` (4 A rows, 8 B rows), so its swizzled column is the same for
//!   all of them. Ragged M / N / K are zero-filled (src-size 0). Requires K % 8 == 0,
//!   ldx % 8 == 0, 16-byte-aligned x and W (traps otherwise, as `gemm_mma_*`).
//! - **Ordering**, per k-tile `kt`: `cp.async.wait_group` (tile `kt` landed, own
//!   copies) -> `fence.proxy.async.shared::cta` (cp.async writes are generic-proxy
//!   writes; wgmma reads through the async proxy) -> `bar.sync` (everyone's copies) ->
//!   issue the copies of tile `kt + 2` into the slot tile `kt - 2` used (its wgmmas
//!   were retired by every thread's previous `wait_group 1`, before this barrier) ->
//!   `wgmma.fence` -> 4 wgmma -> `commit_group` -> `wait_group 1`: one k-tile's wgmmas
//!   stay in flight while the next tile's copies and barrier are issued, two tiles of
//!   copies are in flight during the math. `wait_group 0` before the epilogue. The
//!   fence / wait primitives name the accumulators as operands so the compiler keeps
//!   every accumulator access on the right side of them.
//! - **Epilogue** straight from the accumulator fragments (PTX ISA "wgmma .m64nNk16
//!   register fragment layout for accumulator matrix D", CUTLASS `CLayout_64xN`):
//!   register `4j + i` of thread `t` in warp `w` of its warpgroup holds row
//!   `16w + (t%32)/4 + 8(i/2)`, column `8j + 2(t%4) + i%2`; bias / residual / rounding
//!   exactly as `gemm.rs`'s `store_out`. `_silu`: B rows alternate in 8-row groups
//!   between W_gate and W_up for the same outputs, so accumulator chunks `2p` and
//!   `2p + 1` hold gate and up of the same 8 columns (128 outputs per block).
//! - Grouped rasterization (`gemm::raster`, groups of 8 block rows), as the wide mma
//!   kernel.
//!
//! With 128 accumulators a thread needs 209 registers (ptx-report): one 256-thread block
//! (193 KiB of shared memory) per SM. Launch: block `WG_THREADS` (256), grid
//! (ceil(N / 256), ceil(M / 128)) (`_silu`: ceil(N / 128)), dynamic shared memory
//! `WGMMA_SMEM` bytes (`kernels::dynamic_smem`); another block size or less shared
//! memory traps. In the emulator the products are exactly the `mma.sync` path's (same
//! k16 steps in K order), so the tests compare bit for bit with `gemm_mma_*`.
// The operands as the mma kernels take them (W_up in `w2` for the gated variant).
use crate::gemm::MmaArgs as WgArgs;
use crate::gemm::{check_mma_args, raster, silu_gate, store_out};
use crate::prims::*;

/// Block rows: two consumer warpgroups of m64.
pub const WG_BM: u32 = 128;
/// Block columns (one m64n256k16 per warpgroup); `_silu`: 128 outputs (gate and up).
pub const WG_BN: u32 = 256;
/// K elements per stage: one 128-byte swizzled row.
pub const WG_BK: u32 = 64;
/// Stages of the `cp.async` ring.
pub const WG_ST: u32 = 4;
/// Block size (two warpgroups).
pub const WG_THREADS: u32 = 256;
/// Block rows per group of the grouped rasterization.
pub const WG_GROUP: u32 = 8;
const A_BYTES: u32 = WG_BM * WG_BK * 2;
const STAGE_BYTES: u32 = (WG_BM + WG_BN) * WG_BK * 2;
/// Dynamic shared memory of the `gemm_wgmma_*` kernels: 4 stages x 48 KiB, plus 1 KiB
/// so the ring can start on a 1024-byte boundary (193 KiB; within sm_90's 227 KiB).
pub const WGMMA_SMEM: u32 = WG_ST * STAGE_BYTES + 1024;

/// Matrix descriptor of a K-major bf16 tile at shared-window address `addr` (1024-byte
/// aligned, or that plus 32·kk for k16 step kk) in the 128-byte swizzle layout with
/// 1024 bytes between 8-row atoms.
#[inline(always)]
pub fn wg_desc(addr: u32) -> u64 {
    (((addr & 0x3ffff) >> 4) as u64) | (1u64 << 16) | ((1024u64 >> 4) << 32) | (1u64 << 62)
}

/// Global row of W for shared B row `r` (0..256) of the block whose first output
/// column is `n0`, and whether it exists. Gated: 8-row groups alternate between W_gate
/// and W_up for the same 8 output columns.
#[inline(always)]
unsafe fn b_row(a: &WgArgs, n0: u32, r: u32) -> (*const u16, bool) {
    if a.w2 as usize == 0 {
        let gn = n0 + r;
        (a.w.add(gn as usize * a.k as usize), gn < a.n)
    } else {
        let j = r >> 3;
        let gn = n0 + (j >> 1) * 8 + (r & 7);
        let base = if j & 1 == 0 { a.w } else { a.w2 };
        (base.add(gn as usize * a.k as usize), gn < a.n)
    }
}

/// Issues this thread's copies of K tile `kt` into ring slot `slot`: 16-byte chunk
/// `t % 8` of A rows `t / 8 + 32i` (i < 4) and B rows likewise (i < 8), swizzled,
/// zero-filled past M / N / K.
#[inline(always)]
unsafe fn load_stage(a: &WgArgs, ring: *mut u8, slot: u32, kt: u32, m0: u32, n0: u32) {
    let t = thread_idx();
    let c = t & 7;
    let r0 = t >> 3;
    // rows r0 + 32i all sit at position r0 % 8 of their 8-row atom
    let col = (c ^ (r0 & 7)) << 4;
    let sa = ring.add((slot * STAGE_BYTES) as usize);
    let sb = sa.add(A_BYTES as usize);
    let gk = kt * WG_BK + c * 8;
    let kok = gk < a.k;
    unroll!(i in 0..4 => {
        let r = r0 + 32 * i as u32;
        let row = (r * 128 + col) as usize;
        let ok = kok && m0 + r < a.m;
        let src = if ok { a.x.add((m0 + r) as usize * a.ldx as usize + gk as usize) } else { a.x };
        cp_async_16(sa.add(row), src as *const u8, if ok { 16 } else { 0 });
    });
    unroll!(i in 0..8 => {
        let r = r0 + 32 * i as u32;
        let (wrow, nok) = b_row(a, n0, r);
        let ok = kok && nok;
        let src = if ok { wrow.add(gk as usize) } else { a.w };
        cp_async_16(sb.add((r * 128 + col) as usize), src as *const u8, if ok { 16 } else { 0 });
    });
}

/// The main loop: this warpgroup's 64x256 accumulator tile in `acc` (fragment layout in
/// the module comment). `ring` is 1024-byte aligned.
#[inline(always)]
unsafe fn mainloop(a: &WgArgs, ring: *mut u8, m0: u32, n0: u32, acc: &mut WgAcc) {
    let wg = thread_idx() >> 7;
    let kt_n = div_ceil(a.k, WG_BK);
    let mut s = 0;
    while s < WG_ST - 2 {
        if s < kt_n {
            load_stage(a, ring, s, s, m0, n0);
        }
        cp_async_commit();
        s += 1;
    }
    let base = shared_addr(ring);
    let mut kt = 0;
    while kt < kt_n {
        // tile kt landed (this thread's copies; tile kt + 1 may still fly), visible to
        // the async proxy, and everyone's: after the barrier
        cp_async_wait::<{ WG_ST - 3 }>();
        fence_proxy_async();
        sync_threads();
        // the slot of tile kt - 2, whose wgmmas every thread retired before the barrier
        let pf = kt + WG_ST - 2;
        if pf < kt_n {
            load_stage(a, ring, pf % WG_ST, pf, m0, n0);
        }
        cp_async_commit();
        let sa = base + (kt % WG_ST) * STAGE_BYTES + wg * (64 * 128);
        let sb = base + (kt % WG_ST) * STAGE_BYTES + A_BYTES;
        wgmma_fence(acc);
        unroll!(kk in 0..4 => {
            let off = kk as u32 * 32;
            wgmma_m64n256k16_bf16(acc, wg_desc(sa + off), wg_desc(sb + off), true);
        });
        wgmma_commit();
        wgmma_wait::<1>(acc);
        kt += 1;
    }
    wgmma_wait::<0>(acc);
    cp_async_wait::<0>();
}

/// The ring: the launch's dynamic shared memory from its first 1024-byte boundary;
/// traps unless the block has `WG_THREADS` threads and the launch gave `WGMMA_SMEM`.
#[inline(always)]
unsafe fn ring() -> *mut u8 {
    if block_dim() != WG_THREADS {
        trap();
    }
    let p = dynamic_shared(WGMMA_SMEM);
    let pad = (1024 - (shared_addr(p) & 1023)) & 1023;
    p.add(pad as usize)
}

/// Row and column of this thread's first accumulator in the block tile at (`m0`, `n0`):
/// warpgroup `t / 128` owns 64 rows, its warp `(t / 32) % 4` 16 of them, a lane rows
/// `lane / 4` (+ 8) and columns `2 (lane % 4)` (+ 1) of each n8 slice (the wgmma m64
/// accumulator layout). Accumulator `4 j + i` is at row + 8 (i / 2), col + 8 j + i % 2.
#[inline(always)]
fn acc_origin(m0: u32, n0: u32) -> (u32, u32) {
    let t = thread_idx();
    let lane = t & 31;
    (
        m0 + (t >> 7) * 64 + ((t >> 5) & 3) * 16 + (lane >> 2),
        n0 + (lane & 3) * 2,
    )
}

#[inline(always)]
fn tile() -> (u32, u32) {
    raster(
        block_idx_x(),
        block_idx_y(),
        grid_dim_x(),
        grid_dim_y(),
        WG_GROUP,
    )
}

#[inline(always)]
unsafe fn gemm_wgmma<O: Elem>(
    y: *mut O,
    x: *const Bf16,
    w: *const Bf16,
    bias: *const Bf16,
    residual: *const Bf16,
    m: u32,
    n: u32,
    k: u32,
    ldx: u32,
    ldy: u32,
) {
    check_mma_args(x, w, k, ldx);
    let ring = ring();
    let a = WgArgs {
        x: x as *const u16,
        w: w as *const u16,
        w2: 0 as *const u16,
        m,
        n,
        k,
        ldx,
    };
    let (bx, by) = tile();
    let (n0, m0) = (bx * WG_BN, by * WG_BM);
    let mut acc = wg_acc_zero();
    mainloop(&a, ring, m0, n0, &mut acc);
    let (rbase, cbase) = acc_origin(m0, n0);
    unroll!(jh in 0..2 => {
        unroll!(jl in 0..16 => {
            unroll!(i in 0..4 => {
                let j = jh * 16 + jl;
                let row = rbase + 8 * (i as u32 >> 1);
                let col = cbase + 8 * j as u32 + (i as u32 & 1);
                if row < m && col < n {
                    store_out(y, ldy, bias, residual, row, col, acc[4 * j + i]);
                }
            });
        });
    });
}

#[inline(always)]
unsafe fn gemm_wgmma_silu(
    y: *mut Bf16,
    x: *const Bf16,
    w_gate: *const Bf16,
    w_up: *const Bf16,
    m: u32,
    n: u32,
    k: u32,
    ldx: u32,
    ldy: u32,
) {
    check_mma_args(x, w_gate, k, ldx);
    check_mma_args(x, w_up, k, ldx);
    let ring = ring();
    let a = WgArgs {
        x: x as *const u16,
        w: w_gate as *const u16,
        w2: w_up as *const u16,
        m,
        n,
        k,
        ldx,
    };
    let (bx, by) = tile();
    let (n0, m0) = (bx * (WG_BN / 2), by * WG_BM);
    let mut acc = wg_acc_zero();
    mainloop(&a, ring, m0, n0, &mut acc);
    let (rbase, cbase) = acc_origin(m0, n0);
    unroll!(p in 0..16 => {
        unroll!(i in 0..4 => {
            let row = rbase + 8 * (i as u32 >> 1);
            let col = cbase + 8 * p as u32 + (i as u32 & 1);
            if row < m && col < n {
                let v = silu_gate(acc[8 * p + i], acc[8 * p + 4 + i]);
                *y.add(row as usize * ldy as usize + col as usize) = Bf16::from_f32(v);
            }
        });
    });
}

kernels! {
    /// wgmma GEMM (sm_90a), bf16 out; same arguments and results as `gemm_mma_bf16`.
    /// block 256 (`WG_THREADS`), grid = (ceil(n / 256), ceil(m / 128)), dynamic shared
    /// memory `WGMMA_SMEM` (193 KiB; traps with less).
    pub fn gemm_wgmma_bf16(y: *mut Bf16, x: *const Bf16, w: *const Bf16, bias: *const Bf16, residual: *const Bf16, m: u32, n: u32, k: u32, ldx: u32, ldy: u32) {
        gemm_wgmma::<Bf16>(y, x, w, bias, residual, m, n, k, ldx, ldy);
    }
    /// wgmma GEMM (sm_90a), f32 out. block 256, grid = (ceil(n / 256), ceil(m / 128)),
    /// dynamic shared memory `WGMMA_SMEM`.
    pub fn gemm_wgmma_bf16_f32out(y: *mut f32, x: *const Bf16, w: *const Bf16, bias: *const Bf16, residual: *const Bf16, m: u32, n: u32, k: u32, ldx: u32, ldy: u32) {
        gemm_wgmma::<f32>(y, x, w, bias, residual, m, n, k, ldx, ldy);
    }
    /// wgmma gate/up GEMM with SiLU·mul (sm_90a). block 256, grid = (ceil(n / 128),
    /// ceil(m / 128)), dynamic shared memory `WGMMA_SMEM`.
    pub fn gemm_wgmma_silu_bf16(y: *mut Bf16, x: *const Bf16, w_gate: *const Bf16, w_up: *const Bf16, m: u32, n: u32, k: u32, ldx: u32, ldy: u32) {
        gemm_wgmma_silu(y, x, w_gate, w_up, m, n, k, ldx, ldy);
    }
}

//! GEMM for column- and row-parallel shards: `y[M, N] = x[M, K] · W[N, K]ᵀ` with bf16
//! inputs and f32 accumulation. Weights are stored like Hugging Face `nn.Linear`:
//! `W[out, in]` row-major, so a column-parallel shard is a block of rows of `W` and a
//! row-parallel shard a block of columns (row stride = K of the shard, contiguous).
//! `x` rows have stride `ldx`, `y` rows stride `ldy` (elements).
//!
//! Two paths, same epilogue:
//! - **decode** (`gemm_decode_*`, M from 1 to ~64): memory-bound, so it streams W
//!   once per 16 rows of x through `mma.m16n8k16` (see `decode_tc`): a block owns
//!   `DEC_COLS` (16) output columns (`_silu`: 8) and its warps split K. Rows that are
//!   not 16-byte aligned take a scalar path (a warp per two columns, lanes split K,
//!   shuffles). Launch: block `DEC_BLOCK` (256) or `DEC_BLOCK_WIDE` (512, for shapes
//!   with at most one block per SM: `dec_block`), grid.x = ceil(N / 16)
//!   (`_silu`: ceil(N / 8)); other block sizes trap.
//!   **Split-K** for shapes with too few column blocks (`dec_splitk`: ceil(N / 16) <
//!   2 x SMs and K >= 2048): `gemm_decode_splitk_bf16` runs the same block code on
//!   K range `blockIdx.y * kchunk ..` and writes raw f32 partials `part[split][m][n]`
//!   (grid (ceil(N / 16), splits), block `dec_block(grid.x * splits, SMs)`), then
//!   `gemm_splitk_reduce_bf16` / `_f32out` (grid-stride, block 256, grid
//!   ceil(M·N / 256)) sums the splits in order and applies the same epilogue.
//!   **Fused RMSNorm** (`gemm_decode_qkv_bf16` and `gemm_decode_silu_bf16` given a norm
//!   weight): each block first computes 1 / rms of the 16 x rows of a pass (every
//!   thread one 16-byte chunk per row in flight, warp then block sums into shared
//!   memory), then normalizes x chunks in registers as they arrive, with
//!   `rmsnorm_bf16`'s rounding (`DecNorm`): one kernel fewer per norm, and the
//!   normalized activations never go through memory. Only the summation order of the
//!   squares differs from `rmsnorm_bf16`'s.
//! - **mma** (`gemm_mma_*`, prefill-sized M): tensor cores through
//!   `mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32`. Block tile 128x128x32, 4 warps in
//!   2x2 each computing 64x64 (4x8 mma tiles, 128 f32 accumulators per lane), a
//!   3-stage `cp.async` pipeline (48 KiB shared memory) feeding `ldmatrix.x4`; shared
//!   tiles are 64-byte rows whose four 16-byte chunks are XOR-swizzled by
//!   `(row >> 1) & 3`, so `ldmatrix` and `cp.async` are bank-conflict free. Ragged M,
//!   N and K tails are zero-filled by `cp.async` (src-size 0). Requires K % 8 == 0,
//!   ldx % 8 == 0 and 16-byte-aligned x and W (traps otherwise — use decode).
//!   Launch: block 128, grid = (ceil(N / 128), ceil(M / 128)) (`_silu`: ceil(N / 64)).
//! - **wide mma** (`gemm_mma_wide_*`, same arguments and results; 0.85x `gemm_mma_*` on
//!   an H200, so the engine does not use it): the same code
//!   (tile loads, swizzle, main loop, epilogues are generic over `MmaTile`) with a
//!   256x128x32 block tile, 8 warps in 4x2 each computing 64x64, a 4-stage `cp.async`
//!   ring (4 x (256 + 128) rows x 64 B = 96 KiB of *dynamic* shared memory,
//!   `MMA_WIDE_SMEM`) and grouped rasterization ([`raster`], groups of 8 block rows).
//!   Why: at 128x128 the old kernel moves 64 FLOP per byte of L2 -> SM traffic, so its
//!   344 TFLOP/s on an H200 already pull about 5.4 TB/s from L2; 256x128 needs 85 FLOP
//!   per byte (a third less traffic per FLOP), and the grouped order keeps the tiles
//!   the resident blocks share in L2. BK stays 32 (not 64 with 3 stages, the other
//!   option): the 64-byte rows keep the old kernel's swizzle and fragment code as they
//!   are, ptxas gives 218-220 registers with BK 32 against 238-240 with BK 64, and
//!   BK 64 x 3 stages needs 144 KiB, over the 99 KiB per-block limit of sm_86/sm_89
//!   GPUs, which run the sm_80 module; a stage already holds 64 `mma.sync` per warp
//!   (thousands of cycles), so the barrier per stage is a small share. (BK and the
//!   stage count are two constants of `TileWide`.) With 220 registers a 256-thread
//!   block takes 56 K of the SM's 64 K registers: one block (8 warps) per SM, the same
//!   warps per SM as the old kernel's two 4-warp blocks.
//!   Launch: block 256 (`MMA_WIDE_BM`), grid = (ceil(N / 128), ceil(M / 256))
//!   (`_silu`: ceil(N / 64)), dynamic shared memory `MMA_WIDE_SMEM` bytes (the CUDA
//!   backend passes it and raises the function's
//!   `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES` at module load: see
//!   `kernels::dynamic_smem`); another block size or less shared memory traps.
//!
//! Fused epilogues (each rounds like the unfused PyTorch ops would):
//! `y = x·Wᵀ (+ bias[n]) (+ residual[m, n])` — `bias`/`residual` may be null; the
//! residual has row stride `ldy` and may alias `y`; and `_silu`:
//! `y = silu(x·W_gateᵀ) * (x·W_upᵀ)` (the Llama MLP's gate/up projections).
use crate::prims::*;

// ---------------------------------------------------------------- epilogue

/// `acc + bias[n]` rounded to bf16 as PyTorch's biased linear layer rounds it, or `acc`
/// as it is without a bias (null).
#[inline(always)]
unsafe fn with_bias(acc: f32, bias: *const Bf16, n: u32) -> f32 {
    if bias as usize != 0 {
        Bf16::round(acc + (*bias.add(n as usize)).to_f32())
    } else {
        acc
    }
}

#[inline(always)]
pub(crate) unsafe fn store_out<O: Elem>(
    y: *mut O,
    ldy: u32,
    bias: *const Bf16,
    residual: *const Bf16,
    m: u32,
    n: u32,
    acc: f32,
) {
    let mut v = with_bias(acc, bias, n);
    let at = m as usize * ldy as usize + n as usize;
    if residual as usize != 0 {
        v = Bf16::round(v) + (*residual.add(at)).to_f32();
    }
    *y.add(at) = O::from_f32(v);
}

#[inline(always)]
pub(crate) fn silu_gate(g: f32, u: f32) -> f32 {
    Bf16::round(silu(Bf16::round(g))) * Bf16::round(u)
}

// ---------------------------------------------------------------- decode path

const DEC_MT: u32 = 4;

#[inline(always)]
fn dot8(w: [u32; 4], x: [u32; 4], mut acc: f32) -> f32 {
    unroll!(i in 0..4 => {
        let (w0, w1) = bf16x2_to_f32(w[i]);
        let (x0, x1) = bf16x2_to_f32(x[i]);
        acc = fma(w0, x0, acc);
        acc = fma(w1, x1, acc);
    });
    acc
}

/// One warp: partial dots of rows `w[0..2]` of W with rows m0.. m0+DEC_MT of x, reduced
/// over the warp (every lane gets all eight sums).
#[inline(always)]
unsafe fn decode_dots(
    w: [*const u16; 2],
    x: *const u16,
    ldx: u32,
    m0: u32,
    m: u32,
    k: u32,
    vec_ok: bool,
) -> [[f32; 4]; 2] {
    let lane = lane_id();
    let mut acc = [[0.0f32; 4]; 2];
    let mcount = umin(DEC_MT, m - m0);
    let mut kv = 0u32; // end of the vectorised part
    if vec_ok {
        kv = k & !255;
        let mut kk = lane * 8;
        while kk < kv {
            let w0 = ld_global_nc_v4(w[0].add(kk as usize) as *const u32);
            let w1 = ld_global_nc_v4(w[1].add(kk as usize) as *const u32);
            unroll!(i in 0..4 => {
                if (i as u32) < mcount {
                    let xv = ld_global_nc_v4(x.add(((m0 + i as u32) * ldx + kk) as usize) as *const u32);
                    acc[0][i] = dot8(w0, xv, acc[0][i]);
                    acc[1][i] = dot8(w1, xv, acc[1][i]);
                }
            });
            kk += 256;
        }
    }
    // scalar part: the tail, or everything when rows are not 16-byte aligned
    let mut kk = kv + lane;
    while kk < k {
        let w0 = bf16_to_f32(*w[0].add(kk as usize));
        let w1 = bf16_to_f32(*w[1].add(kk as usize));
        unroll!(i in 0..4 => {
            if (i as u32) < mcount {
                let xv = bf16_to_f32(*x.add(((m0 + i as u32) * ldx + kk) as usize));
                acc[0][i] = fma(w0, xv, acc[0][i]);
                acc[1][i] = fma(w1, xv, acc[1][i]);
            }
        });
        kk += 32;
    }
    unroll!(r in 0..2 => {
        unroll!(i in 0..4 => {
            acc[r][i] = warp_sum(acc[r][i]);
        });
    });
    acc
}

/// `acc[r][i]` for lane-dependent `r`, `i` without a local-memory array.
#[inline(always)]
fn pick(acc: &[[f32; 4]; 2], r: usize, i: usize) -> f32 {
    let mut v = 0.0;
    unroll!(rr in 0..2 => {
        unroll!(ii in 0..4 => {
            if rr == r && ii == i {
                v = acc[rr][ii];
            }
        });
    });
    v
}

#[inline(always)]
fn aligned16(p: usize) -> bool {
    p % 16 == 0
}

/// Columns of `y` per block of the tensor-core decode path (`_silu`: 8, as gate and up
/// rows of the same 8 columns fill the two n8 tiles).
pub const DEC_COLS: u32 = 16;
/// Block size the launchers use for every decode kernel (8 warps split K).
pub const DEC_BLOCK: u32 = 256;
/// The other allowed decode block size (16 warps split K): for shapes with too few
/// column blocks to fill the GPU, see [`dec_block`]. Columns per block do not change.
pub const DEC_BLOCK_WIDE: u32 = 512;
/// Decode block size for a launch of `blocks` blocks (grid.x) on a GPU with `sms` SMs:
/// `DEC_BLOCK_WIDE` when every block gets an SM of its own (e.g. N = 1024: 64 blocks),
/// so the few busy SMs get twice the loads in flight; else `DEC_BLOCK`. A 512-thread
/// block at the register cap (128) takes a whole SM's 64 K registers, a 256-thread one
/// half: between one and two blocks per SM the wide blocks ran in two waves, the second
/// partly empty (N = 2560: 160 blocks, 28 in the second wave on 132 SMs; N = 4096: 1.94
/// waves in run 5's Nsight Compute), where 256-thread blocks all fit at once.
pub fn dec_block(blocks: u32, sms: u32) -> u32 {
    if blocks <= sms {
        DEC_BLOCK_WIDE
    } else {
        DEC_BLOCK
    }
}
/// [`dec_splitk`] splits only K >= 2 x this (one full iteration of a 256-thread block:
/// 8 warps x `DEC_CPI` chunks x 32); splits are at least a quarter of it deep.
pub const DEC_SPLIT_MIN_K: u32 = 1024;
/// Most splits [`dec_splitk`] chooses.
pub const DEC_MAX_SPLITS: u32 = 16;
/// Split-K plan of a decode GEMM (`gemm_decode_splitk_bf16` + `gemm_splitk_reduce_*`)
/// with `n` output columns and depth `k` on `sms` SMs: `(splits, kchunk)`, K elements
/// `s * kchunk ..` go to split `s` (grid.y = splits). `(1, k)` = no split (use the fused
/// kernels): when ceil(n / 16) >= 2 x SMs already, or K is under 2 x
/// `DEC_SPLIT_MIN_K`. Otherwise about 3 blocks per SM in all (grid.x x splits), each
/// split at least `DEC_SPLIT_MIN_K / 4` deep and `kchunk` a multiple of 256, so every
/// split is non-empty and 16-byte aligned.
pub fn dec_splitk(n: u32, k: u32, sms: u32) -> (u32, u32) {
    let blocks = div_ceil(n, DEC_COLS);
    if blocks == 0 || blocks >= 2 * sms || k < 2 * DEC_SPLIT_MIN_K {
        return (1, k);
    }
    let want = div_ceil(3 * sms, blocks);
    let most = umin(DEC_MAX_SPLITS, k / (DEC_SPLIT_MIN_K / 4));
    let s = umin(want, most);
    let kchunk = div_ceil(div_ceil(k, s), 256) * 256;
    let splits = div_ceil(k, kchunk);
    if splits < 2 {
        (1, k)
    } else {
        (splits, kchunk)
    }
}
/// 32-element K chunks each warp loads per iteration of `decode_tc` (all loads first).
const DEC_CPI: u32 = 4;
/// Most warps a decode block may have (shared reduction buffer size).
const DEC_MAXW: u32 = 16;
// Per-block shared memory of the decode kernels (`dec_smem`, 16 KiB):
// `[warp < DEC_MAXW][tile 2][reg 4][lane 32]` f32.

/// This lane's 16-byte chunk at `k` of the row `row` of a `[rows, ld]` bf16 matrix, or
/// zeros when `ok` is false (rows past M/N, chunks past K: no load is issued).
#[inline(always)]
unsafe fn chunk(p: *const u16, row: u32, ld: u32, k: u32, ok: bool) -> [u32; 4] {
    // predicated, not branched: the address is not read when !ok
    ld_global_nc_v4_if(
        p.add(row as usize * ld as usize + k as usize) as *const u32,
        ok,
    )
}

/// Tensor-core decode (vectorised path): the block's 2 n8 tiles (rows `wrow[0]`,
/// `wrow[1]` + 0..8 of W, i.e. 8 output columns each) times rows `m0..m0+16` of x, K
/// split over the warps in 32-element chunks. `mma.m16n8k16` treats K as a sum, so any
/// permutation of K used identically for A and B is valid: lane (g = lane/4, t = lane%4)
/// loads 16 contiguous bytes (k = kb + 8t .. +8) of W row g and of x rows g, g + 8, and
/// feeds elements 0..3 of them to one mma and 4..7 to a second one. W is therefore read
/// once for all 16 rows of x, with fully used 16-byte loads (a warp reads 512 B of each
/// tile per chunk). Rows of x past M are zero (not loaded), so M <= 8 loads half the x.
/// With a norm (`DecNorm`), the pass's 1/rms are computed first ([`decode_norm_rows`])
/// and x is normalized as it arrives. Each warp's accumulators go to shared memory `red`
/// for a fixed-order reduction; returns after a barrier (every thread of the block must
/// call it).
#[inline(always)]
unsafe fn decode_tc(
    w: [*const u16; 2],
    wrow: [u32; 2],
    wrows_ok: [u32; 2], // number of valid rows in each tile (0..=8)
    ldw: u32,           // row stride of W (the full K; `k` is the range summed here)
    x: *const u16,
    ldx: u32,
    m0: u32,
    m: u32,
    k: u32,
    red: *mut f32,
    norm: DecNorm,
) {
    let normed = norm.on();
    if normed {
        decode_norm_rows(x, ldx, m0, m, k, red, norm);
    }
    let lane = lane_id();
    let (g, t) = (lane >> 2, lane & 3);
    let nw = block_dim() / WARP;
    let warp = warp_id();
    let ra = m0 + g < m;
    let rb = m0 + g + 8 < m;
    // (uniform per block: rows g + 8 exist only when this pass has more than 8 rows)
    let any_b = m - m0 > 8;
    let (ra_inv, rb_inv) = if normed {
        (*norm.inv.add(g as usize), *norm.inv.add(g as usize + 8))
    } else {
        (0.0, 0.0)
    };
    let w_ok = [g < wrows_ok[0], g < wrows_ok[1]];
    let mut acc = [[0.0f32; 4]; 2];
    let nchunks = div_ceil(k, 32);
    // DEC_CPI chunks per iteration, all loads issued before the mmas
    let mut c = warp;
    while c < nchunks {
        let mut wv = [[[0u32; 4]; 2]; 4];
        let mut xa = [[0u32; 4]; 4];
        let mut xb = [[0u32; 4]; 4];
        let mut nv = [[0u32; 4]; 4];
        unroll!(q in 0..4 => {
            let cq = c + q as u32 * nw;
            let kq = cq * 32 + t * 8;
            let ok = cq < nchunks && kq < k;
            wv[q][0] = chunk(w[0], wrow[0] + g, ldw, kq, ok && w_ok[0]);
            wv[q][1] = chunk(w[1], wrow[1] + g, ldw, kq, ok && w_ok[1]);
            xa[q] = chunk(x, m0 + g, ldx, kq, ok && ra);
            xb[q] = chunk(x, m0 + g + 8, ldx, kq, ok && rb);
            nv[q] = chunk(norm.w, 0, 0, kq, ok && normed);
        });
        // RMSNorm applied to x as it arrives, after all of the iteration's loads are
        // issued (so none waits behind it); rows past M stay zero (their inv is 0)
        if normed {
            unroll!(q in 0..4 => {
                xa[q] = norm_chunk(xa[q], nv[q], ra_inv);
                if any_b {
                    xb[q] = norm_chunk(xb[q], nv[q], rb_inv);
                }
            });
        }
        unroll!(q in 0..4 => {
            unroll!(j in 0..2 => {
                acc[j] = mma_bf16_16816(acc[j], [xa[q][0], xb[q][0], xa[q][1], xb[q][1]], [wv[q][j][0], wv[q][j][1]]);
                acc[j] = mma_bf16_16816(acc[j], [xa[q][2], xb[q][2], xa[q][3], xb[q][3]], [wv[q][j][2], wv[q][j][3]]);
            });
        });
        c += DEC_CPI * nw;
    }
    unroll!(j in 0..2 => {
        unroll!(r in 0..4 => {
            *red.add((((warp * 2 + j as u32) * 4 + r as u32) * 32 + lane) as usize) = acc[j][r];
        });
    });
    sync_threads();
}

/// RMSNorm fused into a decode GEMM (`gemm_decode_qkv_bf16`, `gemm_decode_silu_bf16`
/// with a norm weight): x rows are normalized as they are loaded, `rmsnorm_bf16`'s
/// rounding per element (`bf16(w * bf16(x * inv_rms))`), so the normalized activations
/// never go through memory and the layer loses a launch per norm. `w` null = x is used as
/// it is. `inv` (shared memory, 16 floats) holds the current 16-row pass's
/// `1 / rms` (0 for rows past M), filled by [`decode_norm_rows`].
struct DecNorm {
    w: *const u16,
    eps: f32,
    inv: *mut f32,
}
impl Clone for DecNorm {
    #[inline(always)]
    fn clone(&self) -> Self {
        *self
    }
}
impl Copy for DecNorm {}

impl DecNorm {
    const NONE: DecNorm = DecNorm {
        w: 0 as *const u16,
        eps: 0.0,
        inv: 0 as *mut f32,
    };
    /// Whether there is a norm to apply.
    #[inline(always)]
    fn on(self) -> bool {
        self.w as usize != 0
    }
    /// No norm, or a norm weight the 16-byte chunk loads can read.
    #[inline(always)]
    fn aligned(self) -> bool {
        aligned16(self.w as usize)
    }
}

/// Shared memory of the fused-norm decode kernels: `dec_smem` (16 KiB) + 16 floats.
const DEC_NORM_SMEM: usize = 16384 + 64;

/// 8 bf16 of x (`v`, 16 bytes) normalized with `inv` and scaled by the norm weight `w`
/// (16 bytes), rounded like `rmsnorm_bf16`: `bf16(w * bf16(x * inv))`.
#[inline(always)]
fn norm_chunk(v: [u32; 4], w: [u32; 4], inv: f32) -> [u32; 4] {
    let mut o = [0u32; 4];
    unroll!(i in 0..4 => {
        let (x0, x1) = bf16x2_to_f32(v[i]);
        let (w0, w1) = bf16x2_to_f32(w[i]);
        let (n0, n1) = bf16x2_to_f32(pack_bf16x2(x0 * inv, x1 * inv));
        o[i] = pack_bf16x2(w0 * n0, w1 * n1);
    });
    o
}

/// `norm.inv[r] = 1 / rms(x row m0 + r)` for the 16 rows of a pass (0 past M): every
/// thread sums the squares of its 16-byte chunks of each row (one load per row in flight
/// at once, K <= 8 x block size per round), warps reduce, and the warps' sums are added
/// in warp order. `k % 8 == 0` and 16-byte-aligned rows (the vectorised path). Uses `red`
/// as scratch; ends with a barrier (every thread of the block must call it).
#[inline(always)]
unsafe fn decode_norm_rows(
    x: *const u16,
    ldx: u32,
    m0: u32,
    m: u32,
    k: u32,
    red: *mut f32,
    norm: DecNorm,
) {
    let nw = block_dim() / WARP;
    let (warp, lane) = (warp_id(), lane_id());
    let mut ss = [0.0f32; 16];
    let mut c = thread_idx() * 8;
    while c < k {
        let mut v = [[0u32; 4]; 16];
        unroll!(r in 0..16 => {
            v[r] = chunk(x, m0 + r as u32, ldx, c, m0 + (r as u32) < m);
        });
        unroll!(r in 0..16 => {
            unroll!(i in 0..4 => {
                let (a, b) = bf16x2_to_f32(v[r][i]);
                ss[r] = fma(a, a, ss[r]);
                ss[r] = fma(b, b, ss[r]);
            });
        });
        c += block_dim() * 8;
    }
    unroll!(r in 0..16 => {
        let s = warp_sum(ss[r]);
        if lane == 0 {
            *red.add(r * DEC_MAXW as usize + warp as usize) = s;
        }
    });
    sync_threads();
    let r = thread_idx();
    if r < 16 {
        let mut s = 0.0f32;
        let mut w = 0;
        while w < nw {
            s += *red.add((r * DEC_MAXW + w) as usize);
            w += 1;
        }
        *norm.inv.add(r as usize) = if m0 + r < m {
            rsqrt(s / (k as f32) + norm.eps)
        } else {
            0.0
        };
    }
    sync_threads();
}

/// L2 prefetch of rows `r0 .. r0 + rows` (clamped to `n`) of a row-major `[n, k]` bf16
/// matrix: a decode block's weight slice, one contiguous range, a 128-byte line per
/// thread per step. Issued in the kernels' `prefetch` block, before `pdl_wait`: with
/// programmatic dependent launch the weights start streaming while the previous
/// kernel finishes (no earlier kernel of a step writes weights).
#[inline(always)]
unsafe fn prefetch_rows(w: *const Bf16, r0: u32, rows: u32, n: u32, k: u32) {
    if r0 >= n {
        return;
    }
    let bytes = umin(rows, n - r0) as usize * k as usize * 2;
    if bytes == 0 {
        return;
    }
    let start = (w as *const u8).add(r0 as usize * k as usize * 2);
    let mut off = thread_idx() as usize * 128;
    while off < bytes {
        prefetch_l2(start.add(off));
        off += block_dim() as usize * 128;
    }
    // the last line when the range does not start on a line boundary
    if thread_idx() == 0 {
        prefetch_l2(start.add(bytes - 1));
    }
}

/// Which of the grouped q/k/v GEMM's matrices block `b` computes: (index 0..3, column
/// block within it); `c0`, `c1` = column blocks of matrices 0 and 1.
#[inline(always)]
fn qkv_pick(b: u32, c0: u32, c1: u32) -> (u32, u32) {
    if b < c0 {
        (0, b)
    } else if b < c0 + c1 {
        (1, b - c0)
    } else {
        (2, b - c0 - c1)
    }
}

/// Sum of the warps' partials for (tile `j`, register `r`, lane `l`) in warp order.
#[inline(always)]
unsafe fn decode_red(red: *const f32, j: u32, r: u32, l: u32) -> f32 {
    let nw = block_dim() / WARP;
    let mut s = 0.0f32;
    let mut w = 0;
    while w < nw {
        s += *red.add((((w * 2 + j) * 4 + r) * 32 + l) as usize);
        w += 1;
    }
    s
}

/// Valid rows of the n8 tile starting at row `r0` of an `n`-row W.
#[inline(always)]
fn rows_in(r0: u32, n: u32) -> u32 {
    if r0 >= n {
        0
    } else {
        umin(8, n - r0)
    }
}

#[inline(always)]
fn decode_vec_ok(k: u32, ldx: u32, ptrs: [usize; 3]) -> bool {
    k % 8 == 0 && ldx % 8 == 0 && aligned16(ptrs[0]) && aligned16(ptrs[1]) && aligned16(ptrs[2])
}

/// Decode kernels run with `DEC_BLOCK` or `DEC_BLOCK_WIDE` threads (anything else traps:
/// the scalar path needs at least `DEC_COLS / 2` warps, the shared buffer fits
/// `DEC_MAXW`).
#[inline(always)]
fn check_dec_block() {
    let b = block_dim();
    // (both allowed sizes fit the shared buffer: DEC_BLOCK_WIDE = DEC_MAXW warps)
    if (b != DEC_BLOCK && b != DEC_BLOCK_WIDE) || b > DEC_MAXW * WARP {
        trap();
    }
}

/// A decode result: through the epilogue into `y`, or (split-K) raw into the f32
/// partials `part[split = block_idx_y][m][n]`.
#[inline(always)]
unsafe fn dec_out<O: Elem>(
    y: *mut O,
    ldy: u32,
    bias: *const Bf16,
    residual: *const Bf16,
    part: *mut f32,
    m: u32,
    n: u32,
    row: u32,
    col: u32,
    acc: f32,
) {
    if part as usize != 0 {
        let at = (block_idx_y() as usize * m as usize + row as usize) * n as usize + col as usize;
        *part.add(at) = acc;
    } else {
        store_out(y, ldy, bias, residual, row, col, acc);
    }
}

/// Split-K reduce: `y[m][n] = epilogue(Σ_s part[s][m][n])`, splits summed in order
/// (deterministic), then bias / residual / output rounding exactly as the fused
/// decode epilogue. Grid-stride over the m·n outputs: any launch shape.
#[inline(always)]
unsafe fn splitk_reduce<O: Elem>(
    y: *mut O,
    part: *const f32,
    bias: *const Bf16,
    residual: *const Bf16,
    m: u32,
    n: u32,
    ldy: u32,
    splits: u32,
) {
    let total = m * n;
    let plane = total as usize;
    let mut i = block_idx_x() * block_dim() + thread_idx();
    while i < total {
        let mut s = 0u32;
        let mut acc = 0.0f32;
        while s < splits {
            acc += *part.add(s as usize * plane + i as usize);
            s += 1;
        }
        store_out(y, ldy, bias, residual, i / n, i % n, acc);
        i += grid_dim_x() * block_dim();
    }
}

#[inline(always)]
unsafe fn gemm_decode<O: Elem>(
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
    red: *mut f32,
    part: *mut f32,
    kchunk: u32,
    blk: u32,
    norm: DecNorm,
) {
    check_dec_block();
    // this block's 16 columns: column block `blk` (block_idx_x, or its place in a group)
    let nb = blk * DEC_COLS;
    let vec_ok = decode_vec_ok(k, ldx, [x as usize, w as usize, w as usize]) && norm.aligned();
    // this block's K range: all of K, or (split-K, `part` not null) elements
    // k0 .. k0 + kchunk of it for split block_idx_y (kchunk % 8 == 0 keeps the
    // 16-byte alignment of the vectorised path)
    let mut k0 = 0;
    let mut klen = k;
    if part as usize != 0 {
        k0 = block_idx_y() * kchunk;
        klen = if k0 >= k { 0 } else { umin(kchunk, k - k0) };
    }
    let (xs, ws) = (
        (x as *const u16).add(k0 as usize),
        (w as *const u16).add(k0 as usize),
    );
    let normed = norm.on();
    if vec_ok {
        let mut m0 = 0;
        while m0 < m {
            decode_tc(
                [ws, ws],
                [nb, nb + 8],
                [rows_in(nb, n), rows_in(nb + 8, n)],
                k,
                xs,
                ldx,
                m0,
                m,
                klen,
                red,
                norm,
            );
            // one output element (tile j, register r, lane l) per thread
            let mut i = thread_idx();
            while i < 256 {
                let (l, r, j) = (i & 31, (i >> 5) & 3, i >> 7);
                let row = m0 + (l >> 2) + (r >> 1) * 8;
                let col = nb + j * 8 + (l & 3) * 2 + (r & 1);
                if row < m && col < n {
                    dec_out(
                        y,
                        ldy,
                        bias,
                        residual,
                        part,
                        m,
                        n,
                        row,
                        col,
                        decode_red(red, j, r, l),
                    );
                }
                i += block_dim();
            }
            sync_threads(); // red is reused by the next 16 rows
            m0 += 16;
        }
        return;
    }
    if normed {
        trap(); // the fused norm needs the vectorised path (the host checks)
    }
    // scalar path: warp i < DEC_COLS / 2 owns columns nb + 2i, nb + 2i + 1
    let n0 = nb + warp_id() * 2;
    if warp_id() * 2 >= DEC_COLS || n0 >= n {
        return; // whole warp leaves together
    }
    let has2 = n0 + 1 < n;
    let w0 = ws.add(n0 as usize * k as usize);
    let w1 = if has2 { w0.add(k as usize) } else { w0 };
    let lane = lane_id();
    let mut m0 = 0;
    while m0 < m {
        let acc = decode_dots([w0, w1], xs, ldx, m0, m, klen, vec_ok);
        // lanes 0..3 store column n0, lanes 4..7 column n0 + 1
        let i = lane & 3;
        let r = (lane >> 2) as usize;
        if lane < 8 && m0 + i < m && (r == 0 || has2) {
            dec_out(
                y,
                ldy,
                bias,
                residual,
                part,
                m,
                n,
                m0 + i,
                n0 + r as u32,
                pick(&acc, r, i as usize),
            );
        }
        m0 += DEC_MT;
    }
}

#[inline(always)]
unsafe fn gemm_decode_silu(
    y: *mut Bf16,
    x: *const Bf16,
    w_gate: *const Bf16,
    w_up: *const Bf16,
    m: u32,
    n: u32,
    k: u32,
    ldx: u32,
    ldy: u32,
    red: *mut f32,
    norm: DecNorm,
) {
    check_dec_block();
    let x = x as *const u16;
    let nb = block_idx_x() * (DEC_COLS / 2);
    let vec_ok =
        decode_vec_ok(k, ldx, [x as usize, w_gate as usize, w_up as usize]) && norm.aligned();
    let normed = norm.on();
    if vec_ok {
        // tile 0 = gate rows nb..nb+8, tile 1 = up rows of the same columns
        let rows = rows_in(nb, n);
        let ws = [w_gate as *const u16, w_up as *const u16];
        let mut m0 = 0;
        while m0 < m {
            decode_tc(ws, [nb, nb], [rows, rows], k, x, ldx, m0, m, k, red, norm);
            let mut i = thread_idx();
            while i < 128 {
                let (l, r) = (i & 31, i >> 5);
                let row = m0 + (l >> 2) + (r >> 1) * 8;
                let col = nb + (l & 3) * 2 + (r & 1);
                if row < m && col < n {
                    let v = silu_gate(decode_red(red, 0, r, l), decode_red(red, 1, r, l));
                    *y.add((row * ldy + col) as usize) = Bf16::from_f32(v);
                }
                i += block_dim();
            }
            sync_threads();
            m0 += 16;
        }
        return;
    }
    if normed {
        trap(); // the fused norm needs the vectorised path (the host checks)
    }
    // scalar path: warp i < DEC_COLS / 2 owns column nb + i
    let col = nb + warp_id();
    if warp_id() >= DEC_COLS / 2 || col >= n {
        return;
    }
    let wg = (w_gate as *const u16).add(col as usize * k as usize);
    let wu = (w_up as *const u16).add(col as usize * k as usize);
    let lane = lane_id();
    let mut m0 = 0;
    while m0 < m {
        let acc = decode_dots([wg, wu], x, ldx, m0, m, k, vec_ok);
        if lane < DEC_MT && m0 + lane < m {
            let v = silu_gate(pick(&acc, 0, lane as usize), pick(&acc, 1, lane as usize));
            *y.add(((m0 + lane) * ldy + col) as usize) = Bf16::from_f32(v);
        }
        m0 += DEC_MT;
    }
}

/// The two n8 tiles (first W rows) of block `blk` of matrix `i` (0 = q, 1 = k, 2 = v) in
/// `gemm_decode_qkv_rope_bf16`: v as the plain decode GEMM (16 consecutive columns); q
/// and k 8 columns of one head's first half and the 8 they rotate with (`head_dim / 2`
/// further on), so a thread holds both elements of its RoPE pairs. Either way
/// `head_dim / 16` blocks per head (`head_dim % 16 == 0`).
#[inline(always)]
fn rope_tiles(i: u32, blk: u32, head_dim: u32) -> (u32, u32) {
    if i == 2 {
        (blk * DEC_COLS, blk * DEC_COLS + 8)
    } else {
        let per = head_dim / DEC_COLS;
        let (h, g) = (blk / per, blk % per);
        let c0 = h * head_dim + g * 8;
        (c0, c0 + head_dim / 2)
    }
}

/// Where `gemm_decode_qkv_rope_bf16` puts its results: rotated q rows `[m, nq]`, and the
/// rotated k and the v of row `r` into the paged caches at slot `slots[r]`
/// (`[slot][kv_heads][head_dim]`; `U32_MAX` = no slot: not written).
struct RopeOut {
    q: *mut Bf16,
    pos: *const u32,
    inv_freq: *const f32,
    k_cache: *mut Bf16,
    v_cache: *mut Bf16,
    slots: *const u32,
    head_dim: u32,
}

/// The grouped q/k/v decode GEMM with RoPE and the K/V cache write as its epilogue (see
/// `gemm_decode_qkv_rope_bf16`). Rounds exactly as `gemm_decode_qkv_bf16` followed by
/// `rope_kv_write_bf16`: the projection to bf16 (after the bias), cos and sin to bf16,
/// `o1 = bf16(x1·c) + bf16(-x2·s)`, `o2 = bf16(x2·c) + bf16(x1·s)`, each to bf16.
#[inline(always)]
unsafe fn gemm_decode_qkv_rope(
    x: *const Bf16,
    w: [*const Bf16; 3],
    b: [*const Bf16; 3],
    (m, nq, nkv, k, ldx): (u32, u32, u32, u32, u32),
    out: RopeOut,
    red: *mut f32,
    norm: DecNorm,
) {
    check_dec_block();
    let hd = out.head_dim;
    let (i, blk) = qkv_pick(block_idx_x(), nq / DEC_COLS, nkv / DEC_COLS);
    // (uniform per block: the whole block takes one branch, barriers stay matched)
    let (w, bias) = if i == 0 {
        (w[0], b[0])
    } else if i == 1 {
        (w[1], b[1])
    } else {
        (w[2], b[2])
    };
    let shape_ok = hd % DEC_COLS == 0 && hd != 0 && nq % hd == 0 && nkv % hd == 0;
    if !shape_ok || !decode_vec_ok(k, ldx, [x as usize, w as usize, w as usize]) || !norm.aligned()
    {
        trap(); // the host checks both (the unfused launches serve the rest)
    }
    let (c0, c1) = rope_tiles(i, blk, hd);
    let (xs, ws) = (x as *const u16, w as *const u16);
    let mut m0 = 0;
    while m0 < m {
        decode_tc([ws, ws], [c0, c1], [8, 8], k, xs, ldx, m0, m, k, red, norm);
        // one (tile 0, tile 1) pair of outputs per thread: the same row and offset
        let mut t = thread_idx();
        while t < 128 {
            let (l, r) = (t & 31, t >> 5);
            let row = m0 + (l >> 2) + (r >> 1) * 8;
            let off = (l & 3) * 2 + (r & 1);
            if row < m {
                let (col0, col1) = (c0 + off, c1 + off);
                let a0 = Bf16::round(with_bias(decode_red(red, 0, r, l), bias, col0));
                let a1 = Bf16::round(with_bias(decode_red(red, 1, r, l), bias, col1));
                let slot = *out.slots.add(row as usize);
                let at = slot as usize * nkv as usize;
                if i == 2 {
                    if slot != U32_MAX {
                        *out.v_cache.add(at + col0 as usize) = Bf16::from_f32(a0);
                        *out.v_cache.add(at + col1 as usize) = Bf16::from_f32(a1);
                    }
                } else {
                    let p = *out.pos.add(row as usize) as f32;
                    let (sn, cs) =
                        crate::small::sincos(p * *out.inv_freq.add((col0 % hd) as usize));
                    let (c, sn) = (Bf16::round(cs), Bf16::round(sn));
                    let o0 = Bf16::from_f32(Bf16::round(a0 * c) + Bf16::round(-a1 * sn));
                    let o1 = Bf16::from_f32(Bf16::round(a1 * c) + Bf16::round(a0 * sn));
                    if i == 0 {
                        let q = out.q.add(row as usize * nq as usize);
                        *q.add(col0 as usize) = o0;
                        *q.add(col1 as usize) = o1;
                    } else if slot != U32_MAX {
                        *out.k_cache.add(at + col0 as usize) = o0;
                        *out.k_cache.add(at + col1 as usize) = o1;
                    }
                }
            }
            t += block_dim();
        }
        sync_threads(); // red is reused by the next 16 rows
        m0 += 16;
    }
}

// ---------------------------------------------------------------- mma path

/// The block tile of an mma kernel: `BM` x `BN` (128) output elements, `BM / 64` x 2
/// warps of 64x64 each (so `BM` threads), K in `BK`-element stages through an `ST`-deep
/// `cp.async` ring. One code path serves every shape: the tile loads, the swizzle, the
/// main loop and the epilogues below are generic over it.
trait MmaTile {
    /// Block rows: 64 per warp row, 2 warps per warp row, so also the block size.
    const BM: u32;
    /// K elements per stage: 32 (64-byte shared rows) or 64 (128-byte rows).
    const BK: u32;
    /// Pipeline stages in shared memory (3 or 4).
    const ST: u32;
    /// Grouped rasterization: block rows per group (see [`raster`]); 0 = grid order.
    const GROUP: u32;
}

/// `gemm_mma_*`: 128x128x32, 4 warps, 3 stages (48 KiB static shared memory).
struct Tile128;
impl MmaTile for Tile128 {
    const BM: u32 = 128;
    const BK: u32 = 32;
    const ST: u32 = 3;
    const GROUP: u32 = 0;
}

/// `gemm_mma_wide_*`: 256x128x32, 8 warps (4x2), 4 stages (96 KiB dynamic shared
/// memory), grouped rasterization in groups of 8 block rows. See the module comment.
struct TileWide;
impl MmaTile for TileWide {
    const BM: u32 = MMA_WIDE_BM;
    const BK: u32 = 32;
    const ST: u32 = 4;
    const GROUP: u32 = MMA_WIDE_GROUP;
}

const BN: u32 = 128;

/// Bytes of one stage of tile `T` in shared memory: the A tile (`BM` rows) then the B
/// tile (`BN` rows), `BK` bf16 per row.
#[inline(always)]
const fn stage_bytes(bm: u32, bk: u32) -> u32 {
    (bm + BN) * bk * 2
}

/// Shared memory of the `gemm_mma_*` kernels (static): 3 stages of 128x32 A and B tiles.
pub const MMA_SMEM: usize = (3 * stage_bytes(128, 32)) as usize;
/// Block rows (M) of the `gemm_mma_wide_*` kernels, and their block size (threads).
pub const MMA_WIDE_BM: u32 = 256;
/// Block columns (N) of the mma kernels (`_silu`: BN / 2 outputs, gate and up).
pub const MMA_BN: u32 = BN;
/// Block rows per group of the wide kernels' grouped rasterization ([`raster`]).
pub const MMA_WIDE_GROUP: u32 = 8;
/// Dynamic shared memory of the `gemm_mma_wide_*` kernels (bytes): launch them with
/// exactly this `sharedMemBytes` (and the function attribute
/// `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES` raised to it, as it is over
/// 48 KiB); with less they trap. 4 stages x (256 + 128) rows x 64 B = 96 KiB.
pub const MMA_WIDE_SMEM: u32 = TileWide::ST * stage_bytes(TileWide::BM, TileWide::BK);

/// Grouped rasterization: block (bx, by) of a (gx, gy) grid computes output tile
/// (column block, row block) = the returned pair. Consecutive block ids walk down a group
/// of `group` block rows (the last group may be shorter) before moving one column
/// block right, so the blocks resident at one time share a few rows of x and columns of
/// W in L2 instead of one row of x against all of W. A bijection of the grid onto
/// itself for any shape; `group` 0 or 1 = grid order.
#[inline(always)]
pub fn raster(bx: u32, by: u32, gx: u32, gy: u32, group: u32) -> (u32, u32) {
    if group <= 1 {
        return (bx, by);
    }
    let pid = by * gx + bx;
    let per_group = group * gx;
    let g = pid / per_group;
    let first = g * group;
    let rows = umin(gy - first, group);
    let in_group = pid - g * per_group;
    (in_group / rows, first + in_group % rows)
}

/// Byte offset of 16-byte chunk `c` of row `r` in a swizzled tile of `bk`-element bf16
/// rows: the chunk index is XORed with the row's position among the rows sharing a
/// 128-byte bank line ((r >> 1) & 3 for 64-byte rows, r & 7 for 128-byte rows), so the
/// 8 rows of an `ldmatrix` (and the rows `cp.async` fills) hit 8 different 16-byte
/// bank groups.
#[inline(always)]
fn swz(bk: u32, r: u32, c: u32) -> u32 {
    r * (bk * 2) + ((c ^ ((r / (64 / bk)) & (bk / 8 - 1))) << 4)
}

/// `cp.async.wait_group n` for a stage count known after inlining.
#[inline(always)]
fn cp_async_wait_n(n: u32) {
    if n == 0 {
        cp_async_wait::<0>();
    } else if n == 1 {
        cp_async_wait::<1>();
    } else if n == 2 {
        cp_async_wait::<2>();
    } else {
        cp_async_wait::<3>();
    }
}

/// A tensor-core GEMM's operands (also the wgmma kernels').
pub(crate) struct MmaArgs {
    pub(crate) x: *const u16,
    pub(crate) w: *const u16,
    pub(crate) w2: *const u16, // up projection for the gated variant, else null
    pub(crate) m: u32,
    pub(crate) n: u32,
    pub(crate) k: u32,
    pub(crate) ldx: u32,
}

/// Global row of W feeding shared B row `r` of the block starting at output column n0.
/// Gated: rows alternate in 8-row groups between W_gate and W_up for the same columns,
/// so a lane's even and odd n8 tiles hold gate and up of the same outputs.
#[inline(always)]
unsafe fn b_row(a: &MmaArgs, n0: u32, r: u32) -> (*const u16, bool) {
    if a.w2 as usize == 0 {
        let gn = n0 + r;
        (a.w.add(gn as usize * a.k as usize), gn < a.n)
    } else {
        let wn = r >> 6;
        let j = (r & 63) >> 3;
        let gn = n0 + wn * 32 + (j >> 1) * 8 + (r & 7);
        let base = if j & 1 == 0 { a.w } else { a.w2 };
        (base.add(gn as usize * a.k as usize), gn < a.n)
    }
}

/// Issues the copies of K tile `kt` into stage `stage`: thread t copies chunks t,
/// t + BM, ... of the A tile (BK / 8 each) and of the B tile (BN·BK / 8 / BM each),
/// zero-filling rows past M / N and chunks past K.
#[inline(always)]
unsafe fn load_stage<T: MmaTile>(
    a: &MmaArgs,
    smem: *mut u8,
    stage: u32,
    kt: u32,
    m0: u32,
    n0: u32,
) {
    let t = thread_idx();
    let sa = smem.add((stage * stage_bytes(T::BM, T::BK)) as usize);
    let sb = sa.add((T::BM * T::BK * 2) as usize);
    let k0 = kt * T::BK;
    let cpr = T::BK / 8; // chunks per row
    unroll!(i in 0..8 => {
        let id = t + i as u32 * T::BM;
        let r = id / cpr;
        let c = id % cpr;
        let gk = k0 + c * 8;
        if (i as u32) < cpr {
            let gm = m0 + r;
            let ok = gm < a.m && gk < a.k;
            let src = if ok { a.x.add((gm * a.ldx + gk) as usize) } else { a.x };
            cp_async_16(sa.add(swz(T::BK, r, c) as usize), src as *const u8, if ok { 16 } else { 0 });
        }
        if (i as u32) < BN * cpr / T::BM {
            let (wrow, nok) = b_row(a, n0, r);
            let ok = nok && gk < a.k;
            let src = if ok { wrow.add(gk as usize) } else { a.w };
            cp_async_16(sb.add(swz(T::BK, r, c) as usize), src as *const u8, if ok { 16 } else { 0 });
        }
    });
}

/// The main loop; returns the warp's 64x64 accumulator tile (4 m16 x 8 n8 fragments).
/// Warp w computes rows (w >> 1)·64.. and columns (w & 1)·64.. of the block tile.
#[inline(always)]
unsafe fn mma_mainloop<T: MmaTile>(
    a: &MmaArgs,
    smem: *mut u8,
    m0: u32,
    n0: u32,
) -> [[[f32; 4]; 8]; 4] {
    let lane = lane_id();
    let warp = warp_id();
    let (wm, wn) = (warp >> 1, warp & 1);
    let mut acc = [[[0.0f32; 4]; 8]; 4];
    let kt_n = div_ceil(a.k, T::BK);
    let mut s = 0;
    while s < T::ST - 1 {
        if s < kt_n {
            load_stage::<T>(a, smem, s, s, m0, n0);
        }
        cp_async_commit();
        s += 1;
    }
    // ldmatrix lane roles: matrix j = lane / 8, row r = lane % 8
    let (j, r) = (lane >> 3, lane & 7);
    let mut kt = 0;
    while kt < kt_n {
        cp_async_wait_n(T::ST - 2);
        sync_threads();
        let pf = kt + T::ST - 1;
        if pf < kt_n {
            load_stage::<T>(a, smem, pf % T::ST, pf, m0, n0);
        }
        cp_async_commit();
        let sa = smem.add(((kt % T::ST) * stage_bytes(T::BM, T::BK)) as usize) as *const u8;
        let sb = sa.add((T::BM * T::BK * 2) as usize);
        // BK / 16 k16 steps per stage, in K order
        unroll!(kk in 0..4 => {
            if (kk as u32) < T::BK / 16 {
                let kc = kk as u32 * 2;
                let mut af = [[0u32; 4]; 4];
                unroll!(i in 0..4 => {
                    let row = wm * 64 + i as u32 * 16 + (j & 1) * 8 + r;
                    af[i] = ldmatrix_x4(sa.add(swz(T::BK, row, kc + (j >> 1)) as usize));
                });
                let mut bf = [[0u32; 4]; 4];
                unroll!(p in 0..4 => {
                    let row = wn * 64 + p as u32 * 16 + (j >> 1) * 8 + r;
                    bf[p] = ldmatrix_x4(sb.add(swz(T::BK, row, kc + (j & 1)) as usize));
                });
                unroll!(i in 0..4 => {
                    unroll!(jn in 0..8 => {
                        let b = bf[jn >> 1];
                        let h = (jn & 1) * 2;
                        acc[i][jn] = mma_bf16_16816(acc[i][jn], af[i], [b[h], b[h + 1]]);
                    });
                });
            }
        });
        kt += 1;
    }
    cp_async_wait::<0>();
    acc
}

#[inline(always)]
pub(crate) unsafe fn check_mma_args(x: *const Bf16, w: *const Bf16, k: u32, ldx: u32) {
    if k % 8 != 0 || ldx % 8 != 0 || !aligned16(x as usize) || !aligned16(w as usize) {
        trap();
    }
}

/// This block's (column block, row block) of the output: grid order, or grouped
/// ([`raster`]) when the tile says so.
#[inline(always)]
fn block_tile<T: MmaTile>() -> (u32, u32) {
    if T::GROUP == 0 {
        (block_idx_x(), block_idx_y())
    } else {
        raster(
            block_idx_x(),
            block_idx_y(),
            grid_dim_x(),
            grid_dim_y(),
            T::GROUP,
        )
    }
}

#[inline(always)]
unsafe fn gemm_mma<O: Elem, T: MmaTile>(
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
    smem: *mut u8,
) {
    check_mma_args(x, w, k, ldx);
    let a = MmaArgs {
        x: x as *const u16,
        w: w as *const u16,
        w2: 0 as *const u16,
        m,
        n,
        k,
        ldx,
    };
    let (bx, by) = block_tile::<T>();
    let (n0, m0) = (bx * BN, by * T::BM);
    let acc = mma_mainloop::<T>(&a, smem, m0, n0);
    let lane = lane_id();
    let warp = warp_id();
    let (wm, wn) = (warp >> 1, warp & 1);
    let (g, t) = (lane >> 2, lane & 3);
    unroll!(i in 0..4 => {
        unroll!(jn in 0..8 => {
            unroll!(e in 0..4 => {
                let row = m0 + wm * 64 + i as u32 * 16 + g + (e as u32 >> 1) * 8;
                let col = n0 + wn * 64 + jn as u32 * 8 + t * 2 + (e as u32 & 1);
                if row < m && col < n {
                    store_out(y, ldy, bias, residual, row, col, acc[i][jn][e]);
                }
            });
        });
    });
}

#[inline(always)]
unsafe fn gemm_mma_silu<T: MmaTile>(
    y: *mut Bf16,
    x: *const Bf16,
    w_gate: *const Bf16,
    w_up: *const Bf16,
    m: u32,
    n: u32,
    k: u32,
    ldx: u32,
    ldy: u32,
    smem: *mut u8,
) {
    check_mma_args(x, w_gate, k, ldx);
    check_mma_args(x, w_up, k, ldx);
    let a = MmaArgs {
        x: x as *const u16,
        w: w_gate as *const u16,
        w2: w_up as *const u16,
        m,
        n,
        k,
        ldx,
    };
    let (bx, by) = block_tile::<T>();
    let (n0, m0) = (bx * (BN / 2), by * T::BM);
    let acc = mma_mainloop::<T>(&a, smem, m0, n0);
    let lane = lane_id();
    let warp = warp_id();
    let (wm, wn) = (warp >> 1, warp & 1);
    let (g, t) = (lane >> 2, lane & 3);
    unroll!(i in 0..4 => {
        unroll!(jp in 0..4 => {
            unroll!(e in 0..4 => {
                let row = m0 + wm * 64 + i as u32 * 16 + g + (e as u32 >> 1) * 8;
                let col = n0 + wn * 32 + jp as u32 * 8 + t * 2 + (e as u32 & 1);
                if row < m && col < n {
                    let v = silu_gate(acc[i][2 * jp][e], acc[i][2 * jp + 1][e]);
                    *y.add((row * ldy + col) as usize) = Bf16::from_f32(v);
                }
            });
        });
    });
}

/// The wide kernels' shared memory: the launch's dynamic shared memory; traps unless the
/// block has `MMA_WIDE_BM` threads and the launch gave `MMA_WIDE_SMEM` bytes.
#[inline(always)]
fn wide_smem() -> *mut u8 {
    if block_dim() != MMA_WIDE_BM {
        trap();
    }
    dynamic_shared(MMA_WIDE_SMEM)
}

kernels! {
    /// Decode GEMM, bf16 out. block `dec_block(grid.x, SMs)` (256 or 512), grid.x = ceil(n / DEC_COLS) = ceil(n / 16).
    pub fn gemm_decode_bf16(y: *mut Bf16, x: *const Bf16, w: *const Bf16, bias: *const Bf16, residual: *const Bf16, m: u32, n: u32, k: u32, ldx: u32, ldy: u32) prefetch {
        prefetch_rows(w, block_idx_x() * DEC_COLS, DEC_COLS, n, k);
    } {
        let red = shared_bytes!(dec_smem, 16384) as *mut f32;
        gemm_decode(y, x, w, bias, residual, m, n, k, ldx, ldy, red, 0 as *mut f32, 0, block_idx_x(), DecNorm::NONE);
    }
    /// `gemm_decode_bf16` as ptxas compiles it without a register cap (same code, arguments,
    /// launch and results, to the bit): 64 registers, and ptxas then sinks an iteration's
    /// loads between its mmas. `remp-gpu-bench`'s same-run baseline for the cap (see
    /// `maxnreg.txt`; the name does not start with `gemm_decode_`, so it is not capped).
    pub fn gemm_decode64_bf16(y: *mut Bf16, x: *const Bf16, w: *const Bf16, bias: *const Bf16, residual: *const Bf16, m: u32, n: u32, k: u32, ldx: u32, ldy: u32) prefetch {
        prefetch_rows(w, block_idx_x() * DEC_COLS, DEC_COLS, n, k);
    } {
        let red = shared_bytes!(dec_smem, 16384) as *mut f32;
        gemm_decode(y, x, w, bias, residual, m, n, k, ldx, ldy, red, 0 as *mut f32, 0, block_idx_x(), DecNorm::NONE);
    }
    /// Decode GEMM, f32 out (e.g. logits). block 256 or 512 (`dec_block`), grid.x = ceil(n / 16).
    pub fn gemm_decode_bf16_f32out(y: *mut f32, x: *const Bf16, w: *const Bf16, bias: *const Bf16, residual: *const Bf16, m: u32, n: u32, k: u32, ldx: u32, ldy: u32) prefetch {
        prefetch_rows(w, block_idx_x() * DEC_COLS, DEC_COLS, n, k);
    } {
        let red = shared_bytes!(dec_smem, 16384) as *mut f32;
        gemm_decode(y, x, w, bias, residual, m, n, k, ldx, ldy, red, 0 as *mut f32, 0, block_idx_x(), DecNorm::NONE);
    }
    /// Three decode GEMMs on one x in one launch (the q, k and v projections):
    /// `y_i[m, n_i] = x[m, k] · W_iᵀ (+ b_i)`, row stride n_i. The first ceil(n0 / 16) blocks
    /// compute y0, the next ceil(n1 / 16) y1, the rest y2, each running exactly
    /// `gemm_decode_bf16`'s code for its matrix: the results of three launches with the
    /// same block size, to the bit (the block size sets how many warps split K, hence the
    /// summation order); two launches fewer per layer. block `dec_block(grid.x, SMs)`,
    /// grid.x = Σ ceil(n_i / 16).
    /// `norm` (the layer's input RMSNorm weight `[k]`) not null: x is the un-normalized
    /// hidden state and every block normalizes it as it loads it (`DecNorm`; the
    /// vectorised path only: k % 8 == 0, ldx % 8 == 0, 16-byte-aligned x and norm, else it
    /// traps).
    pub fn gemm_decode_qkv_bf16(y0: *mut Bf16, y1: *mut Bf16, y2: *mut Bf16, x: *const Bf16, w0: *const Bf16, w1: *const Bf16, w2: *const Bf16, b0: *const Bf16, b1: *const Bf16, b2: *const Bf16, norm: *const Bf16, eps: f32, m: u32, n0: u32, n1: u32, n2: u32, k: u32, ldx: u32) prefetch {
        let (i, blk) = qkv_pick(block_idx_x(), div_ceil(n0, DEC_COLS), div_ceil(n1, DEC_COLS));
        let (w, n) = if i == 0 { (w0, n0) } else if i == 1 { (w1, n1) } else { (w2, n2) };
        prefetch_rows(w, blk * DEC_COLS, DEC_COLS, n, k);
    } {
        let smem = shared_bytes!(dec_smem, DEC_NORM_SMEM) as *mut f32;
        let (red, inv) = (smem, smem.add(4096));
        let (i, blk) = qkv_pick(block_idx_x(), div_ceil(n0, DEC_COLS), div_ceil(n1, DEC_COLS));
        // (uniform per block: the whole block takes one branch, barriers stay matched)
        let (y, w, bias, n) = if i == 0 {
            (y0, w0, b0, n0)
        } else if i == 1 {
            (y1, w1, b1, n1)
        } else {
            (y2, w2, b2, n2)
        };
        let norm = DecNorm { w: norm as *const u16, eps, inv };
        gemm_decode(y, x, w, bias, 0 as *const Bf16, m, n, k, ldx, n, red, 0 as *mut f32, 0, blk, norm);
    }
    /// `gemm_decode_qkv_bf16` (with its optional fused RMSNorm) then `rope_kv_write_bf16`
    /// in one launch, for decode steps: q rows rotated into `q` `[m, nq]`, k rotated and
    /// v written straight into the paged caches at `slots[row]` (`[slot][nkv]`,
    /// `U32_MAX` = skip), positions `pos[row]`, frequencies `inv_freq[head_dim / 2]`. The
    /// same bits as the two launches at the same block size (each output element sums
    /// the same K split; q/k blocks pair 8 columns of a head's first half with the 8
    /// they rotate with, so a block's output columns differ, not their sums). Needs
    /// head_dim % 16 == 0, nq and nkv multiples of head_dim, the vectorised path
    /// (k, ldx multiples of 8, 16-byte-aligned x); traps otherwise. block
    /// `dec_block(grid.x, SMs)`, grid.x = (nq + 2·nkv) / 16.
    pub fn gemm_decode_qkv_rope_bf16(q: *mut Bf16, x: *const Bf16, wq: *const Bf16, wk: *const Bf16, wv: *const Bf16, bq: *const Bf16, bk: *const Bf16, bv: *const Bf16, norm: *const Bf16, eps: f32, pos: *const u32, inv_freq: *const f32, k_cache: *mut Bf16, v_cache: *mut Bf16, slots: *const u32, m: u32, nq: u32, nkv: u32, k: u32, ldx: u32, head_dim: u32) prefetch {
        let (i, blk) = qkv_pick(block_idx_x(), nq / DEC_COLS, nkv / DEC_COLS);
        let (w, n) = if i == 0 { (wq, nq) } else if i == 1 { (wk, nkv) } else { (wv, nkv) };
        if head_dim % DEC_COLS == 0 && head_dim != 0 {
            let (c0, c1) = rope_tiles(i, blk, head_dim);
            prefetch_rows(w, c0, 8, n, k);
            prefetch_rows(w, c1, 8, n, k);
        }
    } {
        let smem = shared_bytes!(dec_smem, DEC_NORM_SMEM) as *mut f32;
        let norm = DecNorm { w: norm as *const u16, eps, inv: smem.add(4096) };
        let out = RopeOut { q, pos, inv_freq, k_cache, v_cache, slots, head_dim };
        gemm_decode_qkv_rope(x, [wq, wk, wv], [bq, bk, bv], (m, nq, nkv, k, ldx), out, smem, norm);
    }
    /// Split-K decode GEMM, partials: `part[s][m][n]` (f32, splits x m x n) = x[m, K_s] · W[n, K_s]ᵀ
    /// over K_s = elements s·kchunk .. (s+1)·kchunk of K (s = block_idx_y; kchunk > 0, multiple
    /// of 8, else it traps; see `dec_splitk`). No epilogue: `gemm_splitk_reduce_*` follows.
    /// block 256 or 512 (`dec_block(grid.x * grid.y, SMs)`), grid = (ceil(n / 16), splits).
    pub fn gemm_decode_splitk_bf16(part: *mut f32, x: *const Bf16, w: *const Bf16, m: u32, n: u32, k: u32, ldx: u32, kchunk: u32) {
        let red = shared_bytes!(dec_smem, 16384) as *mut f32;
        if kchunk == 0 || kchunk % 8 != 0 || part as usize == 0 {
            trap();
        }
        gemm_decode(0 as *mut f32, x, w, 0 as *const Bf16, 0 as *const Bf16, m, n, k, ldx, n, red, part, kchunk, block_idx_x(), DecNorm::NONE);
    }
    /// Split-K reduce, bf16 out: y = Σ_s part[s] (in order) (+ bias) (+ residual), as the fused
    /// epilogue. Any launch shape (grid-stride); the launchers use block 256, grid ceil(m·n / 256).
    pub fn gemm_splitk_reduce_bf16(y: *mut Bf16, part: *const f32, bias: *const Bf16, residual: *const Bf16, m: u32, n: u32, ldy: u32, splits: u32) {
        splitk_reduce(y, part, bias, residual, m, n, ldy, splits);
    }
    /// Split-K reduce, f32 out. Any launch shape; block 256, grid ceil(m·n / 256).
    pub fn gemm_splitk_reduce_bf16_f32out(y: *mut f32, part: *const f32, bias: *const Bf16, residual: *const Bf16, m: u32, n: u32, ldy: u32, splits: u32) {
        splitk_reduce(y, part, bias, residual, m, n, ldy, splits);
    }
    /// Decode gate/up GEMM with SiLU·mul. block 256 or 512 (`dec_block`), grid.x = ceil(n / 8).
    /// `norm` not null: the post-attention RMSNorm fused into the x loads, as in
    /// `gemm_decode_qkv_bf16`.
    pub fn gemm_decode_silu_bf16(y: *mut Bf16, x: *const Bf16, w_gate: *const Bf16, w_up: *const Bf16, norm: *const Bf16, eps: f32, m: u32, n: u32, k: u32, ldx: u32, ldy: u32) prefetch {
        let nb = block_idx_x() * (DEC_COLS / 2);
        prefetch_rows(w_gate, nb, DEC_COLS / 2, n, k);
        prefetch_rows(w_up, nb, DEC_COLS / 2, n, k);
    } {
        let smem = shared_bytes!(dec_smem, DEC_NORM_SMEM) as *mut f32;
        let norm = DecNorm { w: norm as *const u16, eps, inv: smem.add(4096) };
        gemm_decode_silu(y, x, w_gate, w_up, m, n, k, ldx, ldy, smem, norm);
    }
    /// Tensor-core GEMM, bf16 out. block 128, grid = (ceil(n / 128), ceil(m / 128)).
    pub fn gemm_mma_bf16(y: *mut Bf16, x: *const Bf16, w: *const Bf16, bias: *const Bf16, residual: *const Bf16, m: u32, n: u32, k: u32, ldx: u32, ldy: u32) {
        let smem = shared_bytes!(gemm_smem, 49152);
        gemm_mma::<Bf16, Tile128>(y, x, w, bias, residual, m, n, k, ldx, ldy, smem);
    }
    /// Tensor-core GEMM, f32 out. block 128, grid = (ceil(n / 128), ceil(m / 128)).
    pub fn gemm_mma_bf16_f32out(y: *mut f32, x: *const Bf16, w: *const Bf16, bias: *const Bf16, residual: *const Bf16, m: u32, n: u32, k: u32, ldx: u32, ldy: u32) {
        let smem = shared_bytes!(gemm_smem, 49152);
        gemm_mma::<f32, Tile128>(y, x, w, bias, residual, m, n, k, ldx, ldy, smem);
    }
    /// Tensor-core gate/up GEMM with SiLU·mul. block 128, grid = (ceil(n / 64), ceil(m / 128)).
    pub fn gemm_mma_silu_bf16(y: *mut Bf16, x: *const Bf16, w_gate: *const Bf16, w_up: *const Bf16, m: u32, n: u32, k: u32, ldx: u32, ldy: u32) {
        let smem = shared_bytes!(gemm_smem, 49152);
        gemm_mma_silu::<Tile128>(y, x, w_gate, w_up, m, n, k, ldx, ldy, smem);
    }
    /// Wide tensor-core GEMM (256x128 block tile), bf16 out; same arguments and results as
    /// `gemm_mma_bf16`. block 256 (`MMA_WIDE_BM`), grid = (ceil(n / 128), ceil(m / 256)),
    /// dynamic shared memory `MMA_WIDE_SMEM` (96 KiB; traps with less).
    pub fn gemm_mma_wide_bf16(y: *mut Bf16, x: *const Bf16, w: *const Bf16, bias: *const Bf16, residual: *const Bf16, m: u32, n: u32, k: u32, ldx: u32, ldy: u32) {
        gemm_mma::<Bf16, TileWide>(y, x, w, bias, residual, m, n, k, ldx, ldy, wide_smem());
    }
    /// Wide tensor-core GEMM, f32 out. block 256, grid = (ceil(n / 128), ceil(m / 256)),
    /// dynamic shared memory `MMA_WIDE_SMEM`.
    pub fn gemm_mma_wide_bf16_f32out(y: *mut f32, x: *const Bf16, w: *const Bf16, bias: *const Bf16, residual: *const Bf16, m: u32, n: u32, k: u32, ldx: u32, ldy: u32) {
        gemm_mma::<f32, TileWide>(y, x, w, bias, residual, m, n, k, ldx, ldy, wide_smem());
    }
    /// Wide tensor-core gate/up GEMM with SiLU·mul. block 256, grid = (ceil(n / 64),
    /// ceil(m / 256)), dynamic shared memory `MMA_WIDE_SMEM`.
    pub fn gemm_mma_wide_silu_bf16(y: *mut Bf16, x: *const Bf16, w_gate: *const Bf16, w_up: *const Bf16, m: u32, n: u32, k: u32, ldx: u32, ldy: u32) {
        gemm_mma_silu::<TileWide>(y, x, w_gate, w_up, m, n, k, ldx, ldy, wide_smem());
    }
}

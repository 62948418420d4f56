//! GPU implementation of the primitive layer: special registers, barriers, shuffles,
//! fast math, bf16/f16 conversions, 128-bit global loads, `cp.async`, `ldmatrix`,
//! `mma.sync`. Everything is `#[inline(always)]`: the crate is compiled as one module
//! and an out-of-line call would need a linker we do not have.
use crate::minicore::*;

#[allow(improper_ctypes)]
extern "C" {
    #[link_name = "llvm.nvvm.read.ptx.sreg.tid.x"]
    fn sreg_tid_x() -> u32;
    #[link_name = "llvm.nvvm.read.ptx.sreg.ntid.x"]
    fn sreg_ntid_x() -> u32;
    #[link_name = "llvm.nvvm.read.ptx.sreg.ctaid.x"]
    fn sreg_ctaid_x() -> u32;
    #[link_name = "llvm.nvvm.read.ptx.sreg.ctaid.y"]
    fn sreg_ctaid_y() -> u32;
    #[link_name = "llvm.nvvm.read.ptx.sreg.ctaid.z"]
    fn sreg_ctaid_z() -> u32;
    #[link_name = "llvm.nvvm.read.ptx.sreg.nctaid.x"]
    fn sreg_nctaid_x() -> u32;
    #[link_name = "llvm.nvvm.read.ptx.sreg.nctaid.y"]
    fn sreg_nctaid_y() -> u32;
    #[link_name = "llvm.nvvm.read.ptx.sreg.nctaid.z"]
    fn sreg_nctaid_z() -> u32;
    #[link_name = "llvm.nvvm.barrier0"]
    fn nvvm_barrier0();
    #[link_name = "llvm.nvvm.shfl.sync.bfly.i32"]
    fn nvvm_shfl_bfly(mask: u32, v: u32, lane_mask: u32, clamp: u32) -> u32;
    #[link_name = "llvm.nvvm.shfl.sync.idx.i32"]
    fn nvvm_shfl_idx(mask: u32, v: u32, src: u32, clamp: u32) -> u32;
    #[link_name = "llvm.fma.f32"]
    fn llvm_fma(a: f32, b: f32, c: f32) -> f32;
    #[link_name = "llvm.maxnum.f32"]
    fn llvm_maxnum(a: f32, b: f32) -> f32;
    #[link_name = "llvm.minnum.f32"]
    fn llvm_minnum(a: f32, b: f32) -> f32;
    #[link_name = "llvm.sqrt.f32"]
    fn llvm_sqrt(a: f32) -> f32;
}

#[inline(always)]
pub fn thread_idx() -> u32 {
    unsafe { sreg_tid_x() }
}
#[inline(always)]
pub fn block_dim() -> u32 {
    unsafe { sreg_ntid_x() }
}
#[inline(always)]
pub fn block_idx_x() -> u32 {
    unsafe { sreg_ctaid_x() }
}
#[inline(always)]
pub fn block_idx_y() -> u32 {
    unsafe { sreg_ctaid_y() }
}
#[inline(always)]
pub fn block_idx_z() -> u32 {
    unsafe { sreg_ctaid_z() }
}
#[inline(always)]
pub fn grid_dim_x() -> u32 {
    unsafe { sreg_nctaid_x() }
}
#[inline(always)]
pub fn grid_dim_y() -> u32 {
    unsafe { sreg_nctaid_y() }
}
#[inline(always)]
pub fn grid_dim_z() -> u32 {
    unsafe { sreg_nctaid_z() }
}
/// `__syncthreads()`.
#[inline(always)]
pub fn sync_threads() {
    unsafe { nvvm_barrier0() }
}
/// Butterfly shuffle over the full warp (all 32 lanes must call it).
#[inline(always)]
pub fn shfl_xor_u32(v: u32, lane_mask: u32) -> u32 {
    unsafe { nvvm_shfl_bfly(0xffff_ffff, v, lane_mask, 0x1f) }
}
/// Read `v` of lane `src` (all 32 lanes must call it).
#[inline(always)]
pub fn shfl_idx_u32(v: u32, src: u32) -> u32 {
    unsafe { nvvm_shfl_idx(0xffff_ffff, v, src, 0x1f) }
}

#[inline(always)]
pub fn fma(a: f32, b: f32, c: f32) -> f32 {
    unsafe { llvm_fma(a, b, c) }
}
#[inline(always)]
pub fn fmax(a: f32, b: f32) -> f32 {
    unsafe { llvm_maxnum(a, b) }
}
#[inline(always)]
pub fn fmin(a: f32, b: f32) -> f32 {
    unsafe { llvm_minnum(a, b) }
}
#[inline(always)]
pub fn sqrt(a: f32) -> f32 {
    unsafe { llvm_sqrt(a) }
}
/// 2^x, `ex2.approx` (about 2 ulp).
#[inline(always)]
pub fn exp2(x: f32) -> f32 {
    let r: f32;
    unsafe {
        asm!("ex2.approx.ftz.f32 {0}, {1};", out(reg32) r, in(reg32) x, options(pure, nomem, nostack))
    };
    r
}
/// 1/sqrt(x), `rsqrt.approx` (about 2 ulp).
#[inline(always)]
pub fn rsqrt(x: f32) -> f32 {
    let r: f32;
    unsafe {
        asm!("rsqrt.approx.ftz.f32 {0}, {1};", out(reg32) r, in(reg32) x, options(pure, nomem, nostack))
    };
    r
}
#[inline(always)]
pub fn f32_to_bits(x: f32) -> u32 {
    unsafe { transmute::<f32, u32>(x) }
}
#[inline(always)]
pub fn f32_from_bits(x: u32) -> f32 {
    unsafe { transmute::<u32, f32>(x) }
}
#[inline(always)]
pub fn f64_to_bits(x: f64) -> u64 {
    unsafe { transmute::<f64, u64>(x) }
}
/// f32 -> bf16 bits, round to nearest even.
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    let r: u16;
    unsafe {
        asm!("cvt.rn.bf16.f32 {0}, {1};", out(reg16) r, in(reg32) x, options(pure, nomem, nostack))
    };
    r
}
/// f32 -> f16 bits, round to nearest even.
#[inline(always)]
pub fn f32_to_f16(x: f32) -> u16 {
    let r: u16;
    unsafe {
        asm!("cvt.rn.f16.f32 {0}, {1};", out(reg16) r, in(reg32) x, options(pure, nomem, nostack))
    };
    r
}
#[inline(always)]
pub fn f16_to_f32(x: u16) -> f32 {
    let r: f32;
    unsafe {
        asm!("cvt.f32.f16 {0}, {1};", out(reg32) r, in(reg16) x, options(pure, nomem, nostack))
    };
    r
}

/// 16-byte load from global memory (`p` 16-byte aligned).
#[inline(always)]
pub unsafe fn ld_global_v4(p: *const u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    asm!("{{ .reg .u64 g; cvta.to.global.u64 g, {p}; ld.global.v4.u32 {{{a}, {b}, {c}, {d}}}, [g]; }}",
         p = in(reg64) p, a = out(reg32) a, b = out(reg32) b, c = out(reg32) c, d = out(reg32) d,
         options(readonly, nostack));
    [a, b, c, d]
}
/// 16-byte load through the read-only path (data not written during the kernel).
#[inline(always)]
pub unsafe fn ld_global_nc_v4(p: *const u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    asm!("{{ .reg .u64 g; cvta.to.global.u64 g, {p}; ld.global.nc.v4.u32 {{{a}, {b}, {c}, {d}}}, [g]; }}",
         p = in(reg64) p, a = out(reg32) a, b = out(reg32) b, c = out(reg32) c, d = out(reg32) d,
         options(readonly, nostack));
    [a, b, c, d]
}
/// `ld_global_nc_v4(p)` when `ok`, else zeros without touching `p`: a predicated load
/// (no branch), so a run of them stays one basic block and ptxas can issue them all
/// before their uses.
#[inline(always)]
pub unsafe fn ld_global_nc_v4_if(p: *const u32, ok: bool) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    asm!("{{ .reg .pred q; .reg .u64 g; setp.ne.u32 q, {ok}, 0; mov.u32 {a}, 0; mov.u32 {b}, 0; mov.u32 {c}, 0; mov.u32 {d}, 0; cvta.to.global.u64 g, {p}; @q ld.global.nc.v4.u32 {{{a}, {b}, {c}, {d}}}, [g]; }}",
         p = in(reg64) p, ok = in(reg32) ok as u32, a = out(reg32) a, b = out(reg32) b, c = out(reg32) c, d = out(reg32) d,
         options(readonly, nostack));
    [a, b, c, d]
}
/// Programmatic dependent launch (Hopper), kernel side: wait until the grids this one
/// was launched to depend on have completed and their memory is visible. Returns at once
/// for a kernel launched without the PDL attribute. `kernels!` calls it (then
/// [`pdl_launch_dependents`]) at the top of every kernel, so any kernel may be launched
/// with the attribute; only a kernel's `prefetch` block runs before it. A no-op before
/// sm_90 (the sm_80 module: the host never sets the attribute there).
#[inline(always)]
pub fn pdl_wait() {
    #[cfg(target_feature = "sm_90")]
    unsafe {
        asm!("griddepcontrol.wait;", options(nostack))
    }
}
/// Programmatic dependent launch: lets the next kernel in the stream (launched with the
/// PDL attribute) be scheduled once every block of this one has called it or exited;
/// that kernel's own [`pdl_wait`] still waits for this one to complete. A no-op before
/// sm_90.
#[inline(always)]
pub fn pdl_launch_dependents() {
    #[cfg(target_feature = "sm_90")]
    unsafe {
        asm!("griddepcontrol.launch_dependents;", options(nostack))
    }
}
/// Hint: bring the 128-byte line holding `p` (global memory) into L2. Never faults and
/// never returns stale data (L2 is where the GPU's writes meet), so a kernel may issue it
/// before [`pdl_wait`] for memory the previous kernel does not write (weights).
#[inline(always)]
pub unsafe fn prefetch_l2(p: *const u8) {
    asm!("{{ .reg .u64 g; cvta.to.global.u64 g, {p}; prefetch.global.L2 [g]; }}",
         p = in(reg64) p, options(readonly, nostack));
}
/// 16-byte store to global memory (`p` 16-byte aligned).
#[inline(always)]
pub unsafe fn st_global_v4(p: *mut u32, v: [u32; 4]) {
    asm!("{{ .reg .u64 g; cvta.to.global.u64 g, {p}; st.global.v4.u32 [g], {{{a}, {b}, {c}, {d}}}; }}",
         p = in(reg64) p, a = in(reg32) v[0], b = in(reg32) v[1], c = in(reg32) v[2], d = in(reg32) v[3],
         options(nostack));
}

/// 16-byte load from shared memory (`p` a generic address in shared memory, 16-byte
/// aligned).
#[inline(always)]
pub unsafe fn ld_shared_v4(p: *const u8) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    asm!("{{ .reg .u64 s; cvta.to.shared.u64 s, {p}; ld.shared.v4.u32 {{{a}, {b}, {c}, {d}}}, [s]; }}",
         p = in(reg64) p, a = out(reg32) a, b = out(reg32) b, c = out(reg32) c, d = out(reg32) d,
         options(readonly, nostack));
    [a, b, c, d]
}

// The launch's dynamic shared memory (`sharedMemBytes` of `cuLaunchKernel`): one
// module-scope declaration (PTX allows `.extern .shared` only there), used by the
// kernels that call `dynamic_shared`; it adds nothing to the others' shared memory.
global_asm!(".extern .shared .align 16 .b8 remp_dyn_smem[];");

/// Bytes of dynamic shared memory this launch was given (`%dynamic_smem_size`).
#[inline(always)]
pub fn dynamic_shared_size() -> u32 {
    let r: u32;
    unsafe {
        asm!("mov.u32 {0}, %dynamic_smem_size;", out(reg32) r, options(pure, nomem, nostack))
    };
    r
}
/// The launch's dynamic shared memory (16-byte aligned, generic address); traps when
/// the launch gave less than `bytes` (a launch without the kernel's
/// `sharedMemBytes` would otherwise address shared memory it does not own).
#[inline(always)]
pub fn dynamic_shared(bytes: u32) -> *mut u8 {
    if dynamic_shared_size() < bytes {
        trap();
    }
    let p: u64;
    unsafe {
        asm!("cvta.shared.u64 {p}, remp_dyn_smem;", p = out(reg64) p, options(pure, nomem, nostack))
    };
    p as *mut u8
}

/// Asynchronous 16-byte global -> shared copy; bytes past `src_bytes` (0..=16) are zero-filled.
#[inline(always)]
pub unsafe fn cp_async_16(dst_shared: *mut u8, src: *const u8, src_bytes: u32) {
    asm!("{{ .reg .u64 s, g; cvta.to.shared.u64 s, {d}; cvta.to.global.u64 g, {p}; cp.async.cg.shared.global [s], [g], 16, {n}; }}",
         d = in(reg64) dst_shared, p = in(reg64) src, n = in(reg32) src_bytes, options(nostack));
}
#[inline(always)]
pub fn cp_async_commit() {
    unsafe { asm!("cp.async.commit_group;", options(nostack)) };
}
/// Wait until at most `N` committed `cp.async` groups are still in flight.
#[inline(always)]
pub fn cp_async_wait<const N: u32>() {
    unsafe { asm!("cp.async.wait_group {n};", n = const N, options(nostack)) };
}
/// `ldmatrix .x4`: lane `i` gives the address of row `i % 8` of matrix `i / 8` (8x8 b16
/// matrices, 16-byte rows in shared memory); returns one 32-bit fragment per matrix.
#[inline(always)]
pub unsafe fn ldmatrix_x4(row: *const u8) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    asm!("{{ .reg .u64 s; cvta.to.shared.u64 s, {p}; ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{a}, {b}, {c}, {d}}}, [s]; }}",
         p = in(reg64) row, a = out(reg32) a, b = out(reg32) b, c = out(reg32) c, d = out(reg32) d,
         options(readonly, nostack));
    [a, b, c, d]
}
/// `ldmatrix .x4 .trans`: the same addressing as [`ldmatrix_x4`], each 8x8 matrix
/// transposed: lane `l` receives elements (rows `2(l%4)`, `2(l%4)+1`; column `l/4`) of
/// each matrix (low half first) — a B fragment of `mma` from a row-major `[k][n]` tile.
#[inline(always)]
pub unsafe fn ldmatrix_x4_trans(row: *const u8) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    asm!("{{ .reg .u64 s; cvta.to.shared.u64 s, {p}; ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {{{a}, {b}, {c}, {d}}}, [s]; }}",
         p = in(reg64) row, a = out(reg32) a, b = out(reg32) b, c = out(reg32) c, d = out(reg32) d,
         options(readonly, nostack));
    [a, b, c, d]
}
/// D = A·B + C for one warp, A 16x16 bf16 (row), B 16x8 bf16 (col), C/D 16x8 f32.
#[inline(always)]
pub fn mma_bf16_16816(c: [f32; 4], a: [u32; 4], b: [u32; 2]) -> [f32; 4] {
    let (mut d0, mut d1, mut d2, mut d3) = (c[0], c[1], c[2], c[3]);
    unsafe {
        asm!("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {{{d0}, {d1}, {d2}, {d3}}}, {{{a0}, {a1}, {a2}, {a3}}}, {{{b0}, {b1}}}, {{{d0}, {d1}, {d2}, {d3}}};",
             d0 = inout(reg32) d0, d1 = inout(reg32) d1, d2 = inout(reg32) d2, d3 = inout(reg32) d3,
             a0 = in(reg32) a[0], a1 = in(reg32) a[1], a2 = in(reg32) a[2], a3 = in(reg32) a[3],
             b0 = in(reg32) b[0], b1 = in(reg32) b[1], options(pure, nomem, nostack));
    }
    [d0, d1, d2, d3]
}
/// 32-bit shared-window address of a generic pointer into shared memory (what
/// `ld.shared` and wgmma matrix descriptors take).
#[inline(always)]
pub fn shared_addr(p: *const u8) -> u32 {
    let r: u32;
    unsafe {
        asm!("{{ .reg .u64 s; cvta.to.shared.u64 s, {p}; cvt.u32.u64 {r}, s; }}",
             p = in(reg64) p, r = out(reg32) r, options(pure, nomem, nostack))
    };
    r
}
/// `fence.proxy.async.shared::cta` (sm_90): this thread's earlier writes to shared
/// memory (incl. landed `cp.async` copies) become visible to the async proxy, which
/// wgmma reads its shared-memory operands through.
#[inline(always)]
pub fn fence_proxy_async() {
    unsafe { asm!("fence.proxy.async.shared::cta;", options(nostack)) };
}

/// The wgmma accumulator registers of one thread for m64n256: 128 f32.
pub type WgAcc = [f32; 128];

/// Zeroed accumulators. (From a `[0u32; 128]`, which becomes a memset the compiler
/// splits into registers; a `[0.0f32; 128]` becomes a store loop that keeps the array
/// in local memory.)
#[inline(always)]
pub fn wg_acc_zero() -> WgAcc {
    unsafe { transmute::<[u32; 128], WgAcc>([0u32; 128]) }
}

// The wgmma primitives (sm_90a) name every accumulator register as an in-out operand,
// the fence and the wait too (in a PTX comment): the asm statements then order every
// use of the accumulators in the compiler's view as the hardware needs it, like
// CUTLASS's `warpgroup_fence_operand`: nothing reads them between the issue and the
// wait that makes the results visible, or writes them between the fence and the issue.
macro_rules! acc_asm {
    (@ [$i0:literal $($i:literal)*] $acc:ident, $head:literal, $tail:literal, $($rest:tt)*) => {
        asm!(
            concat!($head, "{", $i0, "}" $(, ", {", $i, "}")*, $tail),
            inout(reg32) $acc[$i0], $(inout(reg32) $acc[$i],)*
            $($rest)*
        )
    };
}
macro_rules! acc128_asm {
    ($($args:tt)*) => {
        acc_asm!(@ [0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56 57 58 59 60 61 62 63 64 65 66 67 68 69 70 71 72 73 74 75 76 77 78 79 80 81 82 83 84 85 86 87 88 89 90 91 92 93 94 95 96 97 98 99 100 101 102 103 104 105 106 107 108 109 110 111 112 113 114 115 116 117 118 119 120 121 122 123 124 125 126 127] $($args)*)
    };
}

/// `wgmma.fence.sync.aligned`: orders this thread's earlier register accesses (the
/// accumulators' zeroing, reads of earlier results) before the next wgmma. All 128
/// threads of the warpgroup execute it.
#[inline(always)]
pub fn wgmma_fence(acc: &mut WgAcc) {
    unsafe { acc128_asm!(acc, "wgmma.fence.sync.aligned; // ", "", options(nostack)) };
}
/// `wgmma.commit_group.sync.aligned`: the wgmma operations issued since the last commit
/// form one group.
#[inline(always)]
pub fn wgmma_commit() {
    unsafe { asm!("wgmma.commit_group.sync.aligned;", options(nostack)) };
}
/// `wgmma.wait_group.sync.aligned N`: waits until at most `N` committed groups are in
/// flight; only then do the retired groups' results stand in `acc`.
#[inline(always)]
pub fn wgmma_wait<const N: u32>(acc: &mut WgAcc) {
    unsafe {
        acc128_asm!(acc, "wgmma.wait_group.sync.aligned {n}; // ", "", n = const N, options(nostack))
    };
}
/// `wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16`, A and B from shared memory
/// through matrix descriptors (both K-major: no transpose; scales 1):
/// `acc = A·Bᵀ (+ acc when scale_d)`. Asynchronous: see [`wgmma_wait`].
#[inline(always)]
pub fn wgmma_m64n256k16_bf16(acc: &mut WgAcc, desc_a: u64, desc_b: u64, scale_d: bool) {
    unsafe {
        acc128_asm!(acc,
            "{{ .reg .pred p; setp.ne.b32 p, {sd}, 0; wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {{",
            "}}, {da}, {db}, p, 1, 1, 0, 0; }}",
            da = in(reg64) desc_a, db = in(reg64) desc_b, sd = in(reg32) scale_d as u32,
            options(nostack))
    };
}
/// Abort the kernel.
#[inline(always)]
pub fn trap() -> ! {
    unsafe { asm!("trap;", options(noreturn)) }
}

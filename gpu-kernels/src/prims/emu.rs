//! CPU emulator of the primitive layer, so the same kernel source runs on the host.
//!
//! A launch runs the grid's blocks one after the other on the calling OS thread; a
//! block's GPU threads are stackful coroutines (`corosensei`), switched only where a GPU
//! thread waits for others: `sync_threads` and the warp barriers of shuffles,
//! `ldmatrix` and `mma.sync`. So barriers have true semantics (a thread past a barrier
//! sees everything the others wrote before it) at the cost of a context switch (a few
//! nanoseconds, not an OS thread wake-up), and one launch never needs more than one core.
//! Each scheduling round resumes the waiting threads in a fresh pseudo-random order
//! (seeded per launch, block and round), so a missing barrier shows up whichever thread
//! the data flows from, in one-block launches too; a barrier that some threads never
//! reach is reported as a deadlock (a panic) instead of hanging. Shared memory is one
//! arena per launch, handed out by a per-thread bump allocator (every thread declares
//! the same arrays in the same order, so all get the same addresses), poisoned with
//! 0xFF bytes (NaN as f32/bf16) at launch and again at each block's start, so a block
//! never sees its predecessor's data. Static shared memory (`shared_bytes!`) is limited
//! to 48 KiB per kernel as ptxas limits it; more takes dynamic shared memory, given
//! per launch ([`launch_dyn`], CUDA's `sharedMemBytes`) and reached with
//! [`dynamic_shared`], which traps when the launch gave too little, as on the GPU.
//! Warp operations exchange values through a per-warp mailbox between two warp barriers
//! and reproduce the PTX fragment layouts exactly. `cp.async` reads its source when
//! issued but lands in shared memory only at the `cp_async_wait` that retires its
//! committed group, so a pipeline that reads a stage too early sees stale data.
//! `wgmma` (sm_90a) is warpgroup-collective and asynchronous as on the GPU: operands
//! are read from shared memory through their matrix descriptors (start address,
//! leading / stride byte offsets, 128-byte swizzle applied to the shared-window
//! address) when the warpgroup issues it, and the products reach the accumulators only
//! at the `wgmma_wait` that retires their commit group, so reading them earlier sees
//! the old values; shared memory an in-flight wgmma read that changes before its wait
//! (a stage overwritten too early) and `cp.async` data read by a wgmma without the
//! writing thread's `fence.proxy.async` are reported as panics, as is a thread that
//! ends with wgmma groups not waited for. Shared-window addresses ([`shared_addr`])
//! start at `SHARED_WINDOW_ORIGIN`, deliberately not 1024-byte aligned, so a kernel
//! must align its swizzled tiles itself (as on the GPU, where nothing promises the
//! alignment of dynamic shared memory beyond 16 bytes).
//! A panic in a kernel thread (a `trap`, a failed assertion) ends the launch and
//! propagates to the caller.
extern crate std;

use corosensei::stack::DefaultStack;
use corosensei::{Coroutine, CoroutineResult, Yielder};
use std::boxed::Box;
use std::cell::{Cell, RefCell, UnsafeCell};
use std::vec::Vec;

/// Static shared memory one kernel may declare (`shared_bytes!`, bytes): ptxas refuses
/// more than 48 KiB of `.shared` per entry.
pub const STATIC_SHARED_BYTES: usize = 48 * 1024;
/// Most shared memory (static + dynamic) one block may use: the per-block opt-in limit
/// of sm_90 (H100/H200, 227 KiB), the largest of the PTX modules' targets. Kernels in
/// every module must stay within 99 KiB (sm_86/sm_89 run the sm_80 module), the
/// sm_90a-only kernels within 227 KiB: `host/kernels` checks each kernel's
/// `dynamic_smem` against that.
pub const MAX_SHARED_BYTES: usize = 227 * 1024;
/// Shared-window address ([`shared_addr`]) of the first byte of the arena (static
/// shared memory; dynamic shared memory starts `STATIC_SHARED_BYTES` later). Not a
/// multiple of 1024 on purpose: swizzled wgmma tiles must be aligned by the kernel.
pub const SHARED_WINDOW_ORIGIN: u32 = 0x80;
const MAILBOX_WORDS: usize = 8;
/// Stack of one emulated GPU thread (kernels keep big register arrays on it).
const STACK_BYTES: usize = 256 * 1024;

/// A barrier of `n` coroutines of one launch (all on one OS thread).
struct Barrier {
    n: usize,
    count: Cell<usize>,
    gen: Cell<u64>,
}

impl Barrier {
    fn new(n: usize) -> Self {
        Barrier {
            n,
            count: Cell::new(0),
            gen: Cell::new(0),
        }
    }
    fn wait(&self) {
        let c = ctx();
        let l = launch_of(c);
        l.progress.set(l.progress.get() + 1);
        let gen = self.gen.get();
        let arrived = self.count.get() + 1;
        if arrived == self.n {
            self.count.set(0);
            self.gen.set(gen.wrapping_add(1));
            return;
        }
        self.count.set(arrived);
        while self.gen.get() == gen {
            let y = c.yielder.get();
            // SAFETY: set by the coroutine body before the kernel runs; the coroutine
            // (and so its yielder) is alive while it executes this.
            unsafe { (*y).suspend(()) };
        }
    }
}

struct Launch {
    grid: [u32; 3],
    block: u32,
    bar: Barrier,
    warp_bars: Vec<Barrier>,
    /// One per warpgroup (4 warps) when the block is a whole number of them (wgmma).
    wg_bars: Vec<Barrier>,
    /// `STATIC_SHARED_BYTES` of static shared memory, then the dynamic part.
    smem: Box<[UnsafeCell<u128>]>,
    /// Dynamic shared memory of the launch (bytes, a multiple of 16).
    dyn_bytes: usize,
    mailbox: Box<[UnsafeCell<[u64; MAILBOX_WORDS]>]>,
    /// Per 16 bytes of the arena: 0, or the thread (tid + 1) whose `cp.async` (the
    /// generic proxy) landed it there and has not yet run `fence_proxy_async`: a wgmma
    /// may not read it then.
    unfenced: Box<[Cell<u32>]>,
    /// Per 16 bytes of the arena: how many issued, not yet retired wgmma operations (one
    /// per thread) read it; a `cp.async` may not write it meanwhile.
    wg_readers: Box<[Cell<u32>]>,
    /// `unfenced` or `wg_readers` set in this block (else nothing to reset).
    proxy_used: Cell<bool>,
    /// Barrier arrivals and finished threads: a scheduling round without any is a
    /// deadlock.
    progress: Cell<u64>,
    /// Seeds the resume orders.
    seed: u64,
}

struct Ctx {
    launch: *const Launch,
    tid: u32,
    bidx: Cell<[u32; 3]>,
    smem_off: Cell<usize>,
    yielder: Cell<*const Yielder<(), ()>>,
    /// `cp.async` copies not yet committed, and committed groups not yet retired by a
    /// wait (oldest first).
    async_open: RefCell<AsyncGroup>,
    async_groups: RefCell<Vec<AsyncGroup>>,
    /// Arena chunks this thread's `cp.async` landed since its last `fence_proxy_async`
    /// (each once).
    landed: RefCell<Vec<usize>>,
    /// wgmma operations issued and not yet committed, and committed groups not yet
    /// retired by a `wgmma_wait` (oldest first).
    wg_open: RefCell<Vec<WgOp>>,
    wg_groups: RefCell<Vec<Vec<WgOp>>>,
    /// A `wgmma_fence` was executed (PTX wants one before the first wgmma).
    wg_fenced: Cell<bool>,
}

/// One issued wgmma, as one thread sees it: its accumulator array, operands and the
/// product computed at issue (added to / stored into the accumulators at retirement).
struct WgOp {
    acc: usize,
    desc_a: u64,
    desc_b: u64,
    scale_d: bool,
    prod: Vec<f32>,
}

/// `cp.async` copies of one group: (shared address, the 16 bytes read at issue).
type AsyncGroup = Vec<(usize, [u8; 16])>;

std::thread_local! {
    static CTX: Cell<*const Ctx> = const { Cell::new(core::ptr::null()) };
    /// Coroutine stacks kept for the next launch on this OS thread.
    static STACKS: RefCell<Vec<DefaultStack>> = const { RefCell::new(Vec::new()) };
    /// Launches so far on this OS thread (seeds the resume orders).
    static LAUNCHES: Cell<u64> = const { Cell::new(0) };
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Sets the current GPU thread for the duration of one resume, and clears it even when
/// the resumed thread panics (so no stale pointer outlives the launch).
struct Current;
impl Current {
    fn set(c: &Ctx) -> Current {
        CTX.with(|x| x.set(c as *const Ctx));
        Current
    }
}
impl Drop for Current {
    fn drop(&mut self) {
        CTX.with(|x| x.set(core::ptr::null()));
    }
}

#[inline]
fn ctx() -> &'static Ctx {
    let p = CTX.with(|c| c.get());
    assert!(
        !p.is_null(),
        "GPU primitive called outside an emulated launch"
    );
    unsafe { &*p }
}
#[inline]
fn launch_of(c: &Ctx) -> &Launch {
    unsafe { &*c.launch }
}

/// A pointer moved into a `'static` coroutine body; the launch outlives its coroutines.
struct Raw<T: ?Sized>(*const T);

type Thread = Coroutine<(), (), (), DefaultStack>;

/// Run `f` as a kernel over `grid` blocks of `block` threads (`block` a multiple of 32),
/// without dynamic shared memory.
///
/// # Safety
/// `f` runs as `block` GPU threads; the pointers it captures must be valid for what the
/// kernel does with them, exactly as for a GPU launch.
pub unsafe fn launch<F: Fn()>(grid: [u32; 3], block: u32, f: F) {
    launch_dyn(grid, block, 0, f)
}

/// [`launch`] with `dyn_bytes` of dynamic shared memory per block (CUDA's
/// `sharedMemBytes`, at most [`MAX_SHARED_BYTES`]), for kernels that use
/// [`dynamic_shared`].
///
/// # Safety
/// As [`launch`].
pub unsafe fn launch_dyn<F: Fn()>(grid: [u32; 3], block: u32, dyn_bytes: u32, f: F) {
    assert!(
        block > 0 && block.is_multiple_of(32) && block <= 1024,
        "block size {block}"
    );
    let dyn_bytes = (dyn_bytes as usize).div_ceil(16) * 16;
    assert!(
        dyn_bytes <= MAX_SHARED_BYTES,
        "{dyn_bytes} bytes of dynamic shared memory (at most {MAX_SHARED_BYTES})"
    );
    if grid.contains(&0) {
        return;
    }
    let nwarps = (block / 32) as usize;
    let l = Launch {
        grid,
        block,
        bar: Barrier::new(block as usize),
        warp_bars: (0..nwarps).map(|_| Barrier::new(32)).collect(),
        wg_bars: (0..nwarps / 4).map(|_| Barrier::new(128)).collect(),
        smem: (0..(STATIC_SHARED_BYTES + dyn_bytes) / 16)
            .map(|_| UnsafeCell::new(u128::MAX))
            .collect(),
        dyn_bytes,
        mailbox: (0..block)
            .map(|_| UnsafeCell::new([0; MAILBOX_WORDS]))
            .collect(),
        unfenced: (0..(STATIC_SHARED_BYTES + dyn_bytes) / 16)
            .map(|_| Cell::new(0))
            .collect(),
        wg_readers: (0..(STATIC_SHARED_BYTES + dyn_bytes) / 16)
            .map(|_| Cell::new(0))
            .collect(),
        proxy_used: Cell::new(false),
        progress: Cell::new(0),
        seed: LAUNCHES.with(|n| {
            let v = n.get();
            n.set(v + 1);
            mix(v)
        }),
    };
    let ctxs: Vec<Ctx> = (0..block)
        .map(|tid| Ctx {
            launch: &l,
            tid,
            bidx: Cell::new([0; 3]),
            smem_off: Cell::new(0),
            yielder: Cell::new(core::ptr::null()),
            async_open: RefCell::new(Vec::new()),
            async_groups: RefCell::new(Vec::new()),
            landed: RefCell::new(Vec::new()),
            wg_open: RefCell::new(Vec::new()),
            wg_groups: RefCell::new(Vec::new()),
            wg_fenced: Cell::new(false),
        })
        .collect();
    let body: &dyn Fn() = &f;
    // SAFETY: every coroutine finishes (or is dropped, unwinding it) before `launch`
    // returns, so the kernel closure outlives them.
    let body: *const (dyn Fn() + 'static) = core::mem::transmute(body as *const dyn Fn());
    for z in 0..grid[2] {
        for y in 0..grid[1] {
            for x in 0..grid[0] {
                // Re-poison what the previous block used of shared memory.
                let used = ctxs.iter().map(|c| c.smem_off.get()).max().unwrap_or(0);
                for cell in &l.smem[..used / 16] {
                    *cell.get() = u128::MAX;
                }
                for cell in &l.smem[STATIC_SHARED_BYTES / 16..] {
                    *cell.get() = u128::MAX;
                }
                if l.proxy_used.replace(false) {
                    for (f, r) in l.unfenced.iter().zip(l.wg_readers.iter()) {
                        f.set(0);
                        r.set(0);
                    }
                }
                let mut threads: Vec<Option<Thread>> = Vec::with_capacity(block as usize);
                for c in &ctxs {
                    c.bidx.set([x, y, z]);
                    c.smem_off.set(0);
                    c.async_open.borrow_mut().clear();
                    c.async_groups.borrow_mut().clear();
                    c.landed.borrow_mut().clear();
                    c.wg_open.borrow_mut().clear();
                    c.wg_groups.borrow_mut().clear();
                    c.wg_fenced.set(false);
                    let stack = STACKS
                        .with(|s| s.borrow_mut().pop())
                        .unwrap_or_else(|| DefaultStack::new(STACK_BYTES).expect("emulator stack"));
                    let (cp, fp) = (Raw(c as *const Ctx), Raw(body));
                    threads.push(Some(Coroutine::with_stack(
                        stack,
                        move |yl: &Yielder<(), ()>, ()| {
                            let (cp, fp) = (cp, fp);
                            // SAFETY: see above; the Ctx lives in `ctxs` for the whole launch.
                            unsafe {
                                (*cp.0).yielder.set(yl as *const _);
                                (*fp.0)();
                            }
                        },
                    )));
                }
                run_block(&l, &ctxs, &mut threads, [x, y, z]);
            }
        }
    }
}

/// Resumes the block's threads round by round until all have finished.
fn run_block(l: &Launch, ctxs: &[Ctx], threads: &mut [Option<Thread>], bidx: [u32; 3]) {
    let n = threads.len();
    let mut live = n;
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = mix(l.seed ^ ((bidx[0] as u64) << 32 | (bidx[1] as u64) << 16 | bidx[2] as u64));
    while live > 0 {
        let before = l.progress.get();
        // Fisher-Yates with a splitmix stream: a new order every round.
        for i in (1..n).rev() {
            rng = mix(rng);
            order.swap(i, (rng % (i as u64 + 1)) as usize);
        }
        for &tid in &order {
            let Some(t) = threads[tid].as_mut() else {
                continue;
            };
            let cur = Current::set(&ctxs[tid]);
            let r = t.resume(());
            drop(cur);
            if let CoroutineResult::Return(()) = r {
                let c = &ctxs[tid];
                assert!(
                    c.wg_open.borrow().is_empty() && c.wg_groups.borrow().is_empty(),
                    "emulator: thread {tid} of block {bidx:?} ended with wgmma operations not waited for (wgmma_commit + wgmma_wait::<0>)"
                );
                l.progress.set(l.progress.get() + 1);
                live -= 1;
                if let Some(done) = threads[tid].take() {
                    STACKS.with(|s| s.borrow_mut().push(done.into_stack()));
                }
            }
        }
        if live > 0 && l.progress.get() == before {
            panic!(
                "emulator: deadlock in block {bidx:?}: {live} of {n} threads wait at a barrier the others never reach"
            );
        }
    }
}

pub fn thread_idx() -> u32 {
    ctx().tid
}
pub fn block_dim() -> u32 {
    launch_of(ctx()).block
}
pub fn block_idx_x() -> u32 {
    ctx().bidx.get()[0]
}
pub fn block_idx_y() -> u32 {
    ctx().bidx.get()[1]
}
pub fn block_idx_z() -> u32 {
    ctx().bidx.get()[2]
}
pub fn grid_dim_x() -> u32 {
    launch_of(ctx()).grid[0]
}
pub fn grid_dim_y() -> u32 {
    launch_of(ctx()).grid[1]
}
pub fn grid_dim_z() -> u32 {
    launch_of(ctx()).grid[2]
}
pub fn sync_threads() {
    launch_of(ctx()).bar.wait();
}

/// Per-thread bump allocation in the block's shared arena (see the module comment).
pub fn shared_alloc(bytes: usize) -> *mut u8 {
    let c = ctx();
    let off = c.smem_off.get();
    let end = off + bytes.div_ceil(16) * 16;
    assert!(
        end <= STATIC_SHARED_BYTES,
        "static shared memory over {STATIC_SHARED_BYTES} bytes (ptxas refuses it: use dynamic_shared)"
    );
    c.smem_off.set(end);
    unsafe { (launch_of(c).smem.as_ptr() as *mut u8).add(off) }
}

/// Bytes of dynamic shared memory this launch was given ([`launch_dyn`]).
pub fn dynamic_shared_size() -> u32 {
    launch_of(ctx()).dyn_bytes as u32
}

/// The launch's dynamic shared memory (after the static part, poisoned like it); traps
/// when the launch gave less than `bytes`, as the GPU kernels do.
pub fn dynamic_shared(bytes: u32) -> *mut u8 {
    let c = ctx();
    let l = launch_of(c);
    if bytes as usize > l.dyn_bytes {
        trap();
    }
    assert!(
        c.smem_off.get() + l.dyn_bytes <= MAX_SHARED_BYTES,
        "static + dynamic shared memory over {MAX_SHARED_BYTES} bytes"
    );
    unsafe { (l.smem.as_ptr() as *mut u8).add(STATIC_SHARED_BYTES) }
}

/// One warp-synchronous exchange: every lane posts `words`, then `read` runs with access
/// to all 32 lanes' posts, then the warp synchronises again so the mailbox can be reused.
fn warp_exchange<R>(words: &[u64], read: impl FnOnce(&dyn Fn(u32, usize) -> u64) -> R) -> R {
    let c = ctx();
    let l = launch_of(c);
    let warp = (c.tid / 32) as usize;
    let base = warp * 32;
    unsafe {
        let mine = &mut *l.mailbox[c.tid as usize].get();
        mine[..words.len()].copy_from_slice(words);
    }
    l.warp_bars[warp].wait();
    let get = |lane: u32, i: usize| unsafe { (*l.mailbox[base + lane as usize].get())[i] };
    let r = read(&get);
    l.warp_bars[warp].wait();
    r
}

pub fn shfl_xor_u32(v: u32, lane_mask: u32) -> u32 {
    let lane = ctx().tid % 32;
    warp_exchange(&[v as u64], |get| get((lane ^ lane_mask) & 31, 0) as u32)
}
pub fn shfl_idx_u32(v: u32, src: u32) -> u32 {
    warp_exchange(&[v as u64], |get| get(src & 31, 0) as u32)
}

pub fn fma(a: f32, b: f32, c: f32) -> f32 {
    a.mul_add(b, c)
}
pub fn fmax(a: f32, b: f32) -> f32 {
    a.max(b)
}
pub fn fmin(a: f32, b: f32) -> f32 {
    a.min(b)
}
pub fn sqrt(a: f32) -> f32 {
    a.sqrt()
}
pub fn exp2(x: f32) -> f32 {
    x.exp2()
}
pub fn rsqrt(x: f32) -> f32 {
    1.0 / x.sqrt()
}
pub fn f32_to_bits(x: f32) -> u32 {
    x.to_bits()
}
pub fn f32_from_bits(x: u32) -> f32 {
    f32::from_bits(x)
}
pub fn f64_to_bits(x: f64) -> u64 {
    x.to_bits()
}
/// f32 -> bf16 bits, round to nearest even (NaN -> canonical NaN, as `cvt.rn.bf16.f32`).
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return 0x7fff;
    }
    let round = 0x7fff + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}
/// f32 -> IEEE half bits, round to nearest even.
pub fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let rem = m & ((1 << shift) - 1);
        let mut r = m >> shift;
        if rem > half || (rem == half && (r & 1) == 1) {
            r += 1;
        }
        return sign | r as u16;
    }
    let mut r = ((e as u32) << 10) | (man >> 13);
    let rem = man & 0x1fff;
    if rem > 0x1000 || (rem == 0x1000 && (r & 1) == 1) {
        r += 1;
    }
    sign | r as u16
}
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = if exp == 0 {
        if man == 0 {
            sign
        } else {
            let mut e = 127 - 15 + 1;
            let mut m = man;
            while m & 0x400 == 0 {
                m <<= 1;
                e -= 1;
            }
            sign | (e << 23) | ((m & 0x3ff) << 13)
        }
    } else if exp == 0x1f {
        sign | 0x7f80_0000 | (man << 13)
    } else {
        sign | ((exp + 127 - 15) << 23) | (man << 13)
    };
    f32::from_bits(bits)
}

/// # Safety
/// `p` must be 16-byte aligned and readable.
pub unsafe fn ld_global_v4(p: *const u32) -> [u32; 4] {
    assert!((p as usize).is_multiple_of(16), "misaligned 16-byte load");
    *(p as *const [u32; 4])
}
/// # Safety
/// As [`ld_global_v4`].
pub unsafe fn ld_global_nc_v4(p: *const u32) -> [u32; 4] {
    ld_global_v4(p)
}
/// # Safety
/// When `ok`, `p` must be 16-byte aligned and readable (it is not touched otherwise).
pub unsafe fn ld_global_nc_v4_if(p: *const u32, ok: bool) -> [u32; 4] {
    if ok {
        ld_global_v4(p)
    } else {
        [0; 4]
    }
}
/// # Safety
/// `p` must be 16-byte aligned and writable.
pub unsafe fn st_global_v4(p: *mut u32, v: [u32; 4]) {
    assert!((p as usize).is_multiple_of(16), "misaligned 16-byte store");
    *(p as *mut [u32; 4]) = v;
}
/// # Safety
/// `p` must be 16-byte aligned and readable (shared memory on the GPU).
pub unsafe fn ld_shared_v4(p: *const u8) -> [u32; 4] {
    assert!(
        (p as usize).is_multiple_of(16),
        "misaligned 16-byte shared load"
    );
    *(p as *const [u32; 4])
}
/// # Safety
/// `dst_shared` 16-byte aligned in shared memory, `src` readable for `src_bytes`.
pub unsafe fn cp_async_16(dst_shared: *mut u8, src: *const u8, src_bytes: u32) {
    assert!(
        (dst_shared as usize).is_multiple_of(16) && (src as usize).is_multiple_of(16),
        "misaligned cp.async"
    );
    assert!(src_bytes <= 16);
    let mut buf = [0u8; 16];
    core::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), src_bytes as usize);
    let c = ctx();
    check_no_wg_reader(launch_of(c), dst_shared as usize);
    c.async_open.borrow_mut().push((dst_shared as usize, buf));
}

/// A `cp.async` may land any time between its issue and its wait: it must not target
/// shared memory an issued, not yet retired wgmma reads (checked at both ends).
fn check_no_wg_reader(l: &Launch, dst: usize) {
    let Some(i) = dst.checked_sub(l.smem.as_ptr() as usize).map(|o| o / 16) else {
        return;
    };
    if i < l.wg_readers.len() {
        assert!(
            l.wg_readers[i].get() == 0,
            "cp.async into shared memory an in-flight wgmma reads (retire it with wgmma_wait first)"
        );
    }
}
pub fn cp_async_commit() {
    let c = ctx();
    let g = core::mem::take(&mut *c.async_open.borrow_mut());
    c.async_groups.borrow_mut().push(g);
}
/// Lands the copies of all but the newest `N` committed groups in shared memory.
pub fn cp_async_wait<const N: u32>() {
    let c = ctx();
    let mut groups = c.async_groups.borrow_mut();
    let n = groups.len().saturating_sub(N as usize);
    let l = launch_of(c);
    let base = l.smem.as_ptr() as usize;
    let mut landed = c.landed.borrow_mut();
    for g in groups.drain(..n) {
        for (dst, buf) in g {
            check_no_wg_reader(l, dst);
            // SAFETY: `dst` was checked aligned at issue and is in the launch's arena.
            unsafe { core::ptr::copy_nonoverlapping(buf.as_ptr(), dst as *mut u8, 16) };
            // (a cp.async into memory outside the arena is not shared memory: no proxy)
            if let Some(i) = dst.checked_sub(base).map(|o| o / 16) {
                if i < l.unfenced.len() && l.unfenced[i].get() != c.tid + 1 {
                    l.unfenced[i].set(c.tid + 1);
                    l.proxy_used.set(true);
                    landed.push(i);
                }
            }
        }
    }
}

/// # Safety
/// Each lane's `row` must point at 16 readable bytes of shared memory.
pub unsafe fn ldmatrix_x4(row: *const u8) -> [u32; 4] {
    assert!((row as usize).is_multiple_of(16), "misaligned ldmatrix row");
    let lane = ctx().tid % 32;
    warp_exchange(&[row as u64], |get| {
        let mut r = [0u32; 4];
        for (j, rj) in r.iter_mut().enumerate() {
            let p = get(j as u32 * 8 + lane / 4, 0) as *const u16;
            let c = (2 * (lane % 4)) as usize;
            *rj = (*p.add(c) as u32) | ((*p.add(c + 1) as u32) << 16);
        }
        r
    })
}

/// # Safety
/// As [`ldmatrix_x4`]; lane `l` receives rows `2(l%4)`, `2(l%4)+1` of column `l/4` of
/// each 8x8 matrix (`ldmatrix .trans`).
pub unsafe fn ldmatrix_x4_trans(row: *const u8) -> [u32; 4] {
    assert!((row as usize).is_multiple_of(16), "misaligned ldmatrix row");
    let lane = ctx().tid % 32;
    warp_exchange(&[row as u64], |get| {
        let mut r = [0u32; 4];
        for (j, rj) in r.iter_mut().enumerate() {
            let rr = j as u32 * 8 + 2 * (lane % 4);
            let c = (lane / 4) as usize;
            let lo = *(get(rr, 0) as *const u16).add(c);
            let hi = *(get(rr + 1, 0) as *const u16).add(c);
            *rj = (lo as u32) | ((hi as u32) << 16);
        }
        r
    })
}

fn bf16_lo_hi(w: u32, hi: bool) -> f32 {
    let h = if hi { w >> 16 } else { w & 0xffff };
    f32::from_bits(h << 16)
}

pub fn mma_bf16_16816(c: [f32; 4], a: [u32; 4], b: [u32; 2]) -> [f32; 4] {
    let lane = ctx().tid % 32;
    let words = [
        a[0] as u64,
        a[1] as u64,
        a[2] as u64,
        a[3] as u64,
        b[0] as u64,
        b[1] as u64,
    ];
    warp_exchange(&words, |get| {
        // A(row, k): lane (row % 8) * 4 + (k % 8) / 2, register (row >= 8) + 2 (k >= 8).
        let a_at = |row: u32, k: u32| {
            let w = get(
                (row % 8) * 4 + (k % 8) / 2,
                ((row >= 8) as usize) + 2 * ((k >= 8) as usize),
            );
            bf16_lo_hi(w as u32, k % 2 == 1)
        };
        // B(k, n): lane n * 4 + (k % 8) / 2, register 4 + (k >= 8).
        let b_at = |k: u32, n: u32| {
            let w = get(n * 4 + (k % 8) / 2, 4 + (k >= 8) as usize);
            bf16_lo_hi(w as u32, k % 2 == 1)
        };
        let g = lane / 4;
        let t = lane % 4;
        let mut d = c;
        for (i, di) in d.iter_mut().enumerate() {
            let row = g + 8 * (i as u32 / 2);
            let col = 2 * t + (i as u32 % 2);
            let mut s = 0.0f32;
            for k in 0..16 {
                s += a_at(row, k) * b_at(k, col);
            }
            *di += s;
        }
        d
    })
}

/// Shared-window address of `p` (a pointer into the launch's shared memory): what
/// `cvta.to.shared` gives on the GPU and what wgmma matrix descriptors hold. The arena's
/// first byte is at [`SHARED_WINDOW_ORIGIN`].
pub fn shared_addr(p: *const u8) -> u32 {
    let l = launch_of(ctx());
    let base = l.smem.as_ptr() as usize;
    let off = (p as usize).wrapping_sub(base);
    assert!(
        off < l.smem.len() * 16,
        "shared_addr of a pointer outside shared memory"
    );
    SHARED_WINDOW_ORIGIN + off as u32
}

/// The host pointer of shared-window address `a` (see [`shared_addr`]).
fn window_ptr(l: &Launch, a: u32) -> *const u8 {
    let off = a.checked_sub(SHARED_WINDOW_ORIGIN).map(|o| o as usize);
    match off {
        Some(o) if o < l.smem.len() * 16 => unsafe { (l.smem.as_ptr() as *const u8).add(o) },
        _ => panic!("wgmma: shared address {a:#x} outside the block's shared memory"),
    }
}

/// `fence.proxy.async.shared::cta`: this thread's earlier shared-memory writes (here:
/// its landed `cp.async` copies) become visible to the async proxy (wgmma).
pub fn fence_proxy_async() {
    let c = ctx();
    let l = launch_of(c);
    for i in c.landed.borrow_mut().drain(..) {
        if l.unfenced[i].get() == c.tid + 1 {
            l.unfenced[i].set(0);
        }
    }
}

/// The wgmma accumulator registers of one thread for m64n256: 128 f32.
pub type WgAcc = [f32; 128];

/// Zeroed accumulators.
pub fn wg_acc_zero() -> WgAcc {
    [0.0; 128]
}

/// `wgmma.fence.sync.aligned` (orders earlier accumulator register writes before the
/// next wgmma; PTX requires one before a thread's first wgmma).
pub fn wgmma_fence(acc: &mut WgAcc) {
    let _ = acc;
    ctx().wg_fenced.set(true);
}

/// `wgmma.commit_group.sync.aligned`: the wgmma operations issued since the last commit
/// form one group.
pub fn wgmma_commit() {
    let c = ctx();
    let g = core::mem::take(&mut *c.wg_open.borrow_mut());
    c.wg_groups.borrow_mut().push(g);
}

/// `wgmma.wait_group.sync.aligned N`: retires all but the newest `N` committed groups,
/// whose products only now reach `acc` (in issue order: `acc = prod` or `acc += prod`).
/// Panics when the shared memory an operation read changed since it was issued (a
/// stage overwritten while the wgmma reading it may still run).
pub fn wgmma_wait<const N: u32>(acc: &mut WgAcc) {
    let c = ctx();
    let l = launch_of(c);
    let mut groups = c.wg_groups.borrow_mut();
    let n = groups.len().saturating_sub(N as usize);
    for g in groups.drain(..n) {
        for op in g {
            assert_eq!(
                op.acc, acc as *mut WgAcc as usize,
                "wgmma_wait: another accumulator array than the wgmma's"
            );
            let again = wg_product(l, c.tid, op.desc_a, op.desc_b, acc.len() * 2, false);
            let same = again
                .iter()
                .zip(&op.prod)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "wgmma: shared memory read by an in-flight wgmma changed before the wgmma_wait that retires it"
            );
            for (d, p) in acc.iter_mut().zip(&op.prod) {
                *d = if op.scale_d { *d + *p } else { *p };
            }
            wg_chunks(l, op.desc_a, op.desc_b, 256, |r| r.set(r.get() - 1));
        }
    }
}

/// Decoded wgmma shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format":
/// bits 0-13 start address >> 4, 16-29 leading dimension byte offset >> 4, 32-45 stride
/// dimension byte offset >> 4, 49-51 base offset, 62-63 swizzle mode: 0 none
/// (interleave), 1 128-byte, 2 64-byte, 3 32-byte).
struct Desc {
    start: u32,
    lbo: u32,
    sbo: u32,
    swizzle: u64,
}

fn decode_desc(d: u64) -> Desc {
    let base_offset = (d >> 49) & 7;
    assert_eq!(base_offset, 0, "wgmma descriptor base offset not emulated");
    let swizzle = d >> 62;
    assert!(
        swizzle <= 1,
        "wgmma descriptor swizzle mode {swizzle} not emulated (0 none, 1 128-byte)"
    );
    Desc {
        start: ((d & 0x3fff) as u32) << 4,
        lbo: (((d >> 16) & 0x3fff) as u32) << 4,
        sbo: (((d >> 32) & 0x3fff) as u32) << 4,
        swizzle,
    }
}

/// Shared-window address of element (`r`, `k`) (row of M or N, K index 0..16) of a
/// K-major bf16 operand: the PTX ISA's canonical K-major layouts (CUTLASS
/// `make_gmma_desc<Major::K>` spells them out in units of 16 bytes): no swizzle,
/// `((8,m),(8,2)):((16 B, SBO),(2 B, LBO))` (8x16-byte core matrices); 128-byte swizzle,
/// `((8,m),(64)):((128 B, SBO),(2 B))` then bits 4-6 of the address XORed with bits 7-9
/// (the 16-byte chunk index with the row's position in its 1024-byte atom).
fn operand_addr(d: &Desc, r: u32, k: u32) -> u32 {
    if d.swizzle == 0 {
        d.start + (r / 8) * d.sbo + (k / 8) * d.lbo + (r % 8) * 16 + (k % 8) * 2
    } else {
        let a = d.start + (r / 8) * d.sbo + (r % 8) * 128 + k * 2;
        a ^ (((a >> 7) & 7) << 4)
    }
}

/// Calls `f` on the in-flight reader count of every 16-byte chunk of shared memory the
/// warpgroup's m64nNk16 (N = `n`) with these descriptors reads (all of A's 64 and B's N
/// rows, K 0..16: two chunks per row).
fn wg_chunks(l: &Launch, da: u64, db: u64, n: u32, mut f: impl FnMut(&Cell<u32>)) {
    let base = l.smem.as_ptr() as usize;
    for (d, rows) in [(decode_desc(da), 64), (decode_desc(db), n)] {
        for r in 0..rows {
            for k in [0, 8] {
                let p = window_ptr(l, operand_addr(&d, r, k)) as usize;
                f(&l.wg_readers[(p - base) / 16]);
            }
        }
    }
}

/// Thread `tid`'s share of one m64nNk16 product (N = `n`), in the accumulator fragment
/// layout: register `4j + i` holds row `16·warp + lane/4 + 8·(i/2)`, column
/// `8j + 2·(lane%4) + i%2` (PTX ISA "wgmma .m64nNk16 register fragment layout for
/// accumulator matrix D"; CUTLASS `CLayout_64xN`). Each value is the 16-term dot product
/// summed in K order in f32 from +0, as the `mma.sync` emulation does per k16 step.
fn wg_product(l: &Launch, tid: u32, da: u64, db: u64, n: usize, check_fence: bool) -> Vec<f32> {
    let (a, b) = (decode_desc(da), decode_desc(db));
    let load = |d: &Desc, r: u32, k: u32| {
        let addr = operand_addr(d, r, k);
        let p = window_ptr(l, addr);
        if check_fence {
            let i = (p as usize - l.smem.as_ptr() as usize) / 16;
            assert!(
                l.unfenced[i].get() == 0,
                "wgmma reads shared memory (address {addr:#x}) that cp.async wrote without a fence_proxy_async (fence.proxy.async) by the writing thread"
            );
        }
        let h = unsafe { (p as *const u16).read() };
        f32::from_bits((h as u32) << 16)
    };
    let (w, lane) = ((tid % 128) / 32, tid % 32);
    let (g, t) = (lane / 4, lane % 4);
    let mut out = std::vec![0.0f32; n / 2];
    for (v, o) in out.iter_mut().enumerate() {
        let (j, i) = (v as u32 / 4, v as u32 % 4);
        let row = 16 * w + g + 8 * (i / 2);
        let col = 8 * j + 2 * t + i % 2;
        let mut s = 0.0f32;
        for k in 0..16 {
            s += load(&a, row, k) * load(&b, col, k);
        }
        *o = s;
    }
    out
}

/// `wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16` with A and B in shared
/// memory (K-major, no transpose, scale 1): `D = A·Bᵀ (+ D when scale_d)`, A 64x16 and B
/// 256x16 described by `desc_a` / `desc_b`. Warpgroup-collective (all 128 threads, the
/// same descriptors); asynchronous: see [`wgmma_wait`].
pub fn wgmma_m64n256k16_bf16(acc: &mut WgAcc, desc_a: u64, desc_b: u64, scale_d: bool) {
    let c = ctx();
    let l = launch_of(c);
    assert!(
        l.block % 128 == 0,
        "wgmma needs whole warpgroups (block of {} threads)",
        l.block
    );
    assert!(
        c.wg_fenced.get(),
        "wgmma before any wgmma_fence (wgmma.fence.sync.aligned) in this thread"
    );
    let wg = (c.tid / 128) as usize;
    let base = wg * 128;
    unsafe {
        let mine = &mut *l.mailbox[c.tid as usize].get();
        mine[0] = desc_a;
        mine[1] = desc_b;
        mine[2] = scale_d as u64;
    }
    l.wg_bars[wg].wait();
    for t in base..base + 128 {
        let theirs = unsafe { &*l.mailbox[t].get() };
        assert!(
            theirs[..3] == [desc_a, desc_b, scale_d as u64],
            "wgmma: threads of warpgroup {wg} disagree on descriptors / scale-d"
        );
    }
    let prod = wg_product(l, c.tid, desc_a, desc_b, 256, true);
    wg_chunks(l, desc_a, desc_b, 256, |r| r.set(r.get() + 1));
    l.proxy_used.set(true);
    l.wg_bars[wg].wait();
    c.wg_open.borrow_mut().push(WgOp {
        acc: acc as *mut WgAcc as usize,
        desc_a,
        desc_b,
        scale_d,
        prod,
    });
}

/// Programmatic dependent launch: the emulator runs launches one after another, so the
/// previous kernel is always complete (see the nvptx twin).
#[inline(always)]
pub fn pdl_wait() {}
/// Programmatic dependent launch trigger: nothing to trigger in the emulator.
#[inline(always)]
pub fn pdl_launch_dependents() {}
/// L2 prefetch hint: no cache to fill in the emulator. The address must still be one
/// the kernel may read (checked here, as a fault-free prefetch would hide a bad one on
/// the GPU).
#[inline(always)]
pub unsafe fn prefetch_l2(p: *const u8) {
    std::hint::black_box(std::ptr::read_volatile(p));
}
pub fn trap() -> ! {
    panic!("kernel trap")
}

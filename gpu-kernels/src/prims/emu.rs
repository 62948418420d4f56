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
/// of sm_80 (A100, 163 KiB), the smaller of the PTX module's targets (sm_90: 227 KiB).
pub const MAX_SHARED_BYTES: usize = 163 * 1024;
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
    /// `STATIC_SHARED_BYTES` of static shared memory, then the dynamic part.
    smem: Box<[UnsafeCell<u128>]>,
    /// Dynamic shared memory of the launch (bytes, a multiple of 16).
    dyn_bytes: usize,
    mailbox: Box<[UnsafeCell<[u64; MAILBOX_WORDS]>]>,
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
        smem: (0..(STATIC_SHARED_BYTES + dyn_bytes) / 16)
            .map(|_| UnsafeCell::new(u128::MAX))
            .collect(),
        dyn_bytes,
        mailbox: (0..block)
            .map(|_| UnsafeCell::new([0; MAILBOX_WORDS]))
            .collect(),
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
                let mut threads: Vec<Option<Thread>> = Vec::with_capacity(block as usize);
                for c in &ctxs {
                    c.bidx.set([x, y, z]);
                    c.smem_off.set(0);
                    c.async_open.borrow_mut().clear();
                    c.async_groups.borrow_mut().clear();
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
    ctx()
        .async_open
        .borrow_mut()
        .push((dst_shared as usize, buf));
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
    for g in groups.drain(..n) {
        for (dst, buf) in g {
            // SAFETY: `dst` was checked aligned at issue and is in the launch's arena.
            unsafe { core::ptr::copy_nonoverlapping(buf.as_ptr(), dst as *mut u8, 16) };
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

pub fn trap() -> ! {
    panic!("kernel trap")
}

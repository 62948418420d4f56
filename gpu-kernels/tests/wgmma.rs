//! The emulator's wgmma (sm_90a) against expectations written down by hand from the PTX
//! ISA, not from the emulator's own code: the matrix-descriptor bit layout, the K-major
//! 128-byte swizzle (16-byte chunk `c` of row `r` stored at chunk `c ^ (r % 8)` of the
//! row, rows 128 bytes apart, 8-row atoms `SBO` apart), the m64nNk16 accumulator
//! fragment layout (register `4j + i` of thread `t` = row `16(t/32) + (t%32)/4 + 8(i/2)`,
//! column `8j + 2(t%4) + i%2`), and the asynchronous semantics (results only after the
//! `wgmma_wait` retiring their group, in-flight operands protected, the proxy fence
//! after `cp.async`). A misread layout fails here even if kernel and emulator agreed.
use remp_gpu_kernels::gemm_wgmma::wg_desc;
use remp_gpu_kernels::prims::emu::{
    cp_async_16, cp_async_commit, cp_async_wait, dynamic_shared, fence_proxy_async, launch_dyn,
    shared_addr, sync_threads, thread_idx, wg_acc_zero, wgmma_commit, wgmma_fence,
    wgmma_m64n256k16_bf16, wgmma_wait, WgAcc,
};
use std::sync::Mutex;

/// bf16 bits of a small integer (exact up to 256).
fn bf(v: u32) -> u16 {
    ((v as f32).to_bits() >> 16) as u16
}

/// Descriptor by hand: start >> 4 in bits 0-13, LBO >> 4 in 16-29, SBO >> 4 in 32-45,
/// swizzle mode in 62-63 (1 = 128-byte).
fn desc(start: u32, lbo: u32, sbo: u32, swizzle: u64) -> u64 {
    ((start >> 4) as u64)
        | (((lbo >> 4) as u64) << 16)
        | (((sbo >> 4) as u64) << 32)
        | (swizzle << 62)
}

/// Byte offset of element (r, k) (k < 64) of a K-major tile in the 128-byte swizzle
/// layout whose 8-row atoms are `sbo` bytes apart, from the tile's 1024-aligned start.
fn swz128(r: u32, k: u32, sbo: u32) -> usize {
    let chunk = (k / 8) ^ (r % 8);
    ((r / 8) * sbo + (r % 8) * 128 + chunk * 16 + (k % 8) * 2) as usize
}

/// Runs one warpgroup (128 threads) that fills shared memory with `fill` (called by
/// thread 0 with the 1024-aligned base), then issues one m64n256k16 with descriptors
/// `da(base)`, `db(base)` (window addresses) and scale-d 0, and returns every thread's
/// accumulators.
fn one_wgmma(
    fill: &(dyn Fn(*mut u8) + Sync),
    da: &(dyn Fn(u32) -> u64 + Sync),
    db: &(dyn Fn(u32) -> u64 + Sync),
) -> Vec<WgAcc> {
    let out = Mutex::new(vec![[0.0f32; 128]; 128]);
    unsafe {
        launch_dyn([1, 1, 1], 128, 100 * 1024, || {
            let p = dynamic_shared(100 * 1024);
            let pad = (1024 - (shared_addr(p) & 1023)) & 1023;
            let base = p.add(pad as usize);
            let b = shared_addr(base);
            assert_eq!(b % 1024, 0);
            if thread_idx() == 0 {
                fill(base);
            }
            sync_threads();
            let mut acc = [f32::NAN; 128];
            wgmma_fence(&mut acc);
            wgmma_m64n256k16_bf16(&mut acc, da(b), db(b), false);
            wgmma_commit();
            wgmma_wait::<0>(&mut acc);
            out.lock().unwrap()[thread_idx() as usize] = acc;
        });
    }
    out.into_inner().unwrap()
}

/// The accumulator register of thread `t` holding (row, col), by the PTX ISA's figure.
fn reg_of(row: u32, col: u32) -> (usize, usize) {
    let t = 32 * (row / 16) + 4 * (row % 8) + (col % 8) / 2;
    let reg = 4 * (col / 8) + 2 * ((row % 16) / 8) + col % 2;
    (t as usize, reg as usize)
}

#[test]
fn descriptor_bits() {
    // start 0x1400, LBO 16 (unused), SBO 1024, 128-byte swizzle
    assert_eq!(wg_desc(0x1400), 0x4000_0040_0001_0140);
    assert_eq!(wg_desc(0x1400), desc(0x1400, 16, 1024, 1));
    // the start field keeps address bits 4..18 only
    assert_eq!(wg_desc(0x3_fff0) & 0x3fff, 0x3fff);
}

#[test]
fn fragment_layout_by_hand() {
    // the figure's corners: thread 0 holds (0,0) (0,1) (8,0) (8,1) in registers 0..3
    assert_eq!(reg_of(0, 0), (0, 0));
    assert_eq!(reg_of(0, 1), (0, 1));
    assert_eq!(reg_of(8, 0), (0, 2));
    assert_eq!(reg_of(8, 1), (0, 3));
    // thread 5 (row 1, columns 2-3), next n8 block in registers 4..7
    assert_eq!(reg_of(1, 2), (5, 0));
    assert_eq!(reg_of(1, 10), (5, 4));
    // warp 1 starts at row 16; the last thread and register: (63, 255)
    assert_eq!(reg_of(16, 0), (32, 0));
    assert_eq!(reg_of(63, 255), (127, 127));
}

/// A from the 128-byte swizzle layout, at k16 steps 0..3 (start address + 32·kk inside
/// the swizzled rows), D in the fragment layout: B selects column `kk·16 + n % 16` of A,
/// so D(r, n) = A(r, kk·16 + n % 16).
#[test]
fn a_operand_swizzle_and_accumulator_layout() {
    let a_val = |r: u32, k: u32| (r * 64 + k) % 251 + 1;
    let fill = |base: *mut u8| unsafe {
        let a = base as *mut u16;
        for r in 0..64 {
            for k in 0..64 {
                *a.add(swz128(r, k, 1024) / 2) = bf(a_val(r, k));
            }
        }
    };
    for kk in 0..4u32 {
        let fill_b = move |base: *mut u8| unsafe {
            fill(base);
            let b = base.add(8192) as *mut u16;
            for n in 0..256 {
                for k in 0..64 {
                    let one = k == kk * 16 + n % 16;
                    *b.add(swz128(n, k, 1024) / 2) = bf(one as u32);
                }
            }
        };
        let got = one_wgmma(&fill_b, &|b| desc(b + kk * 32, 16, 1024, 1), &|b| {
            desc(b + 8192 + kk * 32, 16, 1024, 1)
        });
        for row in 0..64 {
            for col in 0..256 {
                let (t, reg) = reg_of(row, col);
                let want = a_val(row, kk * 16 + col % 16) as f32;
                assert_eq!(got[t][reg], want, "kk {kk} D({row},{col})");
            }
        }
        if kk == 1 {
            // thread 37 (warp 1, lane 5), register 14 = D(25, 26) = A(25, 16 + 10)
            assert_eq!(got[37][14], ((25 * 64 + 26) % 251 + 1) as f32);
        }
    }
}

/// B from the 128-byte swizzle layout over all 32 of its 8-row atoms, placed 2048 bytes
/// apart (SBO 2048, the gaps poisoned): A selects column `kk·16 + r % 16` of B, so
/// D(r, n) = B(n, kk·16 + r % 16).
#[test]
fn b_operand_swizzle_and_stride_offset() {
    let b_val = |n: u32, k: u32| (n * 7 + k * 3) % 241 + 1;
    for kk in [0u32, 3] {
        let fill = move |base: *mut u8| unsafe {
            let a = base as *mut u16;
            for r in 0..64 {
                for k in 0..64 {
                    *a.add(swz128(r, k, 1024) / 2) = bf((k == kk * 16 + r % 16) as u32);
                }
            }
            let b = base.add(8192) as *mut u16;
            for n in 0..256 {
                for k in 0..64 {
                    *b.add(swz128(n, k, 2048) / 2) = bf(b_val(n, k));
                }
            }
        };
        let got = one_wgmma(&fill, &|b| desc(b + kk * 32, 16, 1024, 1), &|b| {
            desc(b + 8192 + kk * 32, 16, 2048, 1)
        });
        for row in 0..64 {
            for col in 0..256 {
                let (t, reg) = reg_of(row, col);
                let want = b_val(col, kk * 16 + row % 16) as f32;
                assert_eq!(got[t][reg], want, "kk {kk} D({row},{col})");
            }
        }
    }
}

/// No swizzle (interleave): 8x16-byte core matrices, K halves LBO apart, 8-row groups
/// SBO apart. A(r, k) at (r/8)·SBO + (k/8)·LBO + (r%8)·16 + (k%8)·2.
#[test]
fn no_swizzle_core_matrices() {
    let a_val = |r: u32, k: u32| (r * 16 + k) % 253 + 1;
    let (lbo, sbo) = (128u32, 256u32);
    let fill = move |base: *mut u8| unsafe {
        let a = base as *mut u16;
        for r in 0..64 {
            for k in 0..16 {
                let off = (r / 8) * sbo + (k / 8) * lbo + (r % 8) * 16 + (k % 8) * 2;
                *a.add(off as usize / 2) = bf(a_val(r, k));
            }
        }
        let b = base.add(8192) as *mut u16;
        for n in 0..256 {
            for k in 0..64 {
                *b.add(swz128(n, k, 1024) / 2) = bf((k == n % 16) as u32);
            }
        }
    };
    let got = one_wgmma(&fill, &|b| desc(b, lbo, sbo, 0), &|b| {
        desc(b + 8192, 16, 1024, 1)
    });
    for row in 0..64 {
        for col in 0..256 {
            let (t, reg) = reg_of(row, col);
            assert_eq!(got[t][reg], a_val(row, col % 16) as f32, "D({row},{col})");
        }
    }
}

/// Fills A with 1 at (r, r % 16) and B with `b_val` (unswizzled reads not needed: the
/// swizzle is applied by the helper), for the async tests.
unsafe fn fill_simple(base: *mut u8, b_val: u32) {
    let a = base as *mut u16;
    for r in 0..64 {
        for k in 0..64 {
            *a.add(swz128(r, k, 1024) / 2) = bf((k == r % 16) as u32);
        }
    }
    let b = base.add(8192) as *mut u16;
    for n in 0..256 {
        for k in 0..64 {
            *b.add(swz128(n, k, 1024) / 2) = bf(b_val);
        }
    }
}

/// Aligned base of a 64 KiB dynamic shared memory launch.
unsafe fn base64k() -> (*mut u8, u32) {
    let p = dynamic_shared(64 * 1024);
    let pad = (1024 - (shared_addr(p) & 1023)) & 1023;
    let base = p.add(pad as usize);
    (base, shared_addr(base))
}

/// Results reach the accumulators only at the wait that retires their group: before
/// it a thread reads its old values; `wait::<1>` retires the older of two groups only;
/// scale-d 1 accumulates, 0 overwrites.
#[test]
fn results_only_after_wait_group() {
    let seen = Mutex::new(Vec::new());
    unsafe {
        launch_dyn([1, 1, 1], 128, 64 * 1024, || {
            let (base, b) = base64k();
            if thread_idx() == 0 {
                fill_simple(base, 3);
            }
            sync_threads();
            let (da, db) = (wg_desc(b), wg_desc(b + 8192));
            let mut acc = wg_acc_zero();
            acc[5] = 10.0;
            wgmma_fence(&mut acc);
            wgmma_m64n256k16_bf16(&mut acc, da, db, true); // 10 + 3
            wgmma_commit();
            let before = acc[5];
            wgmma_m64n256k16_bf16(&mut acc, da, db, true); // + 3
            wgmma_commit();
            wgmma_wait::<1>(&mut acc);
            let one = acc[5];
            wgmma_wait::<0>(&mut acc);
            let two = acc[5];
            wgmma_fence(&mut acc);
            wgmma_m64n256k16_bf16(&mut acc, da, db, false); // = 3
            wgmma_commit();
            wgmma_wait::<0>(&mut acc);
            if thread_idx() == 7 {
                seen.lock().unwrap().extend([before, one, two, acc[5]]);
            }
        });
    }
    assert_eq!(seen.into_inner().unwrap(), vec![10.0, 13.0, 16.0, 3.0]);
}

/// Launches one warpgroup that runs `body(base, window address)` and returns the panic
/// message, if any.
fn panic_of(body: impl Fn(*mut u8, u32) + Sync) -> Option<String> {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe {
        launch_dyn([1, 1, 1], 128, 64 * 1024, || {
            let (base, b) = base64k();
            body(base, b);
        })
    }));
    r.err().map(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    })
}

#[test]
fn in_flight_operands_are_protected() {
    // overwriting an operand before the wait retiring the wgmma that reads it
    let msg = panic_of(|base, b| unsafe {
        if thread_idx() == 0 {
            fill_simple(base, 1);
        }
        sync_threads();
        let mut acc = wg_acc_zero();
        wgmma_fence(&mut acc);
        wgmma_m64n256k16_bf16(&mut acc, wg_desc(b), wg_desc(b + 8192), false);
        wgmma_commit();
        sync_threads();
        if thread_idx() == 0 {
            *(base.add(8192) as *mut u16) = bf(2);
        }
        sync_threads();
        wgmma_wait::<0>(&mut acc);
    });
    assert!(msg.unwrap().contains("changed before the wgmma_wait"));
    // a cp.async into an in-flight operand
    let src = [0u128; 1];
    let sp = src.as_ptr() as usize;
    let msg = panic_of(|base, b| unsafe {
        if thread_idx() == 0 {
            fill_simple(base, 1);
        }
        sync_threads();
        let mut acc = wg_acc_zero();
        wgmma_fence(&mut acc);
        wgmma_m64n256k16_bf16(&mut acc, wg_desc(b), wg_desc(b + 8192), false);
        wgmma_commit();
        cp_async_16(
            base.add(8192 + 16 * thread_idx() as usize),
            sp as *const u8,
            16,
        );
        cp_async_commit();
        cp_async_wait::<0>();
        wgmma_wait::<0>(&mut acc);
    });
    assert!(msg.unwrap().contains("in-flight wgmma"));
    // a thread that ends with its wgmma not waited for
    let msg = panic_of(|base, b| unsafe {
        if thread_idx() == 0 {
            fill_simple(base, 1);
        }
        sync_threads();
        let mut acc = wg_acc_zero();
        wgmma_fence(&mut acc);
        wgmma_m64n256k16_bf16(&mut acc, wg_desc(b), wg_desc(b + 8192), false);
        wgmma_commit();
    });
    assert!(msg.unwrap().contains("not waited for"));
    // no wgmma.fence before the first wgmma
    let msg = panic_of(|base, b| unsafe {
        if thread_idx() == 0 {
            fill_simple(base, 1);
        }
        sync_threads();
        let mut acc = wg_acc_zero();
        wgmma_m64n256k16_bf16(&mut acc, wg_desc(b), wg_desc(b + 8192), false);
        wgmma_commit();
        wgmma_wait::<0>(&mut acc);
    });
    assert!(msg.unwrap().contains("wgmma_fence"));
}

/// `cp.async` data is read by wgmma only after the writing thread's
/// `fence.proxy.async` (then a barrier for the other threads).
#[test]
fn cp_async_data_needs_the_proxy_fence() {
    let ones = [0x3f80_3f80_3f80_3f80_3f80_3f80_3f80_3f80u128; 1];
    let sp = ones.as_ptr() as usize;
    for fence in [false, true] {
        let got = Mutex::new(0.0f32);
        let msg = panic_of(|base, b| unsafe {
            if thread_idx() == 0 {
                fill_simple(base, 0);
            }
            sync_threads();
            // B := all ones through cp.async, 128 threads x 16 chunks of 16 bytes
            for i in 0..16 {
                let off = 8192 + 16 * (thread_idx() as usize + 128 * i);
                cp_async_16(base.add(off), sp as *const u8, 16);
            }
            cp_async_commit();
            cp_async_wait::<0>();
            if fence {
                fence_proxy_async();
            }
            sync_threads();
            let mut acc = wg_acc_zero();
            wgmma_fence(&mut acc);
            wgmma_m64n256k16_bf16(&mut acc, wg_desc(b), wg_desc(b + 8192), false);
            wgmma_commit();
            wgmma_wait::<0>(&mut acc);
            *got.lock().unwrap() = acc[0];
        });
        if fence {
            assert_eq!(msg, None);
            assert_eq!(*got.lock().unwrap(), 1.0);
        } else {
            assert!(msg.unwrap().contains("fence_proxy_async"));
        }
    }
}

//! The emulator's own guarantees: barriers order memory, a missing barrier is caught
//! whichever way the data flows, a barrier some threads skip is a reported deadlock
//! rather than a hang, and shared memory has the GPU's limits (48 KiB static; dynamic
//! only as much as the launch gave).
use remp_gpu_kernels::prims::emu::{
    block_idx_x, dynamic_shared, dynamic_shared_size, launch, launch_dyn, shared_alloc,
    sync_threads, thread_idx, STATIC_SHARED_BYTES,
};
use std::sync::Mutex;

#[test]
fn barriers_order_shared_memory() {
    for shift in [1u32, 63] {
        let out = Mutex::new(vec![u32::MAX; 64]);
        unsafe {
            launch([3, 1, 1], 64, || {
                let s = shared_alloc(256) as *mut u32;
                let t = thread_idx();
                *s.add(t as usize) = t;
                sync_threads();
                let v = *s.add(((t + shift) % 64) as usize);
                out.lock().unwrap()[t as usize] = v;
            });
        }
        let want: Vec<u32> = (0..64).map(|t| (t + shift) % 64).collect();
        assert_eq!(out.into_inner().unwrap(), want);
    }
}

/// Stale (poisoned) values read when thread `writer(t)`'s slot is read by thread `t`
/// without a barrier, in a one-block launch (the case a fixed resume order would miss
/// in one direction).
fn stale_reads(source: fn(u32) -> u32) -> usize {
    let out = Mutex::new(vec![0u32; 64]);
    unsafe {
        launch([1, 1, 1], 64, || {
            let s = shared_alloc(256) as *mut u32;
            let t = thread_idx();
            *s.add(t as usize) = t;
            // no barrier here: a read may see the 0xFF poison of a slot not yet written
            let v = *s.add(source(t) as usize);
            out.lock().unwrap()[t as usize] = v;
        });
    }
    let v = out.into_inner().unwrap();
    v.iter().filter(|&&x| x == u32::MAX).count()
}

#[test]
fn a_missing_barrier_is_caught_in_both_directions() {
    // from lower to higher threads, from higher to lower, and broadcasts from either end
    type Case = (&'static str, fn(u32) -> u32);
    let cases: [Case; 4] = [
        ("t reads t-1", |t| t.saturating_sub(1)),
        ("t reads t+1", |t| (t + 1).min(63)),
        ("all read thread 0", |_| 0),
        ("all read thread 63", |_| 63),
    ];
    for (what, f) in cases {
        assert!(stale_reads(f) > 0, "{what}: the race went unnoticed");
    }
}

#[test]
fn each_block_starts_with_poisoned_shared_memory() {
    let seen = Mutex::new(Vec::new());
    unsafe {
        launch([3, 1, 1], 32, || {
            let s = shared_alloc(64) as *mut u32;
            let t = thread_idx();
            if t == 0 {
                seen.lock().unwrap().push(*s);
            }
            sync_threads();
            *s.add(t as usize) = 7;
        });
    }
    assert_eq!(seen.into_inner().unwrap(), vec![u32::MAX; 3]);
}

#[test]
fn a_skipped_barrier_is_a_reported_deadlock() {
    let r = std::panic::catch_unwind(|| unsafe {
        launch([2, 1, 1], 64, || {
            if thread_idx() < 32 {
                sync_threads();
            }
        });
    });
    let e = r.expect_err("launch should fail");
    let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("deadlock"), "{msg}");
}

#[test]
fn dynamic_shared_memory_is_per_launch_and_per_block() {
    const BYTES: u32 = 100 * 1024;
    let seen = Mutex::new(vec![0u32; 2 * 64]);
    unsafe {
        launch_dyn([2, 1, 1], 64, BYTES, || {
            assert_eq!(dynamic_shared_size(), BYTES);
            let s = dynamic_shared(BYTES) as *mut u32;
            // beside a static array, in the last 256 bytes of the dynamic part
            let st = shared_alloc(64) as *mut u32;
            let far = s.add((BYTES / 4 - 64) as usize);
            assert!(far as usize >= st as usize + 64 || (far as usize) < st as usize);
            let t = thread_idx();
            assert_eq!(
                *far.add(t as usize),
                u32::MAX,
                "poisoned at each block's start"
            );
            sync_threads();
            *far.add(t as usize) = t + 64 * block_idx_x();
            sync_threads();
            seen.lock().unwrap()[(64 * block_idx_x() + t) as usize] = *far.add(63 - t as usize);
        });
    }
    let want: Vec<u32> = (0..128).map(|i| (i / 64) * 64 + 63 - i % 64).collect();
    assert_eq!(seen.into_inner().unwrap(), want);
    // asking for more than the launch gave traps, as on the GPU
    for given in [0, BYTES - 16] {
        let r = std::panic::catch_unwind(|| unsafe {
            launch_dyn([1, 1, 1], 32, given, || {
                dynamic_shared(BYTES);
            })
        });
        assert!(r.is_err(), "{given} bytes given: no trap");
    }
    // static shared memory over ptxas's 48 KiB is refused
    let r = std::panic::catch_unwind(|| unsafe {
        launch([1, 1, 1], 32, || {
            shared_alloc(STATIC_SHARED_BYTES + 16);
        })
    });
    assert!(r.is_err(), "static shared memory over 48 KiB accepted");
}

//! The emulator's own guarantees: barriers order memory, a missing barrier is caught
//! whichever way the data flows, and a barrier some threads skip is a reported
//! deadlock rather than a hang.
use remp_gpu_kernels::prims::emu::{launch, shared_alloc, sync_threads, thread_idx};
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

#[test]
fn a_missing_barrier_is_caught_in_both_directions() {
    for shift in [1u32, 63] {
        let out = Mutex::new(vec![0u32; 64]);
        unsafe {
            launch([1, 1, 1], 64, || {
                let s = shared_alloc(256) as *mut u32;
                let t = thread_idx();
                *s.add(t as usize) = t;
                // no barrier: the read may see the 0xFF poison of a slot not yet written
                let v = *s.add(((t + shift) % 64) as usize);
                out.lock().unwrap()[t as usize] = v;
            });
        }
        let stale = out
            .into_inner()
            .unwrap()
            .iter()
            .filter(|&&v| v == u32::MAX)
            .count();
        assert!(stale > 0, "shift {shift}: the race went unnoticed");
    }
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

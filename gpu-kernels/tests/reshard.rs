//! Reshard copies under the emulator: random regions, strides, offsets (misaligned
//! starts, mutually misaligned source/destination), all element sizes, pack/unpack.
#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]
mod common;
use common::*;
use remp_gpu_kernels::prims::emu::launch;
use remp_gpu_kernels::reshard::*;

fn check_region(rng: &mut Rng, elem: usize) {
    let rows = rng.range(1, 9);
    let cols = rng.pick(&[1usize, 3, 8, 17, 64, 255, 1000, 5000]);
    let src_stride = cols + rng.pick(&[0usize, 0, 1, 5, 64]);
    let dst_stride = cols + rng.pick(&[0usize, 0, 3, 8]);
    let src_off = rng.range(0, 37);
    let dst_off = rng.range(0, 37);
    let src_len = (src_off + rows * src_stride) * elem;
    let dst_len = (dst_off + rows * dst_stride) * elem + 16;
    let src: Vec<u8> = (0..src_len).map(|_| rng.next() as u8).collect();
    // u128 backing keeps the base 16-byte aligned, so offsets decide the alignment
    let mut dst_buf = vec![0xA5A5_A5A5_A5A5_A5A5_A5A5_A5A5_A5A5_A5A5u128; dst_len / 16 + 1];
    let src_buf: Vec<u128> = {
        let mut v = vec![0u128; src_len / 16 + 1];
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), v.as_mut_ptr() as *mut u8, src_len) };
        v
    };
    let d = dst_buf.as_mut_ptr() as *mut u8;
    let s = src_buf.as_ptr() as *const u8;
    let grid = rng.range(1, 3) as u32;
    unsafe {
        launch([grid, 1, 1], 64, || {
            reshard_copy2d(
                d,
                dst_off as u64,
                dst_stride as u64,
                s,
                src_off as u64,
                src_stride as u64,
                rows as u32,
                cols as u32,
                elem as u32,
            )
        })
    };
    let got = unsafe { std::slice::from_raw_parts(d, dst_len) };
    let mut want = vec![0xA5u8; dst_len];
    for r in 0..rows {
        let so = (src_off + r * src_stride) * elem;
        let dof = (dst_off + r * dst_stride) * elem;
        want[dof..dof + cols * elem].copy_from_slice(&src[so..so + cols * elem]);
    }
    if got != &want[..] {
        let i = got.iter().zip(&want).position(|(a, b)| a != b).unwrap();
        panic!(
            "copy2d elem {elem} rows {rows} cols {cols} strides {src_stride}/{dst_stride} offs {src_off}/{dst_off}: first diff at byte {i}"
        );
    }
}

#[test]
fn copy2d_random_regions() {
    let mut rng = Rng::new("copy2d");
    for i in 0..12 {
        let elem = [2usize, 4, 2][i % 3];
        check_region(&mut rng, elem);
    }
}

/// Pack the head slice [h0, h1) of KV blocks `[block, slot, kv_heads, head_dim]` into a
/// contiguous send buffer, then unpack it into blocks with fewer heads — one batched
/// launch each, as the KV reshard does.
#[test]
fn batched_kv_head_reslice() {
    let mut rng = Rng::new("batched");
    let (bs, kvh, hd) = (
        rng.pick(&[4usize, 16]),
        rng.range(2, 5),
        rng.pick(&[8usize, 24, 64]),
    );
    let nblocks = rng.range(1, 5);
    let h0 = rng.range(0, kvh - 1);
    let h1 = rng.range(h0 + 1, kvh);
    let nh = h1 - h0;
    let e = 2usize;
    let src: Vec<u16> = (0..nblocks * bs * kvh * hd)
        .map(|_| rng.next() as u16)
        .collect();
    let mut packed = vec![0u16; nblocks * bs * nh * hd];
    let descs: Vec<u64> = (0..nblocks)
        .flat_map(|b| {
            let s = unsafe { src.as_ptr().add((b * bs * kvh + h0) * hd) } as u64;
            let d = unsafe { packed.as_mut_ptr().add(b * bs * nh * hd) } as u64;
            [
                d,
                s,
                (nh * hd * e) as u64,
                (kvh * hd * e) as u64,
                ((bs as u64) << 32) | (nh * hd * e) as u64,
            ]
        })
        .collect();
    unsafe {
        launch([2, 2, 1], 64, || {
            reshard_copy2d_batched(descs.as_ptr(), nblocks as u32)
        })
    };
    let mut dst = vec![0u16; nblocks * bs * nh * hd];
    let descs2: Vec<u64> = (0..nblocks)
        .flat_map(|b| {
            let s = unsafe { packed.as_ptr().add(b * bs * nh * hd) } as u64;
            let d = unsafe { dst.as_mut_ptr().add(b * bs * nh * hd) } as u64;
            let n = (bs * nh * hd * e) as u64;
            [d, s, n, n, (1u64 << 32) | n]
        })
        .collect();
    unsafe {
        launch([1, 3, 1], 32, || {
            reshard_copy2d_batched(descs2.as_ptr(), nblocks as u32)
        })
    };
    for b in 0..nblocks {
        for s in 0..bs {
            for h in 0..nh {
                for d in 0..hd {
                    let want = src[((b * bs + s) * kvh + h0 + h) * hd + d];
                    assert_eq!(
                        dst[((b * bs + s) * nh + h) * hd + d],
                        want,
                        "block {b} slot {s} head {h} d {d}"
                    );
                }
            }
        }
    }
}

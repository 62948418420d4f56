//! Reshard copy: moves a 2-D strided region between buffers — column- or row-split
//! weight shards, KV blocks with re-sliced heads, packing into and unpacking from
//! contiguous send buffers (a contiguous side is just `stride == cols`).
//!
//! The kernels are dtype-agnostic (bf16, f16 and f32 are all plain bytes here): a
//! region is `rows` rows of `row_bytes` bytes, row `r` at `base + r * stride`. Each row
//! is cut into segments of `SEG` bytes, and each (row, segment) item is copied by one
//! warp (grid-stride over items): bytes up to the first 16-byte-aligned destination
//! address one by one, then 16-byte vector loads/stores (`ld.global.nc.v4`,
//! `st.global.v4`) unrolled four deep, then the tail. When source and destination are
//! not mutually 16-byte aligned (e.g. a column slice starting at an odd element) the
//! body uses the widest width that both share (8, 4, 2 or 1 bytes).
//!
//! Launch: block 128 threads (4 warps); grid.x about `min(items / 4, 8 * SMs)`.
//! `reshard_copy2d_batched` copies many regions in one launch (grid.y strides over the
//! descriptors, e.g. one per KV block); a descriptor is 5 u64:
//! `[dst, src, dst_stride_bytes, src_stride_bytes, (rows << 32) | row_bytes]`.
use crate::prims::*;

/// Bytes per (row, segment) work item.
const SEG: usize = 8192;

#[inline(always)]
unsafe fn copy_units<const W: usize>(d: *mut u8, s: *const u8, units: usize, lane: usize) {
    let mut u = lane;
    if W == 16 {
        // four 16-byte loads in flight per lane before the stores
        while u + 96 < units {
            let a = ld_global_nc_v4(s.add(u * 16) as *const u32);
            let b = ld_global_nc_v4(s.add((u + 32) * 16) as *const u32);
            let c = ld_global_nc_v4(s.add((u + 64) * 16) as *const u32);
            let e = ld_global_nc_v4(s.add((u + 96) * 16) as *const u32);
            st_global_v4(d.add(u * 16) as *mut u32, a);
            st_global_v4(d.add((u + 32) * 16) as *mut u32, b);
            st_global_v4(d.add((u + 64) * 16) as *mut u32, c);
            st_global_v4(d.add((u + 96) * 16) as *mut u32, e);
            u += 128;
        }
        while u < units {
            st_global_v4(
                d.add(u * 16) as *mut u32,
                ld_global_nc_v4(s.add(u * 16) as *const u32),
            );
            u += 32;
        }
    } else {
        while u < units {
            if W == 8 {
                *(d.add(u * 8) as *mut u64) = *(s.add(u * 8) as *const u64);
            } else if W == 4 {
                *(d.add(u * 4) as *mut u32) = *(s.add(u * 4) as *const u32);
            } else if W == 2 {
                *(d.add(u * 2) as *mut u16) = *(s.add(u * 2) as *const u16);
            } else {
                *d.add(u) = *s.add(u);
            }
            u += 32;
        }
    }
}

/// One warp copies `n` bytes from `s` to `d`.
#[inline(always)]
unsafe fn warp_copy(d: *mut u8, s: *const u8, n: usize) {
    let lane = lane_id() as usize;
    let diff = (d as usize) ^ (s as usize);
    let w: usize = if diff % 16 == 0 {
        16
    } else if diff % 8 == 0 {
        8
    } else if diff % 4 == 0 {
        4
    } else if diff % 2 == 0 {
        2
    } else {
        1
    };
    let mis = (d as usize) % w;
    let mut head = if mis == 0 { 0 } else { w - mis };
    if head > n {
        head = n;
    }
    if lane < head {
        *d.add(lane) = *s.add(lane);
    }
    let units = (n - head) / w;
    let (bd, bs) = (d.add(head), s.add(head));
    if w == 16 {
        copy_units::<16>(bd, bs, units, lane);
    } else if w == 8 {
        copy_units::<8>(bd, bs, units, lane);
    } else if w == 4 {
        copy_units::<4>(bd, bs, units, lane);
    } else if w == 2 {
        copy_units::<2>(bd, bs, units, lane);
    } else {
        copy_units::<1>(bd, bs, units, lane);
    }
    let done = head + units * w;
    if lane < n - done {
        *d.add(done + lane) = *s.add(done + lane);
    }
}

/// Copy one region; warps of the whole grid (x) stride over its (row, segment) items.
#[inline(always)]
unsafe fn copy_region(
    dst: *mut u8,
    dst_stride: usize,
    src: *const u8,
    src_stride: usize,
    rows: usize,
    row_bytes: usize,
) {
    let nseg = (row_bytes + SEG - 1) / SEG;
    let items = rows * nseg;
    let warps = (grid_dim_x() * (block_dim() / WARP)) as usize;
    let mut item = (block_idx_x() * (block_dim() / WARP) + warp_id()) as usize;
    while item < items {
        let r = item / nseg;
        let seg = item - r * nseg;
        let off = seg * SEG;
        let n = if row_bytes - off < SEG {
            row_bytes - off
        } else {
            SEG
        };
        warp_copy(
            dst.add(r * dst_stride + off),
            src.add(r * src_stride + off),
            n,
        );
        item += warps;
    }
}

kernels! {
    /// Copy `rows x cols` elements of `elem_bytes` bytes: element (r, c) goes from
    /// `src[src_offset + r * src_stride + c]` to `dst[dst_offset + r * dst_stride + c]`
    /// (offsets and strides in elements).
    pub fn reshard_copy2d(
        dst: *mut u8, dst_offset: u64, dst_stride: u64,
        src: *const u8, src_offset: u64, src_stride: u64,
        rows: u32, cols: u32, elem_bytes: u32,
    ) {
        let e = elem_bytes as usize;
        copy_region(
            dst.add(dst_offset as usize * e), dst_stride as usize * e,
            src.add(src_offset as usize * e), src_stride as usize * e,
            rows as usize, cols as usize * e,
        );
    }

    /// Copy `n` regions described by `descs` (5 u64 each, see the module comment).
    pub fn reshard_copy2d_batched(descs: *const u64, n: u32) {
        let mut i = block_idx_y();
        while i < n {
            let d = descs.add(i as usize * 5);
            let rr = *d.add(4);
            copy_region(
                *d as usize as *mut u8, *d.add(2) as usize,
                *d.add(1) as usize as *const u8, *d.add(3) as usize,
                (rr >> 32) as usize, (rr & 0xffff_ffff) as usize,
            );
            i += grid_dim_y();
        }
    }
}

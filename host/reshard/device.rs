//! The device side of the reshard executor: moving regions of weight shards and slots
//! of the paged KV cache in and out of device buffers with the reshard kernels
//! (`reshard_copy2d`, `reshard_copy2d_batched`), launched on whichever handle the caller
//! owns (the copy thread's own device — its own stream on CUDA — during a copy job, the
//! compute thread's at a flip).
//!
//! A piece on the wire has exactly the layout of the CPU path (`extract`'s row-major
//! regions, [`crate::runtime::kv_cache::kv_pack`]'s per position, per head K then V), in
//! one of two forms, after the engine's [`crate::backend::device::Exchange`]:
//! - same-device: a fresh bf16 device buffer of exactly the piece's elements × 2 bytes
//!   ([`pack_region_buf`], [`kv_pack_buf`]), handed over with `Comm::send_buf` and
//!   unpacked device-to-device by the receiver ([`unpack_region_buf`], [`kv_unpack_buf`])
//!   or, when it is a whole new shard, kept as that shard;
//! - host-staged: f32 host floats ([`pack_region`], [`kv_pack`] download the packed
//!   buffer; [`unpack_region`], [`kv_unpack`], [`upload_piece`] upload it). bf16 → f32
//!   is exact and f32 → bf16 gives the value back, so the round trip is lossless.
//!
//! Either way the bytes counted on the copy lane are the elements times the element size
//! the planner was given (2 or 4). The `_buf` functions only queue work: the caller
//! marks a packed buffer ready before handing it over
//! ([`crate::backend::device::mark_ready`]) and its receiver's stream waits for that
//! before unpacking it ([`crate::backend::device::wait_ready`]); dropping a buffer needs
//! no synchronization (frees are ordered after every stream's queued work).
//!
//! Every pointer handed to a kernel is checked against its buffer first: the kernels
//! write through raw addresses.

use crate::backend::device::llama::DevKv;
use crate::backend::device::{download_vec, upload_new, Arg, Buf, Device};
use crate::error::{Error, Result};
use crate::parallel::Region;
use crate::runtime::kv_cache::{block_runs, KvGeometry};
use crate::runtime::trace;
use half::bf16;
use std::ops::Range;

/// Bytes of one element on the device (bf16).
const ELEM: usize = 2;
/// Threads per block of the reshard kernels (4 warps).
const BLOCK: u32 = 128;
/// Most descriptors one batched launch covers (grid.y limit).
const MAX_GRID_Y: usize = 65_535;

fn err(msg: impl Into<String>) -> Error {
    Error::Reconfig(msg.into())
}

fn u32_of(x: usize, what: &str) -> Result<u32> {
    u32::try_from(x).map_err(|_| err(format!("{what} {x} beyond a kernel's u32 argument")))
}

/// Whether `inner` lies inside `outer`.
fn contains(outer: &Region, inner: &Region) -> bool {
    outer.rows.start <= inner.rows.start
        && inner.rows.end <= outer.rows.end
        && outer.cols.start <= inner.cols.start
        && inner.cols.end <= outer.cols.end
}

/// Element offset of `region`'s first element in a row-major buffer holding `held`.
fn offset_in(held: &Region, region: &Region) -> usize {
    (region.rows.start - held.rows.start) * held.cols.len() + (region.cols.start - held.cols.start)
}

/// Copies `region` (global coordinates) from `src`, a bf16 buffer holding `src_held`,
/// into `dst`, one holding `dst_held` (one `reshard_copy2d` launch, queued on `dev`).
pub fn copy_region(
    dev: &dyn Device,
    dst: &Buf,
    dst_held: &Region,
    src: &Buf,
    src_held: &Region,
    region: &Region,
) -> Result<()> {
    if region.is_empty() {
        return Ok(());
    }
    if !contains(src_held, region) || !contains(dst_held, region) {
        return Err(err(format!(
            "region {region:?} not inside {src_held:?} (source) and {dst_held:?} (destination)"
        )));
    }
    if src.len() < src_held.len() * ELEM || dst.len() < dst_held.len() * ELEM {
        return Err(err(format!(
            "buffers of {} / {} B for regions of {} / {} elements",
            src.len(),
            dst.len(),
            src_held.len(),
            dst_held.len()
        )));
    }
    let (sw, dw) = (src_held.cols.len(), dst_held.cols.len());
    let (mut rows, mut cols) = (region.rows.len(), region.cols.len());
    // Whole rows on both sides are one contiguous run: one long row copies faster than
    // many short ones (a norm vector is `n x 1`).
    if cols == sw && cols == dw && u32::try_from(rows * cols).is_ok() {
        (rows, cols) = (1, rows * cols);
    }
    let args = [
        Arg::from(dst),
        Arg::U64(offset_in(dst_held, region) as u64),
        Arg::U64(dw as u64),
        Arg::from(src),
        Arg::U64(offset_in(src_held, region) as u64),
        Arg::U64(sw as u64),
        Arg::U32(u32_of(rows, "rows")?),
        Arg::U32(u32_of(cols, "columns")?),
        Arg::U32(ELEM as u32),
    ];
    // The kernel's documented launch shape: a warp per (row, 8 KiB segment) item, grid
    // of about items / 4 blocks of 4 warps, at most 8 blocks per SM.
    let items = rows * (cols * ELEM).div_ceil(8192);
    let grid = items
        .div_ceil(4)
        .clamp(1, 8 * dev.sm_count().max(1) as usize) as u32;
    // SAFETY: reshard_copy2d's parameter list; both regions were checked inside their
    // buffers above.
    unsafe { dev.launch("reshard_copy2d", [grid, 1, 1], BLOCK, &args) }
}

/// `region` of a bf16 buffer holding `held`, packed on the device into a fresh buffer
/// of exactly `region.len() * 2` bytes (the same-device wire form; queued on `dev`).
pub fn pack_region_buf(dev: &dyn Device, src: &Buf, held: &Region, region: &Region) -> Result<Buf> {
    if !contains(held, region) {
        return Err(err(format!("region {region:?} not inside {held:?}")));
    }
    let out = dev.alloc(region.len() * ELEM)?;
    trace::mark("piece alloc");
    copy_region(dev, &out, region, src, held, region)?;
    trace::mark("piece pack");
    Ok(out)
}

/// `region` of a bf16 buffer holding `held`, as f32 for the wire (packed on the device,
/// then downloaded).
pub fn pack_region(
    dev: &dyn Device,
    src: &Buf,
    held: &Region,
    region: &Region,
) -> Result<Vec<f32>> {
    let n = region.len();
    let b: Vec<bf16> = if region == held {
        download_vec(dev, src, n)?
    } else {
        download_vec(dev, &pack_region_buf(dev, src, held, region)?, n)?
    };
    Ok(b.iter().map(|v| v.to_f32()).collect())
}

/// Writes `piece` (a bf16 buffer holding exactly `region`, from the wire) into `dst`, a
/// bf16 buffer holding `held` (queued on `dev`, which must already wait for the piece's
/// producer if it came from another handle).
pub fn unpack_region_buf(
    dev: &dyn Device,
    dst: &Buf,
    held: &Region,
    region: &Region,
    piece: &Buf,
) -> Result<()> {
    if piece.len() != region.len() * ELEM {
        return Err(err(format!(
            "piece of {} B for a region of {} elements",
            piece.len(),
            region.len()
        )));
    }
    copy_region(dev, dst, held, piece, region, region)
}

/// Writes `data` (the contents of `region`, from the wire) into a bf16 buffer holding
/// `held`: uploaded, then unpacked into place on the device.
pub fn unpack_region(
    dev: &dyn Device,
    dst: &Buf,
    held: &Region,
    region: &Region,
    data: &[f32],
) -> Result<()> {
    if data.len() != region.len() {
        return Err(err(format!(
            "piece of {} floats for a region of {}",
            data.len(),
            region.len()
        )));
    }
    let b: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
    if region == held {
        if dst.len() < b.len() * ELEM {
            return Err(err("piece larger than its buffer"));
        }
        return dev.upload(dst, 0, crate::backend::device::pod::bytes_of(&b));
    }
    let tmp = upload_new(dev, &b)?;
    // (`tmp` is freed after the kernel reading it: frees are stream-ordered.)
    unpack_region_buf(dev, dst, held, region, &tmp)
}

/// A new bf16 buffer holding `data` (a piece that is a whole new shard), sized exactly
/// like a loaded shard's (the GEMMs check weight sizes).
pub fn upload_piece(dev: &dyn Device, data: &[f32]) -> Result<Buf> {
    let b: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
    upload_new(dev, &b)
}

/// Descriptors of `reshard_copy2d_batched` (5 u64 each), checked against their buffers.
#[derive(Default)]
struct Batch {
    descs: Vec<u64>,
    max_items: usize,
}

/// One side of a strided copy: a buffer, the byte offset of the first row, the stride.
struct Side<'a> {
    buf: &'a Buf,
    off: usize,
    stride: usize,
}

impl Batch {
    fn push(&mut self, dst: Side, src: Side, rows: usize, row_bytes: usize) -> Result<()> {
        if rows == 0 || row_bytes == 0 {
            return Ok(());
        }
        for s in [&dst, &src] {
            let end = s.off + (rows - 1) * s.stride + row_bytes;
            if end > s.buf.len() {
                return Err(err(format!(
                    "KV copy of {rows} x {row_bytes} B ends at {end}, beyond a {}-byte buffer",
                    s.buf.len()
                )));
            }
        }
        let rr = ((u32_of(rows, "rows")? as u64) << 32) | u32_of(row_bytes, "row bytes")? as u64;
        self.descs.extend_from_slice(&[
            dst.buf.ptr() + dst.off as u64,
            src.buf.ptr() + src.off as u64,
            dst.stride as u64,
            src.stride as u64,
            rr,
        ]);
        self.max_items = self.max_items.max(rows * row_bytes.div_ceil(8192));
        Ok(())
    }

    /// Queues the copies on `dev` (the descriptor buffers are freed after the kernels
    /// that read them: frees are ordered after every stream's queued work).
    fn launch(self, dev: &dyn Device) -> Result<()> {
        for chunk in self.descs.chunks(5 * MAX_GRID_Y) {
            let n = chunk.len() / 5;
            let descs = upload_new(dev, chunk)?;
            let gx = self.max_items.div_ceil(4).clamp(1, 8) as u32;
            // SAFETY: reshard_copy2d_batched's parameters; every descriptor was checked
            // inside its buffers by `push`.
            unsafe {
                dev.launch(
                    "reshard_copy2d_batched",
                    [gx, n as u32, 1],
                    BLOCK,
                    &[Arg::from(&descs), Arg::U32(n as u32)],
                )?;
            }
        }
        Ok(())
    }
}

/// The KV positions one transfer moves for one sequence: its block table and a range of
/// positions.
pub type KvSpan<'a> = (&'a [u32], Range<usize>);

/// For every sequence span, every run of positions inside one block: `(slot, count,
/// position index in the packed stream)`.
fn runs(spans: &[KvSpan], geom: KvGeometry) -> Result<Vec<(usize, usize, usize)>> {
    let mut out = Vec::new();
    let mut at = 0;
    for (table, positions) in spans {
        let r = block_runs(table, positions.clone(), geom.block_size)
            .ok_or_else(|| err(format!("positions {positions:?} beyond a block table")))?;
        for (slot, n) in r {
            out.push((slot, n, at));
            at += n;
        }
    }
    Ok(out)
}

fn check_heads(kv: &DevKv, heads: &Range<usize>) -> Result<()> {
    if heads.start < kv.kv_heads.start || heads.end > kv.kv_heads.end {
        return Err(err(format!(
            "KV heads {heads:?} not held (holds {:?})",
            kv.kv_heads
        )));
    }
    Ok(())
}

/// Elements of a packed KV piece of `heads` at the spans' positions (K and V).
pub fn kv_piece_elems(spans: &[KvSpan], heads: &Range<usize>, geom: KvGeometry) -> usize {
    let pos: usize = spans.iter().map(|(_, p)| p.len()).sum();
    pos * heads.len() * 2 * geom.head_dim
}

/// Descriptors between a DevKv and a packed buffer in `kv_pack`'s layout; `to_packed`
/// picks the direction.
fn kv_batch(
    kv: &DevKv,
    geom: KvGeometry,
    spans: &[KvSpan],
    heads: &Range<usize>,
    packed: &Buf,
    to_packed: bool,
) -> Result<Batch> {
    check_heads(kv, heads)?;
    let hd = geom.head_dim;
    let slot = kv.kv_heads.len() * hd * ELEM;
    let per_pos = heads.len() * 2 * hd * ELEM;
    let mut b = Batch::default();
    for (first, n, at) in runs(spans, geom)? {
        for (i, h) in heads.clone().enumerate() {
            let in_slot = (h - kv.kv_heads.start) * hd * ELEM;
            for (cache, kv_off) in [(&kv.k, 0), (&kv.v, hd * ELEM)] {
                let c = Side {
                    buf: cache,
                    off: first * slot + in_slot,
                    stride: slot,
                };
                let p = Side {
                    buf: packed,
                    off: at * per_pos + i * 2 * hd * ELEM + kv_off,
                    stride: per_pos,
                };
                let (dst, src) = if to_packed { (p, c) } else { (c, p) };
                b.push(dst, src, n, hd * ELEM)?;
            }
        }
    }
    Ok(b)
}

/// K and V of `heads` at every span's positions, concatenated in span order in
/// [`crate::runtime::kv_cache::kv_pack`]'s layout, packed into a fresh bf16 buffer of
/// exactly [`kv_piece_elems`] × 2 bytes (the same-device wire form). Errors on an empty
/// piece (the callers send none).
pub fn kv_pack_buf(
    dev: &dyn Device,
    kv: &DevKv,
    geom: KvGeometry,
    spans: &[KvSpan],
    heads: &Range<usize>,
) -> Result<Buf> {
    let n = kv_piece_elems(spans, heads, geom);
    if n == 0 {
        return Err(err("an empty KV piece has no buffer"));
    }
    let packed = dev.alloc(n * ELEM)?;
    trace::mark("piece alloc");
    kv_batch(kv, geom, spans, heads, &packed, true)?.launch(dev)?;
    trace::mark("kv pack");
    Ok(packed)
}

/// The device twin of [`crate::runtime::kv_cache::kv_pack`]: K and V of `heads` at every
/// span's positions, concatenated in span order, as f32.
pub fn kv_pack(
    dev: &dyn Device,
    kv: &DevKv,
    geom: KvGeometry,
    spans: &[KvSpan],
    heads: &Range<usize>,
) -> Result<Vec<f32>> {
    let n = kv_piece_elems(spans, heads, geom);
    if n == 0 {
        return Ok(Vec::new());
    }
    let packed = kv_pack_buf(dev, kv, geom, spans, heads)?;
    let b: Vec<bf16> = download_vec(dev, &packed, n)?;
    Ok(b.iter().map(|v| v.to_f32()).collect())
}

/// Unpacks `piece` (a bf16 buffer from [`kv_pack_buf`]) into `kv`, for all spans at once.
pub fn kv_unpack_buf(
    dev: &dyn Device,
    kv: &DevKv,
    geom: KvGeometry,
    spans: &[KvSpan],
    heads: &Range<usize>,
    piece: &Buf,
) -> Result<()> {
    let n = kv_piece_elems(spans, heads, geom);
    if piece.len() != n * ELEM {
        return Err(err(format!(
            "KV piece of {} B for {n} elements (heads {heads:?})",
            piece.len()
        )));
    }
    if n == 0 {
        return Ok(());
    }
    kv_batch(kv, geom, spans, heads, piece, false)?.launch(dev)
}

/// The device twin of [`crate::runtime::kv_cache::kv_unpack`] for all spans at once.
pub fn kv_unpack(
    dev: &dyn Device,
    kv: &DevKv,
    geom: KvGeometry,
    spans: &[KvSpan],
    heads: &Range<usize>,
    data: &[f32],
) -> Result<()> {
    let n = kv_piece_elems(spans, heads, geom);
    if data.len() != n {
        return Err(err(format!(
            "KV piece of {} floats for {n} (heads {heads:?})",
            data.len()
        )));
    }
    if n == 0 {
        return Ok(());
    }
    let b: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
    let packed = upload_new(dev, &b)?;
    kv_unpack_buf(dev, kv, geom, spans, heads, &packed)
}

/// Copies K and V of `heads` at the spans' positions from one DevKv into another on the
/// same worker (a local KV transfer: no wire, no host round trip).
pub fn kv_copy(
    dev: &dyn Device,
    dst: &DevKv,
    src: &DevKv,
    geom: KvGeometry,
    spans: &[KvSpan],
    heads: &Range<usize>,
) -> Result<()> {
    check_heads(src, heads)?;
    check_heads(dst, heads)?;
    let hd = geom.head_dim;
    let (ss, ds) = (
        src.kv_heads.len() * hd * ELEM,
        dst.kv_heads.len() * hd * ELEM,
    );
    let (so, dso) = (
        (heads.start - src.kv_heads.start) * hd * ELEM,
        (heads.start - dst.kv_heads.start) * hd * ELEM,
    );
    let mut b = Batch::default();
    for (first, n, _) in runs(spans, geom)? {
        for (d, s) in [(&dst.k, &src.k), (&dst.v, &src.v)] {
            b.push(
                Side {
                    buf: d,
                    off: first * ds + dso,
                    stride: ds,
                },
                Side {
                    buf: s,
                    off: first * ss + so,
                    stride: ss,
                },
                n,
                heads.len() * hd * ELEM,
            )?;
        }
    }
    if b.descs.is_empty() {
        return Ok(());
    }
    b.launch(dev)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::device::emu::EmuDevice;
    use crate::runtime::kv_cache::{self, LayerKv};

    /// bf16-exact test values (so the device copy equals the f32 one).
    fn vals(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                bf16::from_f32(
                    (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 64.0 - 7.0,
                )
                .to_f32()
            })
            .collect()
    }

    fn to_dev(dev: &dyn Device, v: &[f32]) -> Buf {
        upload_piece(dev, v).unwrap()
    }

    fn from_dev(dev: &dyn Device, b: &Buf, n: usize) -> Vec<f32> {
        let h: Vec<bf16> = download_vec(dev, b, n).unwrap();
        h.iter().map(|x| x.to_f32()).collect()
    }

    #[test]
    fn regions_pack_unpack_and_copy_like_the_host() {
        let dev = EmuDevice::new();
        let held = Region::new(4..12, 8..20);
        let data = vals(held.len(), 1);
        let src = to_dev(&dev, &data);
        let host_extract = |r: &Region| -> Vec<f32> {
            r.rows
                .clone()
                .flat_map(|i| {
                    let at = (i - 4) * 12 + (r.cols.start - 8);
                    data[at..at + r.cols.len()].to_vec()
                })
                .collect()
        };
        for r in [
            Region::new(5..9, 9..14),
            Region::new(4..12, 8..20),
            Region::new(6..8, 8..20),
            Region::new(11..12, 19..20),
        ] {
            assert_eq!(
                pack_region(&dev, &src, &held, &r).unwrap(),
                host_extract(&r),
                "{r:?}"
            );
            // Unpacking into another buffer's layout, then copying back.
            let other = Region::new(3..13, 7..21);
            let dst = dev.alloc(other.len() * ELEM).unwrap();
            unpack_region(&dev, &dst, &other, &r, &host_extract(&r)).unwrap();
            let back = dev.alloc(held.len() * ELEM).unwrap();
            copy_region(&dev, &back, &held, &dst, &other, &r).unwrap();
            assert_eq!(
                pack_region(&dev, &back, &held, &r).unwrap(),
                host_extract(&r)
            );
        }
        // The same-device form: exact-size bf16 buffers, unpacked device-to-device.
        for r in [
            Region::new(5..9, 9..14),
            held.clone(),
            Region::new(6..8, 8..20),
        ] {
            let piece = pack_region_buf(&dev, &src, &held, &r).unwrap();
            assert_eq!(piece.len(), r.len() * ELEM, "{r:?}");
            assert_eq!(from_dev(&dev, &piece, r.len()), host_extract(&r), "{r:?}");
            let other = Region::new(3..13, 7..21);
            let dst = dev.alloc(other.len() * ELEM).unwrap();
            unpack_region_buf(&dev, &dst, &other, &r, &piece).unwrap();
            assert_eq!(
                pack_region(&dev, &dst, &other, &r).unwrap(),
                host_extract(&r)
            );
            // A piece of another size is refused.
            let short = dev.alloc(piece.len() - ELEM).unwrap();
            assert!(unpack_region_buf(&dev, &dst, &other, &r, &short).is_err());
        }
        // Outside the held region: refused, nothing launched.
        assert!(pack_region(&dev, &src, &held, &Region::new(3..5, 8..9)).is_err());
        assert!(pack_region_buf(&dev, &src, &held, &Region::new(3..5, 8..9)).is_err());
        assert!(unpack_region(&dev, &src, &held, &Region::new(4..5, 8..9), &[1.0, 2.0]).is_err());
    }

    #[test]
    fn kv_pack_unpack_copy_match_the_host_layout() {
        let dev = EmuDevice::new();
        let geom = KvGeometry {
            num_blocks: 6,
            block_size: 4,
            head_dim: 8,
        };
        // A cache of heads 1..4 filled with distinct values, on the host and the device.
        let mut host = LayerKv::new(1..4, geom);
        host.k = vals(host.k.len(), 2);
        host.v = vals(host.v.len(), 3);
        let dkv = DevKv::new(&dev, 1..4, geom).unwrap();
        let up = |b: &Buf, v: &[f32]| {
            let h: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
            dev.upload(b, 0, crate::backend::device::pod::bytes_of(&h))
                .unwrap();
        };
        up(&dkv.k, &host.k);
        up(&dkv.v, &host.v);
        let (t1, t2) = (vec![3u32, 0, 5], vec![1u32, 4]);
        let spans: Vec<KvSpan> = vec![(&t1, 2..11), (&t2, 0..0), (&t2, 3..6)];
        for heads in [1..4, 2..3, 1..2, 3..4] {
            let mut want = Vec::new();
            for (t, p) in &spans {
                kv_cache::kv_pack(&host, t, p.clone(), &heads, &mut want);
            }
            let got = kv_pack(&dev, &dkv, geom, &spans, &heads).unwrap();
            assert_eq!(got, want, "heads {heads:?}");
            // Into a cache holding other heads, then copied back into a third.
            let other = DevKv::new(&dev, heads.start - 1..4, geom).unwrap();
            kv_unpack(&dev, &other, geom, &spans, &heads, &got).unwrap();
            let third = DevKv::new(&dev, heads.clone(), geom).unwrap();
            kv_copy(&dev, &third, &other, geom, &spans, &heads).unwrap();
            assert_eq!(kv_pack(&dev, &third, geom, &spans, &heads).unwrap(), want);
            // The same-device form: the packed bf16 buffer itself, exactly sized.
            let piece = kv_pack_buf(&dev, &dkv, geom, &spans, &heads).unwrap();
            assert_eq!(piece.len(), want.len() * ELEM);
            assert_eq!(from_dev(&dev, &piece, want.len()), want);
            let fourth = DevKv::new(&dev, 0..4, geom).unwrap();
            kv_unpack_buf(&dev, &fourth, geom, &spans, &heads, &piece).unwrap();
            assert_eq!(kv_pack(&dev, &fourth, geom, &spans, &heads).unwrap(), want);
            let short = dev.alloc(piece.len() - ELEM).unwrap();
            assert!(kv_unpack_buf(&dev, &fourth, geom, &spans, &heads, &short).is_err());
        }
        let n = geom.num_blocks * geom.block_size * 3 * geom.head_dim;
        assert_eq!(from_dev(&dev, &dkv.k, n), host.k);
        // A span beyond its table, heads not held, a short piece: errors.
        assert!(kv_pack(&dev, &dkv, geom, &[(&t2, 0..9)], &(1..2)).is_err());
        assert!(kv_pack(&dev, &dkv, geom, &[(&t2, 0..1)], &(0..2)).is_err());
        assert!(kv_unpack(&dev, &dkv, geom, &[(&t2, 0..1)], &(1..2), &[0.0; 3]).is_err());
        assert!(
            kv_pack_buf(&dev, &dkv, geom, &[(&t2, 0..0)], &(1..2)).is_err(),
            "empty"
        );
        // A block id beyond the cache is caught before any kernel writes.
        let bad = vec![9u32];
        assert!(kv_pack(&dev, &dkv, geom, &[(&bad, 0..1)], &(1..2)).is_err());
    }
}

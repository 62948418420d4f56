//! The paged KV cache.
//!
//! The driver owns one [`BlockAllocator`]: a sequence's block table maps its positions
//! to block ids (`pos / block_size`), and the same ids address the KV storage on every
//! worker and every layer. Each worker keeps, per layer it runs, a [`LayerKv`] holding
//! only its KV heads: `k`/`v` are `[num_blocks, block_size, kv_heads_local, head_dim]`.
//! When tp exceeds the model's KV heads, several workers hold the same head (replicated).
//!
//! [`kv_pack`] / [`kv_unpack`] define the wire layout of KV moved by a reconfiguration;
//! device workers (bf16 `DevKv`, same paging) pack and unpack the same layout with the
//! reshard kernels in `reshard::device`, over the runs of [`block_runs`].

use std::ops::Range;

/// Free-list of KV blocks shared by all sequences.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    free: Vec<u32>,
    total: usize,
}

impl BlockAllocator {
    pub fn new(total: usize) -> Self {
        BlockAllocator {
            free: (0..total as u32).rev().collect(),
            total,
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// `n` blocks, or `None` (nothing taken) when fewer are free.
    pub fn alloc(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        let at = self.free.len() - n;
        Some(self.free.split_off(at))
    }

    pub fn release(&mut self, blocks: &[u32]) {
        self.free.extend_from_slice(blocks);
    }
}

/// Geometry shared by every layer's storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvGeometry {
    pub num_blocks: usize,
    pub block_size: usize,
    pub head_dim: usize,
}

impl KvGeometry {
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }
}

/// One layer's KV storage on one worker.
#[derive(Debug, Clone)]
pub struct LayerKv {
    /// Global KV-head ids held here.
    pub kv_heads: Range<usize>,
    pub geom: KvGeometry,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

impl LayerKv {
    pub fn new(kv_heads: Range<usize>, geom: KvGeometry) -> Self {
        let n = geom.num_blocks * geom.block_size * kv_heads.len() * geom.head_dim;
        LayerKv {
            kv_heads,
            geom,
            k: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    /// Floats per token slot (all local heads).
    pub fn slot_len(&self) -> usize {
        self.kv_heads.len() * self.geom.head_dim
    }

    /// Offset of the slot holding position `pos` of a sequence with `table`.
    pub fn slot_offset(&self, table: &[u32], pos: usize) -> usize {
        let bs = self.geom.block_size;
        (table[pos / bs] as usize * bs + pos % bs) * self.slot_len()
    }

    pub fn bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * std::mem::size_of::<f32>()
    }
}

/// The slots of `positions` of a sequence with `table`, as runs inside one block:
/// `(first slot, count)`, a slot being `block id * block_size + offset in the block`.
/// `None` when a position is beyond the table.
pub fn block_runs(
    table: &[u32],
    positions: Range<usize>,
    block_size: usize,
) -> Option<Vec<(usize, usize)>> {
    let mut runs = Vec::new();
    let mut p = positions.start;
    while p < positions.end {
        let b = p / block_size;
        let end = ((b + 1) * block_size).min(positions.end);
        runs.push((
            *table.get(b)? as usize * block_size + p % block_size,
            end - p,
        ));
        p = end;
    }
    Some(runs)
}

/// Packs K and V of `heads` (global KV-head ids, held by `kv`) at `positions` of the
/// sequence with `table`: per position, per head, `head_dim` K values then V values.
pub fn kv_pack(
    kv: &LayerKv,
    table: &[u32],
    positions: Range<usize>,
    heads: &Range<usize>,
    out: &mut Vec<f32>,
) {
    let hd = kv.geom.head_dim;
    for p in positions {
        let base = kv.slot_offset(table, p);
        for h in heads.clone() {
            let off = base + (h - kv.kv_heads.start) * hd;
            out.extend_from_slice(&kv.k[off..off + hd]);
            out.extend_from_slice(&kv.v[off..off + hd]);
        }
    }
}

/// The inverse of [`kv_pack`]; returns how many floats it consumed.
pub fn kv_unpack(
    kv: &mut LayerKv,
    table: &[u32],
    positions: Range<usize>,
    heads: &Range<usize>,
    data: &[f32],
) -> usize {
    let hd = kv.geom.head_dim;
    let mut at = 0;
    for p in positions {
        let base = kv.slot_offset(table, p);
        for h in heads.clone() {
            let off = base + (h - kv.kv_heads.start) * hd;
            kv.k[off..off + hd].copy_from_slice(&data[at..at + hd]);
            kv.v[off..off + hd].copy_from_slice(&data[at + hd..at + 2 * hd]);
            at += 2 * hd;
        }
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocator_refuses_without_taking() {
        let mut a = BlockAllocator::new(4);
        let x = a.alloc(3).unwrap();
        assert_eq!(a.free(), 1);
        assert!(a.alloc(2).is_none());
        assert_eq!(a.free(), 1);
        a.release(&x);
        assert_eq!(a.free(), 4);
        let mut all = a.alloc(4).unwrap();
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3]);
    }

    #[test]
    fn block_runs_split_at_block_boundaries() {
        let table = [7, 2, 5];
        assert_eq!(
            block_runs(&table, 3..37, 16),
            Some(vec![(7 * 16 + 3, 13), (2 * 16, 16), (5 * 16, 5)])
        );
        assert_eq!(block_runs(&table, 4..4, 16), Some(vec![]));
        assert_eq!(block_runs(&table, 40..49, 16), None);
    }
}

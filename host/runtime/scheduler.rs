//! The scheduler: continuous batching over the paged KV cache.
//!
//! Requests wait in FIFO order and are admitted between steps while the running limit,
//! the per-step prefill budget and the KV blocks allow. A request reserves the blocks of
//! its whole budget (prompt + max new tokens) when admitted, so a running request never
//! runs out of cache and nothing is preempted; each step then prefills the newly
//! admitted requests and decodes one token of every running one, in one batch.

use crate::runtime::engine::{Request, RequestId};
use crate::runtime::kv_cache::{BlockAllocator, KvGeometry};
use crate::runtime::sampling::Rng;
use std::collections::VecDeque;
use std::sync::Arc;

/// One request's state.
pub(crate) struct Seq {
    pub(crate) id: RequestId,
    pub(crate) req: Request,
    /// Prompt then generated tokens.
    pub(crate) tokens: Vec<u32>,
    /// Tokens whose KV is in the cache.
    pub(crate) cached: usize,
    pub(crate) blocks: Arc<Vec<u32>>,
    pub(crate) rng: Rng,
    pub(crate) max_new: usize,
}

pub(crate) struct Scheduler {
    pub(crate) waiting: VecDeque<Seq>,
    pub(crate) running: Vec<Seq>,
    blocks: BlockAllocator,
    geom: KvGeometry,
    max_running: usize,
    max_prefill_tokens: usize,
}

impl Scheduler {
    pub(crate) fn new(
        blocks: BlockAllocator,
        geom: KvGeometry,
        max_running: usize,
        max_prefill_tokens: usize,
    ) -> Self {
        Scheduler {
            waiting: VecDeque::new(),
            running: Vec::new(),
            blocks,
            geom,
            max_running,
            max_prefill_tokens,
        }
    }

    pub(crate) fn total_blocks(&self) -> usize {
        self.blocks.total()
    }

    pub(crate) fn free_blocks(&self) -> usize {
        self.blocks.free()
    }

    pub(crate) fn enqueue(&mut self, seq: Seq) {
        self.waiting.push_back(seq);
    }

    /// Removes a waiting or running request (its blocks freed); whether it was there.
    pub(crate) fn remove(&mut self, id: RequestId) -> bool {
        let seq = if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            self.waiting.remove(i)
        } else if let Some(i) = self.running.iter().position(|s| s.id == id) {
            Some(self.running.remove(i))
        } else {
            None
        };
        seq.map(|s| self.blocks.release(&s.blocks)).is_some()
    }

    /// Drops the running requests at `finished` (ascending indices), freeing their blocks.
    pub(crate) fn retire(&mut self, finished: &[usize]) {
        for &i in finished.iter().rev() {
            let s = self.running.remove(i);
            self.blocks.release(&s.blocks);
        }
    }

    /// Admits waiting requests (FIFO) while KV blocks, the running limit and the prefill
    /// budget allow (a single prompt over the budget is still admitted on its own).
    pub(crate) fn admit(&mut self) {
        let mut prefill = 0;
        while let Some(s) = self.waiting.front() {
            let n = s.tokens.len();
            if self.running.len() >= self.max_running
                || (prefill > 0 && prefill + n > self.max_prefill_tokens)
            {
                break;
            }
            let need = self.geom.blocks_for(n + s.max_new);
            let Some(blocks) = self.blocks.alloc(need) else {
                break;
            };
            let Some(mut s) = self.waiting.pop_front() else {
                break;
            };
            s.blocks = Arc::new(blocks);
            prefill += n;
            self.running.push(s);
        }
    }
}

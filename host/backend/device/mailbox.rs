//! Same-device mailboxes: where tensor-parallel ranks that share one GPU leave their
//! all-reduce partials for each other on decode-sized steps.
//!
//! Why: with several ranks on one GPU a decode step is bound by the host (run 8 on an
//! H200, `docs/gpu-results.md`: tp4pp1 took 9-12 ms a step, most of it driver calls of
//! the exchange). Handing a fresh buffer to the peers costs, per exchange and worker,
//! an allocation, a copy, a copy per peer into the worker's own slots and a
//! stream-ordered free (batched, each batch fanning in over every stream). A mailbox is allocated once per group, and an exchange is one event and one
//! wait per peer around the GEMM and the reduce that were there anyway; the addresses
//! stay the same from step to step, so the runs around it still replay as graphs.
//!
//! Layout: one f32 buffer per group, `[set 2][member g][MAILBOX_TOKENS x hidden]`; an
//! exchange of `t` tokens uses the first `g x t x hidden` floats of its set as
//! `[member][t][hidden]`, exactly what the split-K reduce kernel reads.
//!
//! An exchange (`DeviceCompute::reduce_on_device`): the member's GEMM writes its
//! partial into its slot of the set, the member records an event and posts it to every
//! peer through the Comm layer (`Comm::send_posted`, counting the slot's bytes once
//! per receiver, as a copy to each would be counted), its stream waits for every peer's
//! event, and one reduce launch sums the set's slots in group order.
//!
//! Why two sets, and why no write races a read: o_proj's partials use set 0 and
//! down_proj's set 1, and every layer does one of each, so between two uses of a set a
//! member always passes an exchange of the other. A peer posts that exchange's event
//! after its reduce of the set's previous use (its stream's order), and a member waits
//! for every peer's event before its next GEMM into the set. A failed step leaves
//! nothing in flight: each worker synchronizes before the next step is sent.
//!
//! The memory is the group's, not one worker's (allocated on the first asker's stream,
//! held by every member; the Comm layer carries only the events): [`Mailboxes`] hands
//! every member the same buffer, the first member to ask allocates it (its stream marks
//! it ready, the others wait for that before first use), and it is freed (stream-
//! ordered) when no member holds it any more: a member lets go of a group's mailbox
//! at its next mailbox exchange after a step without one in that group (after a
//! switch, the old groups'; a worker that never exchanges through a mailbox again, e.g.
//! after a switch to tp1, keeps its last ones until the engine stops). If the
//! allocation fails, decode steps fail with the error (the peers expect notices, so no
//! member can fall back alone). Like the workers' scratch buffers it is not in the memory meter (weights,
//! KV cache, reshard staging): 4 MiB for a tp4 group of a 1.1B model (hidden 2048),
//! 32 MiB for tp8 at hidden 8192.

use super::{mark_ready, wait_ready, Buf, Device};
use crate::parallel::WorkerId;
use crate::{Error, Result};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// Steps of at most this many tokens exchange through mailboxes (decode batches; the
/// engine's decode GEMM takes M <= 64 too). Larger steps (prefills) are GPU-bound and
/// hand buffers over as before, so a mailbox stays small: 2 x 8 x 64 x 8192 x 4 B =
/// 32 MiB for tp8 at hidden 8192.
pub const MAILBOX_TOKENS: usize = 64;

/// Which set of a mailbox an exchange uses (see the module note).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MailSet {
    /// The attention output projection's partials.
    Attention = 0,
    /// The MLP down projection's partials.
    Mlp = 1,
}

/// The mailboxes of one engine's workers on one device, by group. Shared by the
/// workers (an `Arc` each); only workers that share a device use it.
pub struct Mailboxes {
    hidden: usize,
    boxes: Mutex<HashMap<Vec<WorkerId>, Weak<Buf>>>,
    /// Exchanges that went through a mailbox (every member's post counts one).
    posted: AtomicU64,
    /// Mailboxes allocated.
    allocated: AtomicU64,
}

impl Mailboxes {
    /// Mailboxes for a model of hidden size `hidden`.
    pub fn new(hidden: usize) -> Mailboxes {
        Mailboxes {
            hidden,
            boxes: Mutex::new(HashMap::new()),
            posted: AtomicU64::new(0),
            allocated: AtomicU64::new(0),
        }
    }

    /// Bytes of one set's slot of one member (the largest exchange it holds).
    pub fn slot_bytes(&self) -> usize {
        MAILBOX_TOKENS * self.hidden * std::mem::size_of::<f32>()
    }

    /// Bytes of the mailbox of a group of `g` members.
    pub fn box_bytes(&self, g: usize) -> usize {
        2 * g * self.slot_bytes()
    }

    /// The mailbox of `group`, allocated on `dev` (the asking member's handle) if no
    /// member holds one; `dev`'s later work is ordered after the allocation either way.
    pub fn get(&self, dev: &dyn Device, group: &[WorkerId]) -> Result<Arc<Buf>> {
        let mut m = self
            .boxes
            .lock()
            .map_err(|_| Error::Device("mailbox table poisoned".into()))?;
        let b = match m.get(group).and_then(Weak::upgrade) {
            Some(b) => b,
            None => {
                let mut b = dev.alloc(self.box_bytes(group.len()))?;
                mark_ready(dev, &mut b)?;
                let b = Arc::new(b);
                m.retain(|_, w| w.strong_count() > 0);
                m.insert(group.to_vec(), Arc::downgrade(&b));
                self.allocated.fetch_add(1, Ordering::Relaxed);
                b
            }
        };
        drop(m);
        wait_ready(dev, &b)?;
        Ok(b)
    }

    /// Counts one member's post.
    pub(crate) fn count_post(&self) {
        self.posted.fetch_add(1, Ordering::Relaxed);
    }

    /// Exchanges posted through mailboxes so far (one per member and exchange).
    pub fn posted(&self) -> u64 {
        self.posted.load(Ordering::Relaxed)
    }

    /// Mailboxes allocated so far.
    pub fn allocated(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
    }

    /// Byte offset of member `idx`'s slot of `set` in the mailbox of a group of `g`
    /// members, for an exchange of `part_bytes` bytes (at most
    /// [`Mailboxes::slot_bytes`]); member 0's slot is where the set starts.
    pub fn slot_offset(&self, g: usize, set: MailSet, idx: usize, part_bytes: usize) -> usize {
        set as usize * g * self.slot_bytes() + idx * part_bytes
    }
}

/// The mailboxes one worker holds, by group, with the last step it exchanged in each
/// (during a switch a worker is in its old and its new group in one step).
#[derive(Default)]
pub struct HeldMailboxes(Vec<Held>);

struct Held {
    group: Vec<WorkerId>,
    buf: Arc<Buf>,
    last_step: u64,
}

impl HeldMailboxes {
    /// The mailbox of `group` in step `step`: the one held, else `mail`'s (which orders
    /// `dev`'s later work after its allocation). Lets go of the mailboxes of groups this
    /// worker exchanged in neither in this step nor in the one before, so the old
    /// groups' are freed soon after a switch.
    pub fn get<'d>(
        &mut self,
        mail: &Mailboxes,
        dev: impl FnOnce() -> Result<&'d dyn Device>,
        group: &[WorkerId],
        step: u64,
    ) -> Result<Arc<Buf>> {
        self.0
            .retain(|h| h.group == group || h.last_step + 1 >= step);
        if let Some(h) = self.0.iter_mut().find(|h| h.group == group) {
            h.last_step = step;
            return Ok(h.buf.clone());
        }
        let buf = mail.get(dev()?, group)?;
        self.0.push(Held {
            group: group.to_vec(),
            buf: buf.clone(),
            last_step: step,
        });
        Ok(buf)
    }

    /// Mailboxes held.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::device::emu::EmuDevice;

    /// Members of a group get one buffer; another group gets its own; a group no member
    /// holds any more gets a fresh one. The slots of a set are packed `[member][t][h]`
    /// (what the reduce kernel reads) and the two sets do not overlap.
    #[test]
    fn one_mailbox_per_group_while_held() {
        let dev = EmuDevice::on_gpu(0);
        let mb = Mailboxes::new(16);
        let g = [WorkerId(0), WorkerId(1)];
        let a = mb.get(&dev, &g).unwrap();
        let b = mb.get(&dev, &g).unwrap();
        assert_eq!(a.ptr(), b.ptr());
        assert_eq!(a.len(), 2 * 2 * 64 * 16 * 4);
        let other = mb.get(&dev, &[WorkerId(2), WorkerId(3)]).unwrap();
        assert_ne!(other.ptr(), a.ptr());
        assert_eq!(mb.allocated(), 2);
        drop((a, b));
        let _c = mb.get(&dev, &g).unwrap();
        assert_eq!(mb.allocated(), 3);
        // t = 3 tokens of hidden 16: member 1's slot right after member 0's; set 1 after
        // all of set 0's room.
        let part = 3 * 16 * 4;
        assert_eq!(mb.slot_offset(2, MailSet::Attention, 1, part), part);
        assert_eq!(
            mb.slot_offset(2, MailSet::Mlp, 0, part),
            2 * mb.slot_bytes()
        );
        assert!(
            mb.slot_offset(2, MailSet::Attention, 1, mb.slot_bytes()) + mb.slot_bytes()
                <= mb.slot_offset(2, MailSet::Mlp, 0, part)
        );
    }

    /// A worker keeps the mailbox of a group while it exchanges in it, and lets go of a
    /// group's after a step without it (the last holder's drop frees it).
    #[test]
    fn a_worker_lets_go_of_unused_groups() {
        let dev = EmuDevice::on_gpu(0);
        let mb = Mailboxes::new(8);
        let (old, new) = ([WorkerId(0), WorkerId(1)], [WorkerId(0), WorkerId(2)]);
        let mut held = HeldMailboxes::default();
        let a = held.get(&mb, || Ok(&dev as &dyn Device), &old, 5).unwrap();
        // a switch: both groups in steps 6 and 7, then only the new one
        for step in [6, 7] {
            assert_eq!(
                held.get(&mb, || Ok(&dev as &dyn Device), &old, step)
                    .unwrap()
                    .ptr(),
                a.ptr()
            );
            held.get(&mb, || Ok(&dev as &dyn Device), &new, step)
                .unwrap();
        }
        let weak = Arc::downgrade(&a);
        drop(a);
        held.get(&mb, || Ok(&dev as &dyn Device), &new, 8).unwrap();
        assert_eq!(held.len(), 2, "the old group was used in the step before");
        held.get(&mb, || Ok(&dev as &dyn Device), &new, 9).unwrap();
        assert_eq!(held.len(), 1);
        assert!(
            weak.upgrade().is_none(),
            "nobody holds the old group's mailbox"
        );
        assert_eq!(mb.allocated(), 2);
    }
}

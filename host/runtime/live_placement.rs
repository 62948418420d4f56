//! The placement as the running engine sees it: one slot per segment (embedding, each
//! layer, LM head) holding its current group and, during a reconfiguration, a *pending*
//! new group whose shards the copy workers are preparing.
//!
//! Every worker asks the slot which group runs a segment in a given step
//! ([`LivePlacement::group_for`]). The answer is decided once per (step, segment) and is
//! the same for everyone:
//! - with nothing pending, the first asker decides "the current group";
//! - with something pending, only the segment's *decider* decides — the lead (member 0)
//!   of the group that ran the previous segment in this step, right after running it, or
//!   the driver for the embedding at step start — and it flips to the new group if the
//!   copies are done ([`LivePlacement::set_ready`]); everybody else waits for it.
//!
//! So a layer flips mid-step, right after the layer before it ran, as soon as its data is
//! in place: a switch is not paced by one flip per step. A flip never leaves the
//! placement invalid — every slot always names one complete group.

use crate::error::{Error, Result};
use crate::parallel::placement::Group as G;
use crate::parallel::{Group, LayerId, Placement, Segment};
use crate::reshard::planner::Transfer;
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// What a worker must do when a segment flips: the KV transfers (their regions are KV
/// head ranges) re-run for the positions appended since the pre-copy.
#[derive(Debug)]
pub struct FlipInfo {
    pub old: Group,
    pub new: Group,
    pub kv_transfers: Vec<Transfer>,
    /// Per sequence id: positions whose KV the pre-copy already moved.
    pub precopied: HashMap<u64, usize>,
    /// Reconfiguration this flip belongs to (tags its messages).
    pub job: u64,
    /// Test hook ([`crate::reshard::executor::ReconfigOptions::fail_flip_at`]): this
    /// worker fails the step instead of flipping.
    #[doc(hidden)] // test hook, not part of the serving API
    pub fail_on: Option<crate::parallel::WorkerId>,
}

#[derive(Debug)]
pub struct Decision {
    pub group: Group,
    pub flip: Option<Arc<FlipInfo>>,
}

struct Pending {
    info: Arc<FlipInfo>,
    ready: bool,
}

struct SlotState {
    current: Group,
    pending: Option<Pending>,
    decided_step: Option<u64>,
    decision: Arc<Decision>,
}

struct Slot {
    st: Mutex<SlotState>,
    cv: Condvar,
}

/// Called by the decider when a segment flips (the reconfiguration controller).
pub type FlipHook = Box<dyn Fn(Segment, u64) + Send + Sync>;

pub struct LivePlacement {
    num_layers: usize,
    slots: Vec<Slot>,
    timeout: Duration,
    on_flip: Mutex<Option<Arc<FlipHook>>>,
}

impl LivePlacement {
    pub fn new(p: &Placement, timeout: Duration) -> Self {
        let slots = p
            .segments()
            .map(|s| {
                let g = p.group(s).clone();
                Slot {
                    st: Mutex::new(SlotState {
                        current: g.clone(),
                        pending: None,
                        decided_step: None,
                        decision: Arc::new(Decision {
                            group: g,
                            flip: None,
                        }),
                    }),
                    cv: Condvar::new(),
                }
            })
            .collect();
        LivePlacement {
            num_layers: p.num_layers(),
            slots,
            timeout,
            on_flip: Mutex::new(None),
        }
    }

    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    fn slot(&self, seg: Segment) -> &Slot {
        let i = match seg {
            Segment::Embed => 0,
            Segment::Layer(LayerId(l)) => 1 + l,
            Segment::Head => self.num_layers + 1,
        };
        &self.slots[i]
    }

    fn lock(&self, seg: Segment) -> Result<std::sync::MutexGuard<'_, SlotState>> {
        self.slot(seg)
            .st
            .lock()
            .map_err(|_| Error::Reconfig("placement slot poisoned".into()))
    }

    /// The current placement (every slot's current group).
    pub fn snapshot(&self) -> Placement {
        let cur = |s: Segment| -> G {
            self.lock(s)
                .map(|st| st.current.clone())
                .unwrap_or_else(|_| Group(Vec::new()))
        };
        Placement {
            embed: cur(Segment::Embed),
            layers: (0..self.num_layers)
                .map(|l| cur(Segment::Layer(LayerId(l))))
                .collect(),
            head: cur(Segment::Head),
        }
    }

    pub fn set_flip_hook(&self, hook: Option<Arc<FlipHook>>) {
        if let Ok(mut h) = self.on_flip.lock() {
            *h = hook;
        }
    }

    /// The group that runs `seg` in `step` (see the module docs for who decides).
    pub fn group_for(&self, step: u64, seg: Segment, decider: bool) -> Result<Arc<Decision>> {
        let slot = self.slot(seg);
        let mut st = self.lock(seg)?;
        loop {
            if st.decided_step == Some(step) {
                return Ok(st.decision.clone());
            }
            if st.pending.is_none() || decider {
                let flip = st.pending.as_ref().is_some_and(|p| p.ready);
                let decision = if flip {
                    let p = st
                        .pending
                        .take()
                        .ok_or_else(|| Error::Reconfig("lost".into()))?;
                    st.current = p.info.new.clone();
                    Decision {
                        group: st.current.clone(),
                        flip: Some(p.info),
                    }
                } else {
                    Decision {
                        group: st.current.clone(),
                        flip: None,
                    }
                };
                st.decision = Arc::new(decision);
                st.decided_step = Some(step);
                slot.cv.notify_all();
                let d = st.decision.clone();
                drop(st);
                if d.flip.is_some() {
                    let hook = self.on_flip.lock().ok().and_then(|h| h.clone());
                    if let Some(hook) = hook {
                        hook(seg, step);
                    }
                }
                return Ok(d);
            }
            let (g, t) = slot
                .cv
                .wait_timeout(st, self.timeout)
                .map_err(|_| Error::Reconfig("placement slot poisoned".into()))?;
            st = g;
            if t.timed_out() && st.decided_step != Some(step) {
                // This step fails here. Settle it as "no flip" before giving up: a late
                // decider (a slow peer still running the step) must not flip a segment
                // that this worker — and whoever else gave up — never flipped, or shards
                // and placement would disagree. The switch flips it in a later step.
                st.decision = Arc::new(Decision {
                    group: st.current.clone(),
                    flip: None,
                });
                st.decided_step = Some(step);
                slot.cv.notify_all();
                return Err(Error::Reconfig(format!(
                    "step {step}: no decision for {seg} within {:?}",
                    self.timeout
                )));
            }
        }
    }

    /// A worker failed `step`: every segment not decided in it yet is settled as "no
    /// flip", so a slow decider still running the step cannot flip a segment that the
    /// workers who gave up will never flip (its shards and the placement would then
    /// disagree). Pending switches stay pending and flip in a later step.
    pub fn abandon(&self, step: u64) {
        for slot in &self.slots {
            let Ok(mut st) = slot.st.lock() else { continue };
            if st.decided_step != Some(step) {
                st.decision = Arc::new(Decision {
                    group: st.current.clone(),
                    flip: None,
                });
                st.decided_step = Some(step);
                slot.cv.notify_all();
            }
        }
    }

    /// Registers a pending new group for `seg`; its copies start now.
    pub fn register(&self, seg: Segment, info: Arc<FlipInfo>) -> Result<()> {
        let mut st = self.lock(seg)?;
        if st.pending.is_some() {
            return Err(Error::Reconfig(format!(
                "{seg} already has a pending switch"
            )));
        }
        st.pending = Some(Pending { info, ready: false });
        Ok(())
    }

    /// Marks `seg`'s pending switch ready to flip (its data is in place).
    pub fn set_ready(&self, seg: Segment) -> Result<()> {
        let mut st = self.lock(seg)?;
        if let Some(p) = st.pending.as_mut() {
            p.ready = true;
        }
        Ok(())
    }

    /// Withdraws `seg`'s pending switch if it has not flipped; returns whether it did.
    pub fn cancel_pending(&self, seg: Segment) -> bool {
        self.lock(seg)
            .map(|mut st| st.pending.take().is_some())
            .unwrap_or(false)
    }

    pub fn has_pending(&self) -> bool {
        self.slots
            .iter()
            .any(|s| s.st.lock().map(|st| st.pending.is_some()).unwrap_or(false))
    }

    /// Whether every pending switch is ready (used by stop-the-world before resuming).
    pub fn all_ready(&self) -> bool {
        self.slots.iter().all(|s| {
            s.st.lock()
                .map(|st| st.pending.as_ref().is_none_or(|p| p.ready))
                .unwrap_or(false)
        })
    }
}

//! The communication layer: every byte that moves between workers (all-reduce partials,
//! hidden-state hand-offs between pipeline stages, logits gathered to the driver,
//! reshard transfers) goes through a [`Comm`] endpoint and is counted here.
//!
//! The CPU fabric is a full mesh of FIFO channels, one per ordered pair of endpoints and
//! per [`Lane`] (compute traffic and copy traffic never queue behind each other, like a
//! compute stream and a copy stream). Endpoints `0..n` are workers; endpoint `n` is the
//! driver (the engine's thread, which samples from the gathered logits). Messages carry a
//! [`Tag`] so a protocol slip is an error, not silent garbage; compute messages carry
//! their step, so what a slow peer sends for a step the receiver already gave up on is
//! dropped rather than read as the next step's data.
//!
//! A message holds host floats, or — between device workers on one device (the same-
//! device transport) — a device buffer whose ownership moves with the message: the
//! sender copies into a fresh buffer and hands it over, so no worker's own memory is
//! ever another's, and its bytes are counted like any other message's. The one
//! exception to sole ownership is [`Comm::send_shared`]: an all-reduce partial sent to
//! every peer of a group as one read-only buffer, which each receiver copies into its
//! own memory (counted once per receiver); reshard pieces and hand-offs always move.
//! On decode-sized steps the same-device all-reduce goes through the group's mailbox
//! (`crate::backend::device::mailbox`): memory of this layer's, not of any worker, in
//! which each member leaves its partial for the others to read; the message is then
//! [`Comm::send_posted`]'s notice, an event and the bytes, counted per receiver as a
//! buffer sent to each would be.

use crate::backend::device::{Buf, Event};
use crate::error::{Error, Result};
use crate::parallel::WorkerId;
use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a message is, checked by the receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tag {
    /// A tensor-parallel partial (or shared buffer) of step `n`.
    AllReduce(u64),
    /// A hidden state handed to the next pipeline stage in step `n`.
    Handoff(u64),
    /// A head member's logits of step `n`, to the driver.
    Logits(u64),
    /// Data of reconfiguration job `n`.
    Reshard(u64),
    /// A failed reshard sender tells its receivers to give up on job `n`.
    ReshardAbort(u64),
}

impl Tag {
    /// The reconfiguration job a reshard message belongs to.
    pub fn reshard_job(self) -> Option<u64> {
        match self {
            Tag::Reshard(n) | Tag::ReshardAbort(n) => Some(n),
            _ => None,
        }
    }

    /// The step a compute message belongs to.
    pub fn step(self) -> Option<u64> {
        match self {
            Tag::AllReduce(n) | Tag::Handoff(n) | Tag::Logits(n) => Some(n),
            _ => None,
        }
    }

    /// Whether a queued `m` is left over from before what `self` waits for: a reshard
    /// message of an older job, or a compute message of an older step.
    fn superseded_by(m: Tag, awaited: Tag) -> bool {
        match (awaited, m) {
            (Tag::Reshard(n), m) => m.reshard_job().is_some_and(|j| j < n),
            (a, m) => matches!((a.step(), m.step()), (Some(s), Some(x)) if x < s),
        }
    }
}

/// Traffic classes, counted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Compute,
    Copy,
}

enum Payload {
    Host(Vec<f32>),
    Device(Buf),
    /// One device buffer sent to several endpoints, each of which only reads it (the
    /// same-device all-reduce's partial: one copy for the whole group, not one per
    /// peer). Freed, stream-ordered, when the last receiver drops it.
    Shared(Arc<Buf>),
    /// Bytes a collective (NCCL across GPUs) moved, or is about to move, from the sender
    /// to the receiver: the notice that counts them and checks the protocol.
    Wire(u64),
    /// Bytes the sender left in its slot of the group's same-device mailbox, written
    /// once the event's point of its stream is reached.
    Posted(Event, u64),
}

struct Msg {
    tag: Tag,
    data: Payload,
}

impl Msg {
    /// Bytes of the device buffer it carries (0 for host data).
    fn dev_bytes(&self) -> usize {
        match &self.data {
            Payload::Device(b) => b.len(),
            Payload::Shared(b) => b.len(),
            // (a mailbox is not the message's to free)
            Payload::Host(_) | Payload::Wire(_) | Payload::Posted(..) => 0,
        }
    }
}

/// What [`Comm::drain_where`] dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drained {
    pub msgs: usize,
    /// Bytes of the device buffers among them (same-device transport).
    pub dev_bytes: usize,
}

/// Bytes moved, per ordered pair of endpoints and per lane.
pub struct CommStats {
    n: usize,
    bytes: Vec<AtomicU64>,
    reshard: AtomicU64,
    collective: AtomicU64,
}

impl CommStats {
    fn new(n: usize) -> Self {
        CommStats {
            n,
            bytes: (0..n * n * 2).map(|_| AtomicU64::new(0)).collect(),
            reshard: AtomicU64::new(0),
            collective: AtomicU64::new(0),
        }
    }

    fn slot(&self, lane: Lane, from: usize, to: usize) -> &AtomicU64 {
        let l = match lane {
            Lane::Compute => 0,
            Lane::Copy => 1,
        };
        &self.bytes[(l * self.n + from) * self.n + to]
    }

    /// Bytes sent on `lane` from endpoint `from` to `to`.
    pub fn between(&self, lane: Lane, from: usize, to: usize) -> u64 {
        self.slot(lane, from, to).load(Ordering::Relaxed)
    }

    /// Bytes of reshard traffic (weights and KV moved by reconfigurations), any lane.
    pub fn reshard_bytes(&self) -> u64 {
        self.reshard.load(Ordering::Relaxed)
    }

    /// Bytes moved by collectives (NCCL between GPUs), any lane: counted in the pairs'
    /// totals too, through their notices ([`Comm::send_wire`]).
    pub fn collective_bytes(&self) -> u64 {
        self.collective.load(Ordering::Relaxed)
    }

    /// Bytes sent on `lane` in total.
    pub fn total(&self, lane: Lane) -> u64 {
        (0..self.n)
            .flat_map(|a| (0..self.n).map(move |b| (a, b)))
            .map(|(a, b)| self.between(lane, a, b))
            .sum()
    }
}

/// One endpoint's view of one lane of the fabric. Owned by exactly one thread.
pub struct Comm {
    me: usize,
    lane: Lane,
    to: Vec<Sender<Msg>>,
    from: Vec<Receiver<Msg>>,
    /// Per source: messages already taken off the channel by a selective drain and kept,
    /// in arrival order; read before the channel. (`RefCell`: one owning thread.)
    stash: Vec<RefCell<VecDeque<Msg>>>,
    /// Device bytes of reshard messages the receives dropped (stale or mismatched) since
    /// the last [`Comm::take_dropped_bytes`]: their senders counted them in the memory
    /// meter, so the owner frees them.
    dropped: Cell<usize>,
    stats: Arc<CommStats>,
    timeout: Duration,
}

/// Builds the mesh: returns, per lane, one [`Comm`] per endpoint (`n_workers + 1`, the
/// last is the driver), and the shared counters.
pub fn fabric(n_workers: usize, timeout: Duration) -> (Vec<Comm>, Vec<Comm>, Arc<CommStats>) {
    let n = n_workers + 1;
    let stats = Arc::new(CommStats::new(n));
    let make = |lane| {
        let mut senders: Vec<Vec<Sender<Msg>>> = (0..n).map(|_| Vec::new()).collect();
        let mut receivers: Vec<Vec<Receiver<Msg>>> = (0..n).map(|_| Vec::new()).collect();
        // Channel (a -> b): sender kept by a, receiver kept by b at index a.
        for s in senders.iter_mut() {
            for r in receivers.iter_mut() {
                let (tx, rx) = unbounded();
                s.push(tx);
                r.push(rx);
            }
        }
        senders
            .into_iter()
            .zip(receivers)
            .enumerate()
            .map(|(me, (to, from))| Comm {
                me,
                lane,
                to,
                stash: from.iter().map(|_| RefCell::new(VecDeque::new())).collect(),
                from,
                dropped: Cell::new(0),
                stats: stats.clone(),
                timeout,
            })
            .collect::<Vec<_>>()
    };
    let compute = make(Lane::Compute);
    let copy = make(Lane::Copy);
    (compute, copy, stats)
}

impl Comm {
    pub fn me(&self) -> usize {
        self.me
    }

    /// The driver's endpoint index.
    pub fn driver(&self) -> usize {
        self.to.len() - 1
    }

    pub fn stats(&self) -> &Arc<CommStats> {
        &self.stats
    }

    /// How long a receive waits before it fails.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn send(&self, to: usize, tag: Tag, data: Vec<f32>) -> Result<()> {
        let bytes = (data.len() * std::mem::size_of::<f32>()) as u64;
        self.post(to, tag, Payload::Host(data), bytes)
    }

    /// Hands device buffer `buf` to endpoint `to` (same-device transport); counts its
    /// length. The sender must not use it after this (it no longer can: it is moved).
    pub fn send_buf(&self, to: usize, tag: Tag, buf: Buf) -> Result<()> {
        let bytes = buf.len() as u64;
        self.post(to, tag, Payload::Device(buf), bytes)
    }

    /// Sends a device buffer that `to` (and whoever else gets a clone of `buf`) only reads,
    /// without a copy per receiver; counted per receiver as [`Comm::send_buf`] counts.
    pub fn send_shared(&self, to: usize, tag: Tag, buf: Arc<Buf>) -> Result<()> {
        let bytes = buf.len() as u64;
        self.post(to, tag, Payload::Shared(buf), bytes)
    }

    /// Tells endpoint `to` that a collective on another transport (NCCL between GPUs)
    /// moves `bytes` bytes to it for `tag`, and counts them: the bytes themselves never
    /// pass through here, but every one is counted and the receiver checks the tag.
    pub fn send_wire(&self, to: usize, tag: Tag, bytes: u64) -> Result<()> {
        self.post(to, tag, Payload::Wire(bytes), bytes)
    }

    /// Tells endpoint `to`, on the same device, that `bytes` bytes for `tag` wait in
    /// this endpoint's slot of their group's mailbox once `ready` is reached (see
    /// `crate::backend::device::mailbox`), and counts them as a buffer sent to it would
    /// be counted.
    pub fn send_posted(&self, to: usize, tag: Tag, ready: Event, bytes: u64) -> Result<()> {
        self.post(to, tag, Payload::Posted(ready, bytes), bytes)
    }

    fn post(&self, to: usize, tag: Tag, data: Payload, bytes: u64) -> Result<()> {
        let wire = matches!(data, Payload::Wire(_));
        self.to[to].send(Msg { tag, data }).map_err(|_| {
            Error::Comm(format!(
                "endpoint {to} is gone ({:?} from {})",
                tag, self.me
            ))
        })?;
        self.stats
            .slot(self.lane, self.me, to)
            .fetch_add(bytes, Ordering::Relaxed);
        if matches!(tag, Tag::Reshard(_)) {
            self.stats.reshard.fetch_add(bytes, Ordering::Relaxed);
        }
        if wire {
            self.stats.collective.fetch_add(bytes, Ordering::Relaxed);
        }
        Ok(())
    }

    pub fn recv(&self, from: usize, tag: Tag) -> Result<Vec<f32>> {
        match self.take(from, tag)? {
            Payload::Host(v) => Ok(v),
            data => Err(self.unexpected("host data", from, Msg { tag, data })),
        }
    }

    /// Receives a device buffer sent with [`Comm::send_buf`].
    pub fn recv_buf(&self, from: usize, tag: Tag) -> Result<Buf> {
        match self.take(from, tag)? {
            Payload::Device(b) => Ok(b),
            data => Err(self.unexpected("a device buffer", from, Msg { tag, data })),
        }
    }

    /// Receives a device buffer sent with [`Comm::send_shared`] (or [`Comm::send_buf`]),
    /// to read.
    pub fn recv_shared(&self, from: usize, tag: Tag) -> Result<Arc<Buf>> {
        match self.take(from, tag)? {
            Payload::Shared(b) => Ok(b),
            Payload::Device(b) => Ok(Arc::new(b)),
            data => Err(self.unexpected("a device buffer", from, Msg { tag, data })),
        }
    }

    /// Receives a notice sent with [`Comm::send_wire`]: the bytes the collective moves.
    pub fn recv_wire(&self, from: usize, tag: Tag) -> Result<u64> {
        match self.take(from, tag)? {
            Payload::Wire(n) => Ok(n),
            data => Err(self.unexpected("a collective's notice", from, Msg { tag, data })),
        }
    }

    /// Receives a notice sent with [`Comm::send_posted`]: the event after which the
    /// sender's slot holds its bytes, and how many bytes.
    pub fn recv_posted(&self, from: usize, tag: Tag) -> Result<(Event, u64)> {
        match self.take(from, tag)? {
            Payload::Posted(e, n) => Ok((e, n)),
            data => Err(self.unexpected("a mailbox notice", from, Msg { tag, data })),
        }
    }

    /// A message of the wrong form: dropped (its device bytes remembered, as for any
    /// dropped reshard piece), and the error that names both forms.
    fn unexpected(&self, wanted: &str, from: usize, m: Msg) -> Error {
        let got = match &m.data {
            Payload::Host(_) => "host data",
            Payload::Device(_) => "a device buffer",
            Payload::Shared(_) => "a shared device buffer",
            Payload::Wire(_) => "a collective's notice",
            Payload::Posted(..) => "a mailbox notice",
        };
        let tag = m.tag;
        self.drop_msg(m);
        Error::Comm(format!(
            "endpoint {} expected {wanted} ({tag:?}) from {from}, got {got}",
            self.me
        ))
    }

    /// The next message from `from`, which must be tagged `tag`. Waiting for reshard job
    /// `n`, messages of older jobs (left by an aborted switch whose discard has not
    /// reached them) are dropped rather than failing the new job; waiting for a compute
    /// message of step `s`, compute messages of older steps (sent by a peer still running
    /// a step this endpoint had failed) are dropped likewise. Any other tag (a newer step
    /// or job, another kind) is a protocol error. The timeout covers the whole wait.
    fn take(&self, from: usize, tag: Tag) -> Result<Payload> {
        let deadline = Instant::now() + self.timeout;
        let stash = self
            .stash
            .get(from)
            .ok_or_else(|| Error::Comm(format!("no endpoint {from}")))?;
        loop {
            let next = stash.borrow_mut().pop_front();
            let m = match next {
                Some(m) => m,
                None => match self.from[from].recv_deadline(deadline) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => {
                        return Err(Error::Comm(format!(
                            "endpoint {} waited {:?} for {:?} from {from}",
                            self.me, self.timeout, tag
                        )))
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        return Err(Error::Comm(format!("endpoint {from} is gone")))
                    }
                },
            };
            if m.tag == tag {
                return Ok(m.data);
            }
            let stale = Tag::superseded_by(m.tag, tag);
            let got = m.tag;
            self.drop_msg(m);
            if !stale {
                return Err(Error::Comm(format!(
                    "endpoint {} expected {:?} from {from}, got {:?}",
                    self.me, tag, got
                )));
            }
        }
    }

    /// Drops a received message that will not be used, remembering the device bytes of a
    /// reshard piece (counted by its sender) for [`Comm::take_dropped_bytes`]. Compute
    /// messages' device buffers are activations, outside the memory meter.
    fn drop_msg(&self, m: Msg) {
        if m.tag.reshard_job().is_some() {
            self.dropped.set(self.dropped.get() + m.dev_bytes());
        }
    }

    /// Device bytes of reshard pieces that receives on this endpoint dropped (stale
    /// messages of older jobs, mismatches) since the last call; resets the count.
    pub fn take_dropped_bytes(&self) -> usize {
        self.dropped.replace(0)
    }

    /// Sum of `buf` over `group` (which contains this endpoint) in step `step`, added in
    /// group order so every member gets bit-identical results whatever the arrival order.
    pub fn all_reduce_sum(&self, group: &[WorkerId], step: u64, buf: &mut [f32]) -> Result<()> {
        if group.len() <= 1 {
            return Ok(());
        }
        for w in group {
            if w.0 != self.me {
                self.send(w.0, Tag::AllReduce(step), buf.to_vec())?;
            }
        }
        let mut acc = vec![0.0f32; buf.len()];
        for w in group {
            if w.0 == self.me {
                add_into(&mut acc, buf);
            } else {
                let part = self.recv(w.0, Tag::AllReduce(step))?;
                if part.len() != buf.len() {
                    return Err(Error::Comm(format!(
                        "all-reduce size mismatch: {} vs {}",
                        part.len(),
                        buf.len()
                    )));
                }
                add_into(&mut acc, &part);
            }
        }
        buf.copy_from_slice(&acc);
        Ok(())
    }

    /// Drops every queued message. Only safe where no peer can still send anything this
    /// endpoint will want (a late message of the dropped kind may also still come: see
    /// [`Comm::drop_steps_before`] and the stale-message rule of the receives).
    pub fn drain(&self) {
        for (r, stash) in self.from.iter().zip(&self.stash) {
            stash.borrow_mut().clear();
            while r.try_recv().is_ok() {}
        }
    }

    /// Waits, up to the timeout, until a message whose tag matches `pred` is queued from
    /// any endpoint (kept for the receives, in order); false if none came. (Test hooks
    /// use it to force an interleaving.)
    #[doc(hidden)] // test hook, not part of the serving API
    pub fn wait_queued(&self, pred: impl Fn(Tag) -> bool) -> bool {
        let deadline = Instant::now() + self.timeout;
        loop {
            for (r, stash) in self.from.iter().zip(&self.stash) {
                stash.borrow_mut().extend(r.try_iter());
            }
            if self
                .stash
                .iter()
                .any(|s| s.borrow().iter().any(|m| pred(m.tag)))
            {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Drops the queued compute messages of steps before `step` (left by a failed step:
    /// its parts that arrived after the receiver gave up), keeping everything else in
    /// order. Their device buffers are activations, not counted in the memory meter.
    pub fn drop_steps_before(&self, step: u64) -> Drained {
        self.drain_where(|t| t.step().is_some_and(|s| s < step))
    }

    /// Drops the queued messages whose tag matches `pred` (those of an aborted reshard
    /// job, say) and keeps every other one, in order, for the next receives: unlike
    /// [`Comm::drain`] it cannot lose what a peer already sent for the next job.
    pub fn drain_where(&self, pred: impl Fn(Tag) -> bool) -> Drained {
        let mut out = Drained::default();
        for (r, stash) in self.from.iter().zip(&self.stash) {
            let mut stash = stash.borrow_mut();
            let queued: Vec<Msg> = stash.drain(..).chain(r.try_iter()).collect();
            for m in queued {
                if pred(m.tag) {
                    out.msgs += 1;
                    out.dev_bytes += m.dev_bytes();
                } else {
                    stash.push_back(m);
                }
            }
        }
        out
    }
}

fn add_into(acc: &mut [f32], x: &[f32]) {
    for (a, b) in acc.iter_mut().zip(x) {
        *a += *b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_reduce_counts_and_sums_in_order() {
        let (compute, _, stats) = fabric(3, Duration::from_secs(5));
        let group = vec![WorkerId(0), WorkerId(1), WorkerId(2)];
        let handles: Vec<_> = compute
            .into_iter()
            .take(3)
            .map(|c| {
                let g = group.clone();
                std::thread::spawn(move || {
                    let mut v = vec![c.me() as f32 + 0.5; 4];
                    c.all_reduce_sum(&g, 7, &mut v).unwrap();
                    v
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), vec![0.5 + 1.5 + 2.5; 4]);
        }
        // Each of 3 members sends 4 floats to 2 peers.
        assert_eq!(stats.total(Lane::Compute), 3 * 2 * 16);
        assert_eq!(stats.between(Lane::Compute, 0, 1), 16);
        assert_eq!(stats.total(Lane::Copy), 0);
    }

    #[test]
    fn tag_mismatch_is_an_error() {
        let (compute, _, _) = fabric(1, Duration::from_millis(50));
        let c = &compute[0];
        c.send(1, Tag::Handoff(1), vec![1.0]).unwrap();
        assert!(compute[1].recv(0, Tag::Logits(1)).is_err());
        assert!(compute[1].recv(0, Tag::Logits(1)).is_err(), "times out");
    }

    #[test]
    fn device_buffers_move_counted_and_typed() {
        use crate::backend::device::{emu::EmuDevice, Device};
        let (compute, _, stats) = fabric(2, Duration::from_millis(50));
        let b = EmuDevice::new().alloc(96).unwrap();
        let p = b.ptr();
        compute[0].send_buf(1, Tag::Handoff(1), b).unwrap();
        let got = compute[1].recv_buf(0, Tag::Handoff(1)).unwrap();
        assert_eq!(
            (got.ptr(), got.len()),
            (p, 96),
            "the same allocation, moved"
        );
        assert_eq!(stats.between(Lane::Compute, 0, 1), 96);
        // a host message where a buffer is expected (and the reverse) is an error
        compute[0].send(1, Tag::Handoff(1), vec![1.0]).unwrap();
        assert!(compute[1].recv_buf(0, Tag::Handoff(1)).is_err());
        compute[0]
            .send_buf(1, Tag::Handoff(1), EmuDevice::new().alloc(4).unwrap())
            .unwrap();
        assert!(compute[1].recv(0, Tag::Handoff(1)).is_err());
    }

    /// One buffer shared with two peers: each receives the same allocation, each
    /// receipt is counted (as two sends of it would be), and the memory lives until the
    /// last holder drops it. A shared buffer is not an owned one (`recv_buf` refuses it).
    #[test]
    fn shared_device_buffers_are_counted_per_receiver() {
        use crate::backend::device::{emu::EmuDevice, Device};
        let (compute, _, stats) = fabric(3, Duration::from_millis(50));
        let b = Arc::new(EmuDevice::new().alloc(64).unwrap());
        let p = b.ptr();
        for to in [1, 2] {
            compute[0]
                .send_shared(to, Tag::AllReduce(3), b.clone())
                .unwrap();
        }
        drop(b);
        let got1 = compute[1].recv_shared(0, Tag::AllReduce(3)).unwrap();
        let got2 = compute[2].recv_shared(0, Tag::AllReduce(3)).unwrap();
        assert_eq!((got1.ptr(), got2.ptr(), got1.len()), (p, p, 64));
        assert_eq!(Arc::strong_count(&got1), 2, "the two receivers hold it");
        assert_eq!(stats.between(Lane::Compute, 0, 1), 64);
        assert_eq!(stats.between(Lane::Compute, 0, 2), 64);
        assert_eq!(stats.total(Lane::Compute), 128);
        compute[0]
            .send_shared(1, Tag::AllReduce(4), got2.clone())
            .unwrap();
        let err = compute[1]
            .recv_buf(0, Tag::AllReduce(4))
            .err()
            .expect("refused");
        assert!(err.to_string().contains("shared device buffer"), "{err}");
        // and an owned buffer can be read as a shared one
        compute[0]
            .send_buf(1, Tag::AllReduce(5), EmuDevice::new().alloc(8).unwrap())
            .unwrap();
        assert_eq!(
            compute[1].recv_shared(0, Tag::AllReduce(5)).unwrap().len(),
            8
        );
    }

    /// A mailbox notice counts its bytes per receiver like a sent buffer (nothing moves
    /// through the channel but the event), is not collective traffic, and a receive
    /// expecting another form refuses it by name.
    #[test]
    fn mailbox_notices_are_counted_per_receiver() {
        use crate::backend::device::{emu::EmuDevice, Device};
        let (compute, _, stats) = fabric(3, Duration::from_millis(50));
        let dev = EmuDevice::new();
        let ev = dev.record().unwrap();
        for to in [1, 2] {
            compute[0]
                .send_posted(to, Tag::AllReduce(7), ev.clone(), 96)
                .unwrap();
        }
        let (_, n) = compute[2].recv_posted(0, Tag::AllReduce(7)).unwrap();
        assert_eq!(n, 96);
        assert_eq!(stats.between(Lane::Compute, 0, 1), 96);
        assert_eq!(stats.between(Lane::Compute, 0, 2), 96);
        assert_eq!(stats.collective_bytes(), 0);
        let err = compute[1]
            .recv_shared(0, Tag::AllReduce(7))
            .err()
            .expect("refused");
        assert!(err.to_string().contains("mailbox notice"), "{err}");
        // a dropped reshard-tagged notice gives back no device bytes (the mailbox is not
        // the message's to free), where a dropped buffer would
        compute[0]
            .send_posted(1, Tag::Reshard(1), ev.clone(), 96)
            .unwrap();
        let dropped = compute[1].drain_where(|t| t.reshard_job().is_some());
        assert_eq!(dropped.dev_bytes, 0);
    }

    #[test]
    fn selective_drain_keeps_other_messages_in_order() {
        use crate::backend::device::{emu::EmuDevice, Device};
        let (_, copy, _) = fabric(3, Duration::from_millis(50));
        let emu = EmuDevice::new();
        let (a, b, w) = (&copy[0], &copy[2], &copy[1]);
        a.send(1, Tag::Reshard(1), vec![1.0]).unwrap();
        a.send(1, Tag::Reshard(2), vec![2.0]).unwrap();
        a.send(1, Tag::ReshardAbort(1), Vec::new()).unwrap();
        a.send_buf(1, Tag::Reshard(2), emu.alloc(32).unwrap())
            .unwrap();
        a.send_buf(1, Tag::Reshard(1), emu.alloc(64).unwrap())
            .unwrap();
        b.send(1, Tag::Reshard(1), vec![9.0]).unwrap();
        b.send(1, Tag::Reshard(2), vec![3.0]).unwrap();
        let d = w.drain_where(|t| t.reshard_job() == Some(1));
        assert_eq!(
            d,
            Drained {
                msgs: 4,
                dev_bytes: 64
            }
        );
        // Sent after the drain: queued behind what it kept.
        a.send(1, Tag::Reshard(2), vec![4.0]).unwrap();
        assert_eq!(w.recv(0, Tag::Reshard(2)).unwrap(), vec![2.0]);
        assert_eq!(w.recv_buf(0, Tag::Reshard(2)).unwrap().len(), 32);
        assert_eq!(w.recv(0, Tag::Reshard(2)).unwrap(), vec![4.0]);
        assert_eq!(w.recv(2, Tag::Reshard(2)).unwrap(), vec![3.0]);
        assert!(
            w.recv(0, Tag::Reshard(2)).is_err(),
            "nothing left: times out"
        );
        assert_eq!(w.take_dropped_bytes(), 0);
        // A full drain clears what a selective one kept too.
        a.send(1, Tag::Reshard(3), vec![5.0]).unwrap();
        w.drain_where(|_| false);
        w.drain();
        assert!(w.recv(0, Tag::Reshard(3)).is_err());
    }

    #[test]
    fn stale_reshard_messages_are_skipped_and_accounted() {
        use crate::backend::device::{emu::EmuDevice, Device};
        let (compute, copy, _) = fabric(2, Duration::from_millis(50));
        let emu = EmuDevice::new();
        let (a, w) = (&copy[0], &copy[1]);
        a.send_buf(1, Tag::Reshard(1), emu.alloc(64).unwrap())
            .unwrap();
        a.send(1, Tag::ReshardAbort(1), Vec::new()).unwrap();
        a.send_buf(1, Tag::Reshard(2), emu.alloc(16).unwrap())
            .unwrap();
        a.send(1, Tag::Reshard(3), vec![7.0]).unwrap();
        // Waiting for job 3: jobs 1 and 2 are stale, their device bytes reported once.
        assert_eq!(w.recv(0, Tag::Reshard(3)).unwrap(), vec![7.0]);
        assert_eq!(w.take_dropped_bytes(), 80);
        assert_eq!(w.take_dropped_bytes(), 0);
        // A newer job's message is not stale: a protocol error, like an abort of the
        // awaited job.
        a.send(1, Tag::Reshard(5), vec![1.0]).unwrap();
        assert!(w.recv(0, Tag::Reshard(4)).is_err());
        a.send(1, Tag::ReshardAbort(4), Vec::new()).unwrap();
        assert!(w.recv(0, Tag::Reshard(4)).is_err());
        // Other tags stay strict, both ways.
        a.send(1, Tag::Handoff(1), vec![1.0]).unwrap();
        assert!(w.recv(0, Tag::Reshard(4)).is_err());
        let (c, cw) = (&compute[0], &compute[1]);
        c.send(1, Tag::Reshard(1), vec![1.0]).unwrap();
        c.send(1, Tag::AllReduce(1), vec![2.0]).unwrap();
        assert!(cw.recv(0, Tag::AllReduce(1)).is_err());
        assert_eq!(cw.recv(0, Tag::AllReduce(1)).unwrap(), vec![2.0]);
    }

    #[test]
    fn stale_step_messages_are_skipped_newer_ones_are_errors() {
        use crate::backend::device::{emu::EmuDevice, Device};
        let (compute, _, stats) = fabric(2, Duration::from_millis(50));
        let (a, w) = (&compute[0], &compute[1]);
        // What a slow peer sent for steps 3 and 4 after `w` gave up on them.
        a.send(1, Tag::AllReduce(3), vec![1.0]).unwrap();
        a.send_buf(1, Tag::AllReduce(4), EmuDevice::new().alloc(32).unwrap())
            .unwrap();
        a.send(1, Tag::Handoff(4), vec![2.0]).unwrap();
        a.send(1, Tag::AllReduce(5), vec![3.0]).unwrap();
        assert_eq!(w.recv(0, Tag::AllReduce(5)).unwrap(), vec![3.0]);
        // Activations: nothing for the memory meter.
        assert_eq!(w.take_dropped_bytes(), 0);
        // Every byte sent is counted, stale ones too.
        assert_eq!(stats.between(Lane::Compute, 0, 1), 4 + 32 + 4 + 4);
        // A newer step, or another kind of the same step, is a protocol error.
        a.send(1, Tag::AllReduce(6), vec![1.0]).unwrap();
        assert!(w.recv(0, Tag::AllReduce(5)).is_err());
        a.send(1, Tag::Handoff(6), vec![1.0]).unwrap();
        assert!(w.recv(0, Tag::AllReduce(6)).is_err());
        // Steps and reshard jobs are not compared with each other.
        a.send(1, Tag::Reshard(1), vec![1.0]).unwrap();
        assert!(w.recv(0, Tag::Logits(9)).is_err());
        a.send(1, Tag::Logits(1), vec![1.0]).unwrap();
        assert!(w.recv(0, Tag::Reshard(9)).is_err());
        // The sweep drops older steps only, keeping the rest in order.
        a.send(1, Tag::Handoff(7), vec![1.0]).unwrap();
        a.send(1, Tag::Reshard(2), vec![2.0]).unwrap();
        a.send(1, Tag::Handoff(8), vec![3.0]).unwrap();
        let d = w.drop_steps_before(8);
        assert_eq!(d.msgs, 1);
        assert_eq!(w.recv(0, Tag::Reshard(2)).unwrap(), vec![2.0]);
        assert_eq!(w.recv(0, Tag::Handoff(8)).unwrap(), vec![3.0]);
    }
}

//! Collectives between device workers on different GPUs: NCCL on CUDA ([`nccl`], the
//! library loaded at run time like the driver) and an emulated twin on the emulator
//! ([`emu`]) that keeps NCCL's matching and blocking rules, so the engine's multi-GPU
//! path runs in CI without a GPU.
//!
//! - A [`Communicator`] is one rank's handle on one communicator. The engine makes one
//!   world communicator over all workers ([`world`], one thread for all ranks) and splits
//!   it per group of a placement ([`split`], `ncclCommSplit`: color = the group's, key =
//!   the member's index, so a member's rank in the split is its index in the group; the
//!   colors come from [`crate::parallel::devices::comm_plan`]).
//! - [`Communicator::queue`] queues a list of [`CollOp`]s on a device handle's stream as
//!   one NCCL group (`ncclGroupStart` / `ncclGroupEnd`): the ops of a group progress
//!   together, so a group may send to and receive from the same peers. Outside a group,
//!   an op blocks its stream until its peers have posted their side (NCCL's rule, which
//!   the emulator enforces: two ranks that each send to the other first, ungrouped,
//!   deadlock on a GPU and fail with an error on the emulator).
//! - Collective ops on a communicator match by order (every member's k-th collective is
//!   the same op with the same size); point-to-point ops match per ordered pair in order.
//! - The communicators count nothing: every collective's bytes move under a notice
//!   through the counted [`crate::backend::comm::Comm`] layer (the engine's exchanges,
//!   and [`trade_pieces`] for piece trades), which also checks the protocol (tags,
//!   steps).
//!
//! Data layout: buffers are plain device bytes; an all-gather is in place, over `size`
//! consecutive slots of `bytes` bytes, slot `rank` holding this rank's contribution.

pub mod emu;
pub mod nccl;

use crate::backend::comm::{Comm, Tag};
use crate::backend::cuda::CudaDevice;
use crate::backend::device::{check_range, Buf, Device};
use crate::parallel::devices::{comm_plan, CommSplit, DeviceMap};
use crate::parallel::{Group, Placement, WorkerId};
use crate::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One rank's handle on one communicator.
pub struct Communicator {
    pub(crate) kind: Kind,
    rank: usize,
    size: usize,
}

pub(crate) enum Kind {
    Emu(emu::EmuComm),
    Nccl(nccl::NcclComm),
}

/// One operation of a group queued by [`Communicator::queue`].
#[derive(Clone, Copy)]
pub enum CollOp<'a> {
    /// In place over `size` slots of `bytes` bytes at the start of `buf`: slot `rank`
    /// holds this rank's data before; every slot `i` holds rank `i`'s after
    /// (`ncclAllGather` with the send buffer inside the receive buffer).
    AllGather { buf: &'a Buf, bytes: usize },
    /// `bytes` bytes from byte `off` of `buf` to rank `peer`.
    Send {
        buf: &'a Buf,
        off: usize,
        bytes: usize,
        peer: usize,
    },
    /// `bytes` bytes from rank `peer` into byte `off` of `buf`.
    Recv {
        buf: &'a Buf,
        off: usize,
        bytes: usize,
        peer: usize,
    },
}

impl std::fmt::Debug for Communicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            Kind::Emu(_) => "emulated",
            Kind::Nccl(_) => "nccl",
        };
        write!(
            f,
            "Communicator({kind}, rank {} of {})",
            self.rank, self.size
        )
    }
}

impl Communicator {
    pub(crate) fn new(kind: Kind, rank: usize, size: usize) -> Self {
        Communicator { kind, rank, size }
    }

    /// This handle's rank in the communicator.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the communicator.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Stops this handle's operations still on the device and refuses later ones
    /// (`ncclCommAbort`; on the emulator every rank's waiting ops fail at once): what
    /// frees a worker whose stream waits for a peer that failed before posting its side.
    pub fn abort(&self) {
        match &self.kind {
            Kind::Emu(c) => c.abort(),
            Kind::Nccl(c) => c.abort(),
        }
    }

    /// Queues `ops` as one group on `dev`'s stream, after the work already queued there
    /// (the host does not wait). `dev` must be this rank's device (the emulator for an
    /// emulated communicator, the GPU the rank was created on for NCCL). Ranges and
    /// peers are checked here; a mismatch with the peers' ops (sizes, kinds) surfaces at
    /// the stream's next synchronizing call on the emulator, and is undefined on NCCL.
    pub fn queue(&self, dev: &dyn Device, ops: &[CollOp]) -> Result<()> {
        for op in ops {
            self.check(op)?;
        }
        match &self.kind {
            Kind::Emu(c) => {
                let d = dev.as_emu().ok_or_else(|| {
                    Error::Device("an emulated communicator on a non-emulated device".into())
                })?;
                c.queue(d, ops)
            }
            Kind::Nccl(c) => {
                let d = dev.as_cuda().ok_or_else(|| {
                    Error::Device("an NCCL communicator on a non-CUDA device".into())
                })?;
                c.queue(d, ops)
            }
        }
    }

    fn check(&self, op: &CollOp) -> Result<()> {
        let peer_ok = |p: usize| {
            if p < self.size {
                Ok(())
            } else {
                Err(Error::Device(format!(
                    "peer {p} of a {}-rank communicator",
                    self.size
                )))
            }
        };
        match *op {
            CollOp::AllGather { buf, bytes } => {
                let total = bytes.checked_mul(self.size).ok_or_else(|| {
                    Error::Device(format!("all-gather of {bytes} B x {} ranks", self.size))
                })?;
                check_range(buf, 0, total, "all-gather")
            }
            CollOp::Send {
                buf,
                off,
                bytes,
                peer,
            }
            | CollOp::Recv {
                buf,
                off,
                bytes,
                peer,
            } => {
                peer_ok(peer)?;
                let what = if matches!(op, CollOp::Send { .. }) {
                    "send"
                } else {
                    "recv"
                };
                check_range(buf, off, bytes, what)
            }
        }
    }
}

/// World communicators over `devs` (rank `i` on `devs[i]`), made by one thread for all
/// ranks. Every handle must be of one kind: all emulated (then `timeout` bounds how long
/// an emulated op waits for its peers before it fails, where NCCL would hang) or all
/// CUDA (NCCL; an error naming the library when it cannot be loaded).
pub fn world(devs: &[&dyn Device], timeout: Duration) -> Result<Vec<Communicator>> {
    if devs.is_empty() {
        return Err(Error::Device(
            "a communicator needs at least one rank".into(),
        ));
    }
    if devs.iter().all(|d| d.as_emu().is_some()) {
        return Ok(emu::world(devs.len(), timeout));
    }
    let cuda: Option<Vec<&CudaDevice>> = devs.iter().map(|d| d.as_cuda()).collect();
    match cuda {
        Some(c) => nccl::world(&c),
        None => Err(Error::Device(
            "communicator ranks must all be CUDA devices or all emulated".into(),
        )),
    }
}

/// Splits communicator `parents` (rank `i`'s handle at `parents[i]`; every rank of it,
/// made by one thread): rank `i` joins the split of color `c` with key `k` when
/// `args[i]` is `Some((c, k))` (new ranks ordered by key, then by parent rank) and
/// gets `None` otherwise (`NCCL_SPLIT_NOCOLOR`).
pub fn split(
    parents: &[&Communicator],
    args: &[Option<(u32, u32)>],
) -> Result<Vec<Option<Communicator>>> {
    let n = parents.len();
    if n == 0 || args.len() != n {
        return Err(Error::Device(format!(
            "split of {n} handles with {} arguments",
            args.len()
        )));
    }
    for (i, p) in parents.iter().enumerate() {
        if p.rank != i || p.size != n {
            return Err(Error::Device(format!(
                "split: handle {i} is rank {} of {} (every rank of one communicator, in order)",
                p.rank, p.size
            )));
        }
    }
    if let Some((c, _)) = args.iter().flatten().find(|(c, _)| *c > i32::MAX as u32) {
        return Err(Error::Device(format!("split color {c} beyond i32")));
    }
    // Every handle of one kind, or none of that kind.
    fn all<'a, T>(
        parents: &[&'a Communicator],
        of: impl Fn(&'a Kind) -> Option<&'a T>,
    ) -> Option<Vec<&'a T>> {
        parents.iter().map(|p| of(&p.kind)).collect()
    }
    let emu = all(parents, |k| match k {
        Kind::Emu(c) => Some(c),
        Kind::Nccl(_) => None,
    });
    if let Some(e) = emu {
        return Ok(emu::split(&e, args));
    }
    let nccl = all(parents, |k| match k {
        Kind::Nccl(c) => Some(c),
        Kind::Emu(_) => None,
    });
    match nccl {
        Some(c) => nccl::split(&c, args),
        None => Err(Error::Device(
            "split: handles of one communicator must be of one kind".into(),
        )),
    }
}

/// Trades whole buffers with peers in ONE group on `c` (ranks = worker ids), queued on
/// `dev`'s stream: each `outgoing` buffer is sent whole to its worker and each
/// `incoming` one filled whole from its worker, in list order per peer (both sides list
/// a pair's pieces in the same order). The group is queued first; then a notice per
/// piece goes through `comm` (it counts the bytes, tagged `tag`), and the peers'
/// notices are received and checked against the buffers' sizes: what a reshard job and
/// a flip both do. An error before the group is queued leaves the peers' groups
/// waiting for this one: the caller must abort the communicators.
pub fn trade_pieces(
    comm: &Comm,
    c: &Communicator,
    dev: &dyn Device,
    tag: Tag,
    outgoing: &[(WorkerId, Buf)],
    incoming: &[(WorkerId, &Buf)],
) -> Result<()> {
    let mut ops = Vec::with_capacity(outgoing.len() + incoming.len());
    for (dst, b) in outgoing {
        ops.push(CollOp::Send {
            buf: b,
            off: 0,
            bytes: b.len(),
            peer: dst.0,
        });
    }
    for &(src, b) in incoming {
        ops.push(CollOp::Recv {
            buf: b,
            off: 0,
            bytes: b.len(),
            peer: src.0,
        });
    }
    if !ops.is_empty() {
        c.queue(dev, &ops)?;
    }
    for (dst, b) in outgoing {
        comm.send_wire(dst.0, tag, b.len() as u64)?;
    }
    for &(src, b) in incoming {
        let n = comm.recv_wire(src.0, tag)?;
        if n != b.len() as u64 {
            return Err(Error::Comm(format!(
                "piece from {src} of {n} B, expected {} B ({tag:?})",
                b.len()
            )));
        }
    }
    Ok(())
}

/// Orders `args`' members of one color as a split does: by key, then by parent rank.
/// Returns, per color in first-appearance order, the parent ranks in new-rank order.
pub(crate) fn split_members(args: &[Option<(u32, u32)>]) -> Vec<(u32, Vec<usize>)> {
    let mut colors: Vec<(u32, Vec<usize>)> = Vec::new();
    for (i, a) in args.iter().enumerate() {
        if let Some((c, _)) = a {
            match colors.iter_mut().find(|(cc, _)| cc == c) {
                Some((_, m)) => m.push(i),
                None => colors.push((*c, vec![i])),
            }
        }
    }
    for (_, m) in colors.iter_mut() {
        m.sort_by_key(|&i| (args[i].map_or(0, |(_, k)| k), i));
    }
    colors
}

/// Every worker's communicators, shared by the engine (which adds splits) and the
/// workers (each reads only its own handles). A worker's handle on a group's split is
/// its rank there (= its index in the group); `p2p` and `copy` are splits of every
/// worker, rank = worker id, for hand-offs (compute thread) and reshard pieces (copy
/// thread). The world handles stay with the engine, which splits from them between
/// steps.
#[derive(Default)]
pub struct CommBook {
    groups: Mutex<HashMap<(WorkerId, Group), Arc<Communicator>>>,
    p2p: Mutex<HashMap<WorkerId, Arc<Communicator>>>,
    copy: Mutex<HashMap<WorkerId, Arc<Communicator>>>,
    /// Why every communicator was aborted ([`CommBook::abort_all`]), if it was.
    aborted: Mutex<Option<String>>,
}

impl CommBook {
    /// `w`'s handle on group `g`'s communicator.
    pub fn group(&self, w: WorkerId, g: &Group) -> Result<Arc<Communicator>> {
        lock(&self.groups)?
            .get(&(w, g.clone()))
            .cloned()
            .ok_or_else(|| Error::Device(format!("no communicator of {w} for group {g}")))
    }

    /// `w`'s handle on the all-worker communicator (rank = worker id).
    pub fn p2p(&self, w: WorkerId) -> Result<Arc<Communicator>> {
        lock(&self.p2p)?
            .get(&w)
            .cloned()
            .ok_or_else(|| Error::Device(format!("no point-to-point communicator of {w}")))
    }

    /// `w`'s handle on the copy lane's all-worker communicator (rank = worker id): its
    /// copy thread's reshard pieces, on the copy stream (a communicator of its own, as
    /// one handle's ops must come from one stream).
    pub fn copy(&self, w: WorkerId) -> Result<Arc<Communicator>> {
        lock(&self.copy)?
            .get(&w)
            .cloned()
            .ok_or_else(|| Error::Device(format!("no copy-lane communicator of {w}")))
    }

    /// Aborts every handle in the book ([`Communicator::abort`]).
    pub fn abort_all(&self, why: &str) {
        if let Ok(mut a) = self.aborted.lock() {
            a.get_or_insert_with(|| why.to_string());
        }
        for table in [&self.p2p, &self.copy] {
            if let Ok(m) = table.lock() {
                m.values().for_each(|c| c.abort());
            }
        }
        if let Ok(m) = self.groups.lock() {
            m.values().for_each(|c| c.abort());
        }
    }

    /// Why the communicators were aborted, once they were: nothing can exchange
    /// through them any more (the engine must restart).
    pub fn aborted(&self) -> Option<String> {
        self.aborted.lock().ok().and_then(|a| a.clone())
    }

    fn has_group(&self, g: &Group) -> Result<bool> {
        Ok(lock(&self.groups)?.keys().any(|(_, gg)| gg == g))
    }
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| Error::Device("communicator table poisoned".into()))
}

/// The engine's side: the world communicator (one handle per worker, used only by the
/// engine's thread to split), the splits made so far and the book the workers read.
pub struct Collectives {
    world: Vec<Communicator>,
    splits: Vec<CommSplit>,
    devices: DeviceMap,
    book: Arc<CommBook>,
}

impl Collectives {
    /// World and all-worker communicators over the workers' compute handles (worker `w`
    /// on `devs[w]`, every one on a GPU of its own per `devices`), and the splits of
    /// `placement`'s groups.
    pub fn new(
        devs: &[&dyn Device],
        devices: DeviceMap,
        placement: &Placement,
        timeout: Duration,
    ) -> Result<Self> {
        let n = devs.len();
        let all = Group((0..n).map(WorkerId).collect());
        if devices.num_workers() != n || !devices.nccl_capable(&all) {
            return Err(Error::Device(format!(
                "collectives need one worker per GPU ({n} workers on {} handles)",
                devices.num_workers()
            )));
        }
        let world = self::world(devs, timeout)?;
        let refs: Vec<&Communicator> = world.iter().collect();
        let book = Arc::new(CommBook::default());
        // Two all-worker splits: hand-offs (compute streams), reshard pieces (copy).
        for table in [&book.p2p, &book.copy] {
            let all = split(&refs, &vec![Some((0, 0)); n])?;
            let mut m = lock(table)?;
            for (w, c) in all.into_iter().enumerate() {
                let c =
                    c.ok_or_else(|| Error::Device("all-worker split left a rank out".into()))?;
                m.insert(WorkerId(w), Arc::new(c));
            }
        }
        let mut me = Collectives {
            world,
            splits: Vec::new(),
            devices,
            book,
        };
        me.add_placement(placement)?;
        Ok(me)
    }

    /// Splits for the groups of `placement` not split yet (before a switch to it: its
    /// layers flip while steps run, so every communicator is there first).
    pub fn add_placement(&mut self, placement: &Placement) -> Result<()> {
        let plan = comm_plan(placement, &self.devices, &self.splits);
        let refs: Vec<&Communicator> = self.world.iter().collect();
        for s in plan.nccl {
            if self.book.has_group(&s.group)? {
                continue;
            }
            let args: Vec<Option<(u32, u32)>> =
                (0..refs.len()).map(|w| s.args_for(WorkerId(w))).collect();
            let comms = split(&refs, &args)?;
            let mut m = lock(&self.book.groups)?;
            for (w, c) in comms.into_iter().enumerate() {
                if let Some(c) = c {
                    m.insert((WorkerId(w), s.group.clone()), Arc::new(c));
                }
            }
            drop(m);
            self.splits.push(s);
        }
        Ok(())
    }

    /// Aborts every communicator, the world's included: after a failure in which a
    /// worker may have queued a collective its peers never will (it would wait on its
    /// GPU forever). Nothing exchanges through them afterwards; the engine must restart.
    pub fn abort_all(&self, why: &str) {
        self.book.abort_all(why);
        self.world.iter().for_each(Communicator::abort);
    }

    /// Why the communicators were aborted (here or by a copy thread through the
    /// book), if they were.
    pub fn aborted(&self) -> Option<String> {
        self.book.aborted()
    }

    /// Drops the splits of groups `placement` does not use, destroying their
    /// communicators (each holds NCCL's buffers, outside the memory meter): after a
    /// switch ended, between steps, when no worker uses them. A later switch back
    /// splits them again.
    pub fn retain_placement(&mut self, placement: &Placement) -> Result<()> {
        let keep: Vec<&Group> = placement.segments().map(|s| placement.group(s)).collect();
        self.splits.retain(|s| keep.contains(&&s.group));
        lock(&self.book.groups)?.retain(|(_, g), _| keep.contains(&g));
        Ok(())
    }

    /// What the workers read.
    pub fn book(&self) -> &Arc<CommBook> {
        &self.book
    }

    /// Splits made so far (one per distinct multi-member group).
    pub fn splits(&self) -> &[CommSplit] {
        &self.splits
    }
}

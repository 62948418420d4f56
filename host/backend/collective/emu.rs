//! The emulated communicator: NCCL's matching and blocking rules over host memory, so
//! code that would hang or mismatch on GPUs fails here with an error instead of passing.
//!
//! Every rank's handle on one communicator shares one `Shared` state (a mutex and a
//! condvar). `EmuComm::queue` turns a group into ONE op on the rank's emulated stream;
//! when the stream runs it, the op
//! 1. posts the whole group: an all-gather's slot becomes contribution `k` of the
//!    communicator (`k` counts this rank's collectives on it), a send deposits a copy of
//!    its bytes in the mailbox of its ordered pair under the pair's next sequence number,
//!    a recv marks the pair's next recv as posted;
//! 2. waits until every op of the group is matched: an all-gather by all ranks'
//!    contributions (of one size), a send by its recv being posted (NCCL's send blocks
//!    until the receiver runs its recv, which is what makes ungrouped cyclic sends
//!    deadlock), a recv by its send's data (of its size);
//! 3. writes the gathered slots and the received bytes to the captured device addresses.
//!
//! A wait that outlasts the communicator's timeout fails the op with [`Error::Comm`]
//! naming the rank and the op it waited for (where NCCL would hang); the stream reports
//! it at its owner's next synchronizing call. Waiting blocks the thread that runs the
//! stream (its owner, or another stream's event wait), as a GPU stream stalls.
//!
//! Sequence numbers are taken when the op RUNS, and again when it is queued (to find a
//! peer's queued op, below): the same order because a rank uses a communicator from one
//! stream only (NCCL's own rule: one communicator's ops on one rank are serialized).
//!
//! Emulated streams are lazy (their work runs when the owner synchronizes), GPU streams
//! are not: an op waiting for a peer whose matching op is queued but not run yet runs the
//! peer's stream up to that op itself, as the peer's GPU would have without its host.
//! Otherwise a peer whose host blocks on this rank before synchronizing (the engine's
//! flip waiting for a reshard piece) would look like a deadlock no GPU has.
//!
//! The shared state stays bounded: an all-gather's contributions go once every rank has
//! left it, a mailbox entry once its recv took it.

use super::{CollOp, Communicator, Kind};
use crate::backend::device::emu::{EmuDevice, Mark};
use crate::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One rank's handle: the communicator's shared state and this rank in it.
pub(crate) struct EmuComm {
    shared: Arc<Shared>,
    rank: usize,
}

/// What every rank of one communicator sees.
struct Shared {
    /// For messages: which communicator ("world of 4", "split color 0 of ...").
    label: String,
    size: usize,
    /// How long an op waits for its peers before failing (where NCCL would hang).
    timeout: Duration,
    state: Mutex<State>,
    /// Signalled whenever something is posted.
    posted: Condvar,
}

#[derive(Default)]
struct State {
    /// Aborted (`ncclCommAbort`): every op waiting or yet to run fails at once.
    aborted: bool,
    /// Per rank: collectives it has posted (the next one's number).
    coll_next: Vec<u64>,
    /// All-gathers some rank has posted and not every rank has left.
    gathers: HashMap<u64, Gather>,
    /// Per ordered pair `from * size + to`: sends posted (the next send's sequence).
    send_next: Vec<u64>,
    /// Per ordered pair `from * size + to`: recvs posted (a send of sequence `s` is
    /// matched once this exceeds `s`).
    recv_next: Vec<u64>,
    /// Sent bytes not yet received, by (from, to, pair sequence).
    mail: HashMap<(usize, usize, u64), Vec<u8>>,
    /// Where each op not yet run sits in its stream, numbered when QUEUED (the same
    /// numbers the run gives it, one stream per handle): an op waiting for a peer whose
    /// matching op is queued runs the peer's stream up to it, as a GPU would have run it
    /// by itself. Without this, the emulator's lazy streams would report deadlocks that a
    /// GPU never has (a peer whose host waits on this rank before it synchronizes).
    queued: Queued,
}

#[derive(Default)]
struct Queued {
    /// Per rank: collectives queued (the next one's number).
    coll_next: Vec<u64>,
    /// Per ordered pair `from * size + to`: sends and recvs queued.
    send_next: Vec<u64>,
    recv_next: Vec<u64>,
    /// (rank, collective number) → the point after its op.
    gathers: HashMap<(usize, u64), Mark>,
    /// (from, to, pair sequence) → the point after the send's / recv's op.
    sends: HashMap<(usize, usize, u64), Mark>,
    recvs: HashMap<(usize, usize, u64), Mark>,
}

struct Gather {
    /// Each rank's slot, once posted.
    parts: Vec<Option<Vec<u8>>>,
    /// Ranks that have not left it yet (completed, failed or timed out).
    left: usize,
}

/// An op of a group as the stream runs it: device addresses, not borrows.
#[derive(Clone, Copy)]
enum Op {
    Gather {
        at: usize,
        bytes: usize,
    },
    Send {
        at: usize,
        bytes: usize,
        peer: usize,
    },
    Recv {
        at: usize,
        bytes: usize,
        peer: usize,
    },
}

/// An op once posted, with the number it matches by.
enum Posted {
    Gather {
        k: u64,
        at: usize,
        bytes: usize,
    },
    Send {
        seq: u64,
        bytes: usize,
        peer: usize,
    },
    Recv {
        seq: u64,
        at: usize,
        bytes: usize,
        peer: usize,
    },
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A copy of `bytes` bytes at device address `at`.
///
/// # Safety
/// `at..at + bytes` must lie in live emulated memory (checked by `Communicator::queue`
/// and kept alive by the emulator's deferred frees while the op is queued).
unsafe fn read(at: usize, bytes: usize) -> Vec<u8> {
    if bytes == 0 {
        return Vec::new();
    }
    std::slice::from_raw_parts(at as *const u8, bytes).to_vec()
}

/// Writes `data` to device address `at`.
///
/// # Safety
/// As [`read`], for `data.len()` bytes.
unsafe fn write(at: usize, data: &[u8]) {
    if !data.is_empty() {
        std::ptr::copy_nonoverlapping(data.as_ptr(), at as *mut u8, data.len());
    }
}

impl EmuComm {
    /// `ncclCommAbort`: every rank's waiting and later ops fail at once.
    pub(crate) fn abort(&self) {
        lock(&self.shared.state).aborted = true;
        self.shared.posted.notify_all();
    }

    /// Queues `ops` (already checked against the buffers and the size) as one op on
    /// `dev`'s stream; nothing runs now.
    pub(crate) fn queue(&self, dev: &EmuDevice, ops: &[CollOp]) -> Result<()> {
        for op in ops {
            let (CollOp::AllGather { buf, .. }
            | CollOp::Send { buf, .. }
            | CollOp::Recv { buf, .. }) = *op;
            dev.check_owner(buf.ptr(), "a collective")?;
        }
        let ops: Vec<Op> = ops
            .iter()
            .map(|op| match *op {
                CollOp::AllGather { buf, bytes } => Op::Gather {
                    at: buf.ptr() as usize,
                    bytes,
                },
                CollOp::Send {
                    buf,
                    off,
                    bytes,
                    peer,
                } => Op::Send {
                    at: buf.ptr() as usize + off,
                    bytes,
                    peer,
                },
                CollOp::Recv {
                    buf,
                    off,
                    bytes,
                    peer,
                } => Op::Recv {
                    at: buf.ptr() as usize + off,
                    bytes,
                    peer,
                },
            })
            .collect();
        let (shared, rank) = (self.shared.clone(), self.rank);
        let n = shared.size;
        // Numbered and marked under the lock, so a peer never sees the op queued but not
        // marked.
        let mut st = lock(&self.shared.state);
        // SAFETY (of the addresses the op uses): `Communicator::queue` checked every
        // range against its buffer, and emulated memory is freed only once every
        // stream has run past the free, so it outlives this queued op.
        let (run, run_ops) = (shared.clone(), ops.clone());
        dev.enqueue(move || run.run(rank, &run_ops));
        let mark = dev.mark();
        let q = &mut st.queued;
        for op in &ops {
            match *op {
                Op::Gather { .. } => {
                    let k = q.coll_next[rank];
                    q.coll_next[rank] += 1;
                    q.gathers.insert((rank, k), mark.clone());
                }
                Op::Send { peer, .. } => {
                    let seq = q.send_next[rank * n + peer];
                    q.send_next[rank * n + peer] += 1;
                    q.sends.insert((rank, peer, seq), mark.clone());
                }
                Op::Recv { peer, .. } => {
                    let seq = q.recv_next[peer * n + rank];
                    q.recv_next[peer * n + rank] += 1;
                    q.recvs.insert((peer, rank, seq), mark.clone());
                }
            }
        }
        drop(st);
        shared.posted.notify_all();
        Ok(())
    }
}

impl Shared {
    fn new(label: String, size: usize, timeout: Duration) -> Arc<Shared> {
        Arc::new(Shared {
            label,
            size,
            timeout,
            state: Mutex::new(State {
                coll_next: vec![0; size],
                send_next: vec![0; size * size],
                recv_next: vec![0; size * size],
                queued: Queued {
                    coll_next: vec![0; size],
                    send_next: vec![0; size * size],
                    recv_next: vec![0; size * size],
                    ..Default::default()
                },
                ..Default::default()
            }),
            posted: Condvar::new(),
        })
    }

    /// Runs one group of rank `me` (on the stream's runner): post, wait, complete.
    fn run(&self, me: usize, ops: &[Op]) -> Result<()> {
        let n = self.size;
        // The bytes that leave this rank are read before locking (they are this
        // stream's own memory; the lock only guards the shared state).
        let out: Vec<Vec<u8>> = ops
            .iter()
            .map(|op| match *op {
                // SAFETY: in range (see `EmuComm::queue`).
                Op::Gather { at, bytes } => unsafe { read(at + me * bytes, bytes) },
                Op::Send { at, bytes, .. } => unsafe { read(at, bytes) },
                Op::Recv { .. } => Vec::new(),
            })
            .collect();

        // 1. Post the whole group (what lets a group's ops progress together).
        let mut st = lock(&self.state);
        if st.aborted {
            return Err(self.err(format!(
                "rank {me}'s group after the communicator was aborted"
            )));
        }
        let mut posted = Vec::with_capacity(ops.len());
        for (op, data) in ops.iter().zip(out) {
            posted.push(match *op {
                Op::Gather { at, bytes } => {
                    let k = st.coll_next[me];
                    st.coll_next[me] += 1;
                    st.queued.gathers.remove(&(me, k));
                    let g = st.gathers.entry(k).or_insert_with(|| Gather {
                        parts: vec![None; n],
                        left: n,
                    });
                    g.parts[me] = Some(data);
                    Posted::Gather { k, at, bytes }
                }
                Op::Send { bytes, peer, .. } => {
                    let seq = st.send_next[me * n + peer];
                    st.send_next[me * n + peer] += 1;
                    st.queued.sends.remove(&(me, peer, seq));
                    st.mail.insert((me, peer, seq), data);
                    Posted::Send { seq, bytes, peer }
                }
                Op::Recv { at, bytes, peer } => {
                    let seq = st.recv_next[peer * n + me];
                    st.recv_next[peer * n + me] += 1;
                    st.queued.recvs.remove(&(peer, me, seq));
                    Posted::Recv {
                        seq,
                        at,
                        bytes,
                        peer,
                    }
                }
            });
        }
        self.posted.notify_all();

        // 2. Wait until every op of the group is matched, or fail.
        let deadline = Instant::now() + self.timeout;
        loop {
            let mut pending = None;
            for p in &posted {
                match self.matched(&st, me, p) {
                    Ok(true) => {}
                    Ok(false) => {
                        pending = Some(p);
                        break;
                    }
                    Err(e) => {
                        self.abandon(&mut st, me, &posted);
                        return Err(e);
                    }
                }
            }
            let Some(p) = pending else { break };
            let now = Instant::now();
            if st.aborted {
                self.abandon(&mut st, me, &posted);
                return Err(self.err(format!(
                    "rank {me}'s group was waiting when the communicator was aborted"
                )));
            }
            if now >= deadline {
                let e = self.unmatched(&st, me, p);
                self.abandon(&mut st, me, &posted);
                return Err(e);
            }
            // A peer's matching op already queued runs now (on this thread), as the
            // peer's GPU stream would have run it without waiting for its host; one not
            // queued yet waits for the peer's host to queue it.
            let peers = self.partners(&st, me, p);
            if peers.is_empty() {
                st = self
                    .posted
                    .wait_timeout(st, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            } else {
                drop(st);
                for m in &peers {
                    m.drive(deadline);
                }
                st = lock(&self.state);
                let now = Instant::now();
                if !peers.is_empty() && now < deadline {
                    // (A driven peer may be stuck behind its own waits: do not spin.)
                    st = self
                        .posted
                        .wait_timeout(st, (deadline - now).min(Duration::from_millis(2)))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }

        // 3. Complete: the peers' bytes land in this rank's buffers.
        for p in &posted {
            match *p {
                Posted::Gather { k, at, bytes } => {
                    if let Some(g) = st.gathers.get(&k) {
                        for (i, part) in g.parts.iter().enumerate() {
                            if let (Some(d), true) = (part, i != me) {
                                // SAFETY: slot `i` is in range (see `EmuComm::queue`).
                                unsafe { write(at + i * bytes, d) };
                            }
                        }
                    }
                    leave(&mut st, k);
                }
                Posted::Recv { seq, at, peer, .. } => {
                    if let Some(d) = st.mail.remove(&(peer, me, seq)) {
                        // SAFETY: in range (see `EmuComm::queue`).
                        unsafe { write(at, &d) };
                    }
                }
                Posted::Send { .. } => {}
            }
        }
        Ok(())
    }

    /// The points in the peers' streams after their ops that `p` waits for and that
    /// are queued but not yet posted.
    fn partners(&self, st: &State, me: usize, p: &Posted) -> Vec<Mark> {
        let q = &st.queued;
        match *p {
            Posted::Gather { k, .. } => {
                let missing = st.gathers.get(&k).map_or(Vec::new(), |g| {
                    (0..self.size).filter(|&i| g.parts[i].is_none()).collect()
                });
                missing
                    .into_iter()
                    .filter_map(|i| q.gathers.get(&(i, k)).cloned())
                    .collect()
            }
            Posted::Send { seq, peer, .. } => {
                q.recvs.get(&(me, peer, seq)).cloned().into_iter().collect()
            }
            Posted::Recv { seq, peer, .. } => {
                q.sends.get(&(peer, me, seq)).cloned().into_iter().collect()
            }
        }
    }

    /// Whether `p` is matched; an error for a match of the wrong size.
    fn matched(&self, st: &State, me: usize, p: &Posted) -> Result<bool> {
        let n = self.size;
        match *p {
            Posted::Gather { k, bytes, .. } => {
                let Some(g) = st.gathers.get(&k) else {
                    return Err(self.err(format!(
                        "rank {me}'s all-gather #{k} lost its contributions (an emulator bug)"
                    )));
                };
                for (i, part) in g.parts.iter().enumerate() {
                    if let Some(d) = part.as_ref().filter(|d| d.len() != bytes) {
                        return Err(self.err(format!(
                            "all-gather #{k}: rank {me} gathers {bytes} B per slot, rank {i} \
                             {} B: NCCL would corrupt memory or hang here",
                            d.len()
                        )));
                    }
                }
                Ok(g.parts.iter().all(Option::is_some))
            }
            Posted::Send { seq, peer, .. } => Ok(st.recv_next[me * n + peer] > seq),
            Posted::Recv {
                seq, bytes, peer, ..
            } => match st.mail.get(&(peer, me, seq)) {
                None => Ok(false),
                Some(d) if d.len() == bytes => Ok(true),
                Some(d) => Err(self.err(format!(
                    "rank {me}'s recv of {bytes} B from rank {peer} (pair seq {seq}) met a \
                     send of {} B: NCCL would corrupt memory or hang here",
                    d.len()
                ))),
            },
        }
    }

    /// The error for `p` still unmatched at the deadline.
    fn unmatched(&self, st: &State, me: usize, p: &Posted) -> Error {
        let t = self.timeout;
        self.err(match *p {
            Posted::Gather { k, bytes, .. } => {
                let missing: Vec<usize> = st.gathers.get(&k).map_or(Vec::new(), |g| {
                    (0..self.size).filter(|&i| g.parts[i].is_none()).collect()
                });
                format!(
                    "rank {me}'s all-gather #{k} of {bytes} B per slot was not matched \
                     within {t:?} (no contribution from ranks {missing:?}): NCCL would hang \
                     here (a collective missing or out of order on some rank?)"
                )
            }
            Posted::Send { seq, bytes, peer } => format!(
                "rank {me}'s send of {bytes} B to rank {peer} (pair seq {seq}) was not \
                 matched within {t:?}: NCCL would hang here (a cycle of ungrouped sends? a \
                 missing recv?)"
            ),
            Posted::Recv {
                seq, bytes, peer, ..
            } => format!(
                "rank {me}'s recv of {bytes} B from rank {peer} (pair seq {seq}) was not \
                 matched within {t:?}: NCCL would hang here (a missing send? its sender \
                 blocked?)"
            ),
        })
    }

    /// A failed group leaves its all-gathers and drops the mail its recvs met, so a
    /// failure does not keep shared state alive after the peers are done with it.
    fn abandon(&self, st: &mut State, me: usize, posted: &[Posted]) {
        for p in posted {
            match *p {
                Posted::Gather { k, .. } => leave(st, k),
                Posted::Recv { seq, peer, .. } => {
                    st.mail.remove(&(peer, me, seq));
                }
                Posted::Send { .. } => {}
            }
        }
    }

    fn err(&self, msg: String) -> Error {
        Error::Comm(format!("emulated NCCL ({}): {msg}", self.label))
    }
}

/// One rank is done with all-gather `k`; the last one drops its contributions.
fn leave(st: &mut State, k: u64) {
    if let Some(g) = st.gathers.get_mut(&k) {
        g.left = g.left.saturating_sub(1);
        if g.left == 0 {
            st.gathers.remove(&k);
        }
    }
}

fn handles(shared: &Arc<Shared>) -> impl Iterator<Item = Communicator> + '_ {
    (0..shared.size).map(|rank| {
        let c = EmuComm {
            shared: shared.clone(),
            rank,
        };
        Communicator::new(Kind::Emu(c), rank, shared.size)
    })
}

/// `n` handles on one new communicator, rank `i` at index `i`.
pub(crate) fn world(n: usize, timeout: Duration) -> Vec<Communicator> {
    handles(&Shared::new(format!("world of {n}"), n, timeout)).collect()
}

/// `ncclCommSplit` of every rank of one communicator (made by one thread, so no
/// rendezvous): per color a new communicator with the parent's timeout, members ranked
/// as [`super::split_members`] orders them; `None` for ranks without a color.
pub(crate) fn split(
    parents: &[&EmuComm],
    args: &[Option<(u32, u32)>],
) -> Vec<Option<Communicator>> {
    let mut out: Vec<Option<Communicator>> = parents.iter().map(|_| None).collect();
    let Some(first) = parents.first() else {
        return out;
    };
    let parent = &first.shared;
    for (color, members) in super::split_members(args) {
        let label = format!("split color {color} of the {}", parent.label);
        let shared = Shared::new(label, members.len(), parent.timeout);
        for (p, c) in members.into_iter().zip(handles(&shared)) {
            if let Some(slot) = out.get_mut(p) {
                *slot = Some(c);
            }
        }
    }
    out
}

// The engine hands each rank's handle to that rank's thread.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<EmuComm>();
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::device::{download_vec, upload_new, Buf, Device};

    /// `n` pseudo-random words from `seed` (xorshift64).
    fn random(seed: u64, n: usize) -> Vec<u32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u32
            })
            .collect()
    }

    fn shared(c: &Communicator) -> &Arc<Shared> {
        match &c.kind {
            Kind::Emu(e) => &e.shared,
            Kind::Nccl(_) => panic!("not emulated"),
        }
    }

    /// Nothing is left in the shared state once every op has completed.
    fn assert_drained(c: &Communicator) {
        let st = lock(&shared(c).state);
        assert!(st.gathers.is_empty(), "all-gathers left behind");
        assert!(st.mail.is_empty(), "mail left behind");
        let q = &st.queued;
        assert!(
            q.gathers.is_empty() && q.sends.is_empty() && q.recvs.is_empty(),
            "queued-op marks left behind"
        );
    }

    /// Runs `f(rank, handle)` for every handle, each on its own thread.
    /// Sends the first 128 bytes of `buf` to `peer`.
    fn send128(buf: &Buf, peer: usize) -> CollOp<'_> {
        CollOp::Send {
            buf,
            off: 0,
            bytes: 128,
            peer,
        }
    }

    /// Receives 128 bytes from `peer` into the start of `buf`.
    fn recv128(buf: &Buf, peer: usize) -> CollOp<'_> {
        CollOp::Recv {
            buf,
            off: 0,
            bytes: 128,
            peer,
        }
    }

    fn on_threads<R: Send>(
        comms: &[Communicator],
        f: impl Fn(usize, &Communicator) -> R + Sync,
    ) -> Vec<R> {
        std::thread::scope(|s| {
            let f = &f;
            let hs: Vec<_> = comms
                .iter()
                .enumerate()
                .map(|(i, c)| s.spawn(move || f(i, c)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    const T: Duration = Duration::from_secs(10);

    /// Every rank ends with every rank's slot; two all-gathers queued back to back
    /// match by order (rank k's first with every rank's first).
    #[test]
    fn all_gather_over_three_ranks() {
        let comms = world(3, T);
        let words = 16; // 64 B per slot
        let data = |round: u64, r: usize| random(100 * round + r as u64 + 1, words);
        on_threads(&comms, |r, c| {
            assert_eq!((c.rank(), c.size()), (r, 3));
            let dev = EmuDevice::new();
            let bufs: Vec<_> = (0..2)
                .map(|round| {
                    let b = dev.alloc(3 * words * 4).unwrap();
                    let mine = data(round, r);
                    dev.upload(
                        &b,
                        r * words * 4,
                        crate::backend::device::pod::bytes_of(&mine),
                    )
                    .unwrap();
                    b
                })
                .collect();
            for b in &bufs {
                let op = CollOp::AllGather {
                    buf: b,
                    bytes: words * 4,
                };
                c.queue(&dev, &[op]).unwrap();
            }
            dev.synchronize().unwrap();
            for (round, b) in bufs.iter().enumerate() {
                let got: Vec<u32> = download_vec(&dev, b, 3 * words).unwrap();
                for i in 0..3 {
                    assert_eq!(
                        got[i * words..(i + 1) * words],
                        data(round as u64, i)[..],
                        "rank {r}, round {round}, slot {i}"
                    );
                }
            }
        });
        assert_drained(&comms[0]);
    }

    /// One group [send to the other, recv from the other] on each of two ranks: both
    /// get the other's bytes (at an offset); a group of zero-byte ops matches too.
    #[test]
    fn grouped_exchange() {
        let comms = world(2, T);
        let data = |r: usize| random(7 + r as u64, 32);
        on_threads(&comms, |r, c| {
            let dev = EmuDevice::new();
            let other = 1 - r;
            let src = upload_new(&dev, &data(r)).unwrap();
            let dst = dev.alloc(256).unwrap();
            let ops = [
                CollOp::Send {
                    buf: &src,
                    off: 0,
                    bytes: 128,
                    peer: other,
                },
                CollOp::Recv {
                    buf: &dst,
                    off: 64,
                    bytes: 128,
                    peer: other,
                },
            ];
            c.queue(&dev, &ops).unwrap();
            // zero bytes: matched and counted (the next pair seq), nothing written
            let empty = [
                CollOp::Send {
                    buf: &src,
                    off: 128,
                    bytes: 0,
                    peer: other,
                },
                CollOp::Recv {
                    buf: &dst,
                    off: 256,
                    bytes: 0,
                    peer: other,
                },
            ];
            c.queue(&dev, &empty).unwrap();
            dev.synchronize().unwrap();
            let got: Vec<u32> = download_vec(&dev, &dst, 64).unwrap();
            assert_eq!(got[16..48], data(other)[..], "rank {r}");
            // around the received bytes: still the fresh allocation's poison
            assert!(got[..16].iter().chain(&got[48..]).all(|&w| w == u32::MAX));
            let st = lock(&shared(c).state);
            assert_eq!(st.send_next, st.recv_next);
        });
        let st = lock(&shared(&comms[0]).state);
        assert_eq!(st.send_next, vec![0, 2, 2, 0]);
        drop(st);
        assert_drained(&comms[0]);
    }

    /// The same exchange ungrouped (send first, then recv, each its own group) is
    /// NCCL's deadlock: each send waits for a recv that runs after it. Both ranks get
    /// an error. Ungrouped ops in an order that does match (one side sends first while
    /// the other receives first) work.
    #[test]
    fn ungrouped_cyclic_sends_deadlock_and_one_way_works() {
        let comms = world(2, Duration::from_millis(300));
        let errs = on_threads(&comms, |r, c| {
            let dev = EmuDevice::new();
            let other = 1 - r;
            let src = upload_new(&dev, &random(r as u64, 32)).unwrap();
            let dst = dev.alloc(128).unwrap();
            let send = send128(&src, other);
            let recv = recv128(&dst, other);
            c.queue(&dev, &[send]).unwrap();
            c.queue(&dev, &[recv]).unwrap();
            dev.synchronize().unwrap_err().to_string()
        });
        for (r, e) in errs.iter().enumerate() {
            assert!(
                e.contains(&format!("rank {r}'s send of 128 B to rank {}", 1 - r))
                    && e.contains("not matched"),
                "{e}"
            );
        }

        let comms = world(2, T);
        let data = |r: usize| random(40 + r as u64, 32);
        on_threads(&comms, |r, c| {
            let dev = EmuDevice::new();
            let other = 1 - r;
            let src = upload_new(&dev, &data(r)).unwrap();
            let dst = dev.alloc(128).unwrap();
            let send = send128(&src, other);
            let recv = recv128(&dst, other);
            let order = if r == 0 { [send, recv] } else { [recv, send] };
            for op in order {
                c.queue(&dev, &[op]).unwrap();
            }
            dev.synchronize().unwrap();
            let got: Vec<u32> = download_vec(&dev, &dst, 32).unwrap();
            assert_eq!(got, data(other), "rank {r}");
        });
        assert_drained(&comms[0]);
    }

    /// All-gathers of different slot sizes are an error on both ranks, naming both
    /// sizes (not a timeout).
    #[test]
    fn all_gather_size_mismatch_fails() {
        let comms = world(2, T);
        let errs = on_threads(&comms, |r, c| {
            let dev = EmuDevice::new();
            let bytes = if r == 0 { 64 } else { 32 };
            let buf = dev.alloc(2 * bytes).unwrap();
            c.queue(&dev, &[CollOp::AllGather { buf: &buf, bytes }])
                .unwrap();
            dev.synchronize().unwrap_err().to_string()
        });
        for e in &errs {
            assert!(
                e.contains("64 B") && e.contains("32 B") && !e.contains("not matched"),
                "{e}"
            );
        }
        assert_drained(&comms[0]);
    }

    /// Split ranks follow (key, parent rank); an all-gather on a split moves data
    /// between the right world ranks in the split's slot order.
    #[test]
    fn split_ranks_and_all_gather() {
        let comms = world(4, T);
        let parents: Vec<&Communicator> = comms.iter().collect();
        let args = [Some((0, 1)), Some((1, 0)), None, Some((0, 0))];
        let mut subs = super::super::split(&parents, &args).unwrap();
        let rs = |c: &Option<Communicator>| c.as_ref().map(|c| (c.rank(), c.size()));
        assert_eq!(rs(&subs[0]), Some((1, 2)));
        assert_eq!(rs(&subs[1]), Some((0, 1)));
        assert_eq!(rs(&subs[2]), None);
        assert_eq!(rs(&subs[3]), Some((0, 2)));
        assert!(!Arc::ptr_eq(
            shared(subs[0].as_ref().unwrap()),
            shared(subs[1].as_ref().unwrap())
        ));
        assert_eq!(shared(subs[3].as_ref().unwrap()).timeout, T);

        // color 0 in new-rank order: world rank 3, then world rank 0
        let color0 = vec![subs[3].take().unwrap(), subs[0].take().unwrap()];
        let world_rank = [3usize, 0];
        let data = |w: usize| random(900 + w as u64, 8);
        on_threads(&color0, |r, c| {
            let dev = EmuDevice::new();
            let buf = dev.alloc(64).unwrap();
            let mine = data(world_rank[r]);
            dev.upload(&buf, r * 32, crate::backend::device::pod::bytes_of(&mine))
                .unwrap();
            c.queue(
                &dev,
                &[CollOp::AllGather {
                    buf: &buf,
                    bytes: 32,
                }],
            )
            .unwrap();
            dev.synchronize().unwrap();
            let got: Vec<u32> = download_vec(&dev, &buf, 16).unwrap();
            assert_eq!(got[..8], data(3)[..], "slot 0 is world rank 3's");
            assert_eq!(got[8..], data(0)[..], "slot 1 is world rank 0's");
        });
        assert_drained(&color0[0]);

        // a one-rank communicator gathers alone
        let solo = subs[1].take().unwrap();
        let dev = EmuDevice::new();
        let buf = upload_new(&dev, &data(1)).unwrap();
        solo.queue(
            &dev,
            &[CollOp::AllGather {
                buf: &buf,
                bytes: 32,
            }],
        )
        .unwrap();
        dev.synchronize().unwrap();
        assert_eq!(download_vec::<u32>(&dev, &buf, 8).unwrap(), data(1));
    }

    /// A peer's op that is queued but not run (its host has not synchronized, and will
    /// not until this rank is done) still runs: a GPU stream runs queued work without
    /// its host, and the emulated collective drives the peer's stream up to the op as
    /// a GPU would have. Without that, this would be a deadlock (reported after the
    /// timeout) that no GPU has.
    #[test]
    fn a_queued_peer_op_runs_without_its_host() {
        let comms = world(2, Duration::from_secs(5));
        let data = random(5, 32);
        std::thread::scope(|s| {
            let (c0, c1) = (&comms[0], &comms[1]);
            let (queued_tx, queued_rx) = std::sync::mpsc::channel::<()>();
            let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
            let data0 = &data;
            let sender = s.spawn(move || {
                let dev = EmuDevice::new();
                let src = upload_new(&dev, data0).unwrap();
                let send = send128(&src, 1);
                c0.queue(&dev, &[send]).unwrap();
                queued_tx.send(()).unwrap();
                // This host synchronizes only after the receiver is done.
                done_rx.recv().unwrap();
                dev.synchronize()
            });
            let dev = EmuDevice::new();
            let dst = dev.alloc(128).unwrap();
            let recv = recv128(&dst, 0);
            queued_rx.recv().unwrap(); // the send is queued, not run
            c1.queue(&dev, &[recv]).unwrap();
            dev.synchronize().unwrap();
            assert_eq!(download_vec::<u32>(&dev, &dst, 32).unwrap(), data);
            done_tx.send(()).unwrap();
            sender.join().unwrap().unwrap();
        });
        assert_drained(&comms[0]);
    }
}

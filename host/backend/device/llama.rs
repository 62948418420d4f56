//! A worker's Llama segments as kernel launches on a [`Device`]: the GPU path of the
//! engine, run on a CUDA GPU or on the emulator.
//!
//! Data layout (all bf16 unless noted, row-major, 16-byte aligned buffers):
//! - weights: one buffer per tensor of the worker's shard, exactly the region
//!   `TensorKind::region` gives (HF `nn.Linear` layout `[out, in]`; ColumnParallel shards
//!   are row blocks, RowParallel shards column blocks), norms and biases as vectors;
//!   `inv_freq` f32 (rounded to the checkpoint dtype like transformers does);
//! - KV cache per layer: K and V `[num_blocks, block_size, kv_heads_local, head_dim]`,
//!   the same paging as the CPU backend (block ids from the driver's allocator);
//! - the hidden state `[tokens, hidden]` on the device between segments.
//!
//! Numerics follow Hugging Face's bf16 forward op for op (the kernels round where
//! PyTorch does); the LM head writes f32 logits. Partial sums of a tensor-parallel group
//! (o_proj, down_proj) are produced in f32 and summed in group order, then rounded to
//! bf16 once, as a single-device bf16 forward would round the full sum. Two exchanges
//! ([`Exchange`]), bit-identical by construction: *same-device* (default) — the
//! partials of a group end up in slots `[group, tokens, hidden]` f32 and the split-K
//! reduce kernel sums the slots in order with the bias and residual add fused; on
//! decode-sized steps each member's GEMM writes its partial straight into its slot of
//! the group's mailbox ([`super::mailbox`]) and an event posted through the counted
//! [`Comm`] layer tells the peers when, on larger steps each member's partial goes to
//! its peers as a device buffer through the Comm layer and is copied into their slots,
//! and with workers on GPUs of their own the slots are all-gathered through NCCL
//! ([`crate::backend::collective`]); streams are ordered by events, never by the host.
//! And *host-staged* — download, host all-reduce, upload. The vocab-parallel
//! embedding's all-reduce (one member holds each row, so the sum is exact) takes the
//! buffer or the host route, summing bf16 rows with the residual-add kernel on the
//! device.
//!
//! Attention kernels map local query head `i` to local KV head `i / (q/kv)`, so a
//! shard must hold whole GQA groups (or one KV head): [`check_heads`] refuses the rest.

use super::{
    download_vec,
    graph::{self, GraphStats, Recorder, TABLE_STRIDE_BLOCKS},
    mailbox::{HeldMailboxes, MailSet, Mailboxes, MAILBOX_TOKENS},
    mark_ready, pod,
    pod::Pod,
    upload_new, wait_ready, Arg, Buf, Device, Exchange, Launch,
};
use crate::backend::collective::{CollOp, CommBook, Communicator};
use crate::backend::comm::{Comm, Tag};
use crate::backend::cuda::nvtx;
use crate::model::{ModelConfig, TensorSource};
use crate::parallel::shard::HeadShard;
use crate::parallel::{Group, LayerId, Segment, TensorKind, WorkerId};
use crate::runtime::kv_cache::KvGeometry;
use crate::runtime::sampling;
use crate::runtime::trace;
use crate::runtime::worker::{segment_tensors, HeadOutput, StepPlan};
use crate::{Error, Result};
use half::bf16;
use remp_gpu_kernels::attention::{FA_BM, FA_THREADS};
use remp_gpu_kernels::gemm::{dec_block, DEC_COLS};
use remp_gpu_kernels::gemm_wgmma::{WG_BM, WG_BN, WG_THREADS};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// GEMMs with at most this many rows take the weight-streaming decode kernel.
const DECODE_MAX_M: usize = 64;

/// Whether a layer's RMSNorms go into the decode GEMMs that follow them (see
/// `gemm_decode_qkv_bf16`): decode-sized steps whose rows the kernels' vectorised path
/// can read (`hidden % 8 == 0`; device buffers are 256-byte aligned). One launch fewer
/// per norm, two per layer.
fn fuse_norm(tokens: usize, hidden: usize) -> bool {
    tokens <= DECODE_MAX_M && hidden.is_multiple_of(8)
}
/// Threads per block of the attention and reshard kernels (and the least of the
/// one-block-per-row small ops).
const BLOCK: u32 = 128;

/// Threads per block of a one-block-per-row small op (RMSNorm, RoPE + KV write, row
/// gather, argmax) with `work` elements in its row, `per_thread` each: a warp multiple
/// from [`BLOCK`] up to 1024. Their loops issue one load per thread per iteration and
/// wait for it, so a row of 2048 on 128 threads waited for 16 memory latencies in a row
/// (RMSNorm took 14.6 µs at hidden 2048, argmax 97 µs over 32k logits: together half
/// of a 1.1B model's decode step on an H200, run 6 in docs/gpu-results.md); more threads
/// per row cut those chains. Block-size independent kernels (grid-stride loops, block
/// reductions over up to 32 warps); small rows keep 128 threads.
pub fn row_threads(work: usize, per_thread: usize) -> u32 {
    let want = work.div_ceil(per_thread.max(1)).next_multiple_of(32);
    want.clamp(BLOCK as usize, 1024) as u32
}

/// A bf16 weight `[n, k]` of the size a GEMM expects.
fn check_weight(w: &Buf, n: usize, k: usize) -> Result<()> {
    if w.len() != n * k * 2 {
        return Err(dev_err(format!(
            "weight of {} B for a {n}x{k} GEMM",
            w.len()
        )));
    }
    Ok(())
}

fn dev_err(msg: impl Into<String>) -> Error {
    Error::Device(msg.into())
}

/// NVTX name of a row-parallel projection's all-reduce: `layer 3 all-reduce o_proj`.
fn all_reduce_name(w: TensorKind) -> String {
    let proj = match w {
        TensorKind::O(_) => "o_proj",
        TensorKind::Down(_) => "down_proj",
        _ => "?",
    };
    format!("layer {} all-reduce {proj}", w.layer().map_or(0, |l| l.0))
}

/// One worker's shard of one segment, on the device.
pub struct DevShards {
    pub group_size: usize,
    pub index: usize,
    pub tensors: HashMap<TensorKind, Buf>,
}

impl DevShards {
    /// Reads this worker's regions from `source` (only its own rows / columns) and
    /// uploads them as bf16.
    pub fn load(
        dev: &dyn Device,
        cfg: &ModelConfig,
        source: &dyn TensorSource,
        seg: Segment,
        tp: usize,
        idx: usize,
    ) -> Result<DevShards> {
        let mut tensors = HashMap::new();
        for k in segment_tensors(cfg, seg) {
            let host = source.read(k, &k.region(cfg, tp, idx))?;
            let b: Vec<bf16> = host.iter().map(|&x| bf16::from_f32(x)).collect();
            tensors.insert(k, upload_new(dev, &b)?);
        }
        Ok(DevShards {
            group_size: tp,
            index: idx,
            tensors,
        })
    }

    pub fn get(&self, k: TensorKind) -> Result<&Buf> {
        self.tensors
            .get(&k)
            .ok_or_else(|| dev_err(format!("shard {k:?} not resident on the device")))
    }

    fn ptr(&self, k: TensorKind) -> u64 {
        self.tensors.get(&k).map_or(0, Buf::ptr)
    }

    pub fn bytes(&self) -> usize {
        self.tensors.values().map(Buf::len).sum()
    }
}

/// One layer's paged KV cache on the device (this worker's KV heads).
pub struct DevKv {
    pub kv_heads: Range<usize>,
    pub k: Buf,
    pub v: Buf,
}

impl DevKv {
    pub fn new(dev: &dyn Device, kv_heads: Range<usize>, geom: KvGeometry) -> Result<DevKv> {
        let bytes = geom.num_blocks * geom.block_size * kv_heads.len() * geom.head_dim * 2;
        Ok(DevKv {
            kv_heads,
            k: dev.alloc(bytes)?,
            v: dev.alloc(bytes)?,
        })
    }
    pub fn bytes(&self) -> usize {
        self.k.len() + self.v.len()
    }
}

/// Refuses head shards the attention kernels cannot address (a GQA group split across
/// ranks). A backstop: `Topology::validate` (tp divides the query heads, and tp and the
/// KV heads divide one another) already rules these out for every model it accepts.
pub fn check_heads(cfg: &ModelConfig, tp: usize, idx: usize) -> Result<()> {
    let h = HeadShard::new(cfg, tp, idx);
    let (nq, nkv) = (h.q_heads.len(), h.kv_heads.len());
    let g = cfg.gqa_group();
    let ok = nkv > 0
        && nq % nkv == 0
        && (0..nq).all(|i| (h.q_heads.start + i) / g - h.kv_heads.start == i / (nq / nkv));
    if ok {
        Ok(())
    } else {
        Err(Error::Unsupported(format!(
            "the device backend needs whole GQA groups per rank: tp{tp} gives rank {idx} query heads {:?} over KV heads {:?} ({} query heads per KV head)",
            h.q_heads, h.kv_heads, g
        )))
    }
}

/// Per-step inputs on the device: token ids, positions, KV slots and the paged
/// attention metadata, uploaded by each device worker before its first segment of a
/// step, all eight arrays in one upload into one scratch buffer (one staged copy per
/// step instead of eight; queued on the stream, after the previous step's kernels that
/// read them). The fields are device pointers into that buffer (16-byte aligned).
pub struct StepInputs {
    /// The step's number: tags its messages (see [`Tag::step`]).
    pub step: u64,
    pub tokens: usize,
    pub seqs: usize,
    /// All sequences have exactly one new token (the decode kernel applies).
    pub decode_only: bool,
    pub max_ctx: usize,
    /// Most new tokens of any sequence.
    pub max_q: usize,
    pub max_blocks: usize,
    /// The scratch buffer the arrays below point into.
    _buf: Arc<Buf>,
    ids: u64,
    pos: u64,
    slots: u64,
    tables: u64,
    ctx_lens: u64,
    q_starts: u64,
    q_lens: u64,
    logit_rows: u64,
    pub num_logit_rows: usize,
    /// The logit rows are every row, in order (decode steps): the LM head reads the
    /// hidden state as it is, without gathering rows.
    all_rows: bool,
    /// What the LM head sends the driver (the plan's).
    pub head: HeadOutput,
}

impl StepInputs {
    pub fn new(dc: &DeviceCompute, plan: &StepPlan, geom: KvGeometry) -> Result<StepInputs> {
        let bs = geom.block_size;
        let mut ids = Vec::new();
        let mut pos = Vec::new();
        let mut slots = Vec::new();
        let (mut ctx_lens, mut q_starts, mut q_lens) = (Vec::new(), Vec::new(), Vec::new());
        let max_blocks = plan
            .seqs
            .iter()
            .map(|s| s.block_table.len())
            .max()
            .unwrap_or(0)
            .max(1)
            // The row stride is a launch argument: padded so that it changes seldom
            // (graph runs repeat, see super::graph); the kernels read ctx_lens' worth.
            .next_multiple_of(TABLE_STRIDE_BLOCKS);
        let mut tables = vec![0u32; plan.seqs.len().max(1) * max_blocks];
        for (si, s) in plan.seqs.iter().enumerate() {
            q_starts.push(ids.len() as u32);
            q_lens.push(s.tokens.len() as u32);
            ctx_lens.push((s.start_pos + s.tokens.len()) as u32);
            tables[si * max_blocks..si * max_blocks + s.block_table.len()]
                .copy_from_slice(&s.block_table);
            for (i, &t) in s.tokens.iter().enumerate() {
                let p = s.start_pos + i;
                let blk = *s.block_table.get(p / bs).ok_or_else(|| {
                    dev_err(format!(
                        "position {p} beyond the block table of request {}",
                        s.id
                    ))
                })?;
                ids.push(t);
                pos.push(p as u32);
                slots.push(blk * bs as u32 + (p % bs) as u32);
            }
        }
        let rows: Vec<u32> = plan.logit_rows().iter().map(|&r| r as u32).collect();
        // One buffer: each array at a 16-byte-aligned offset (the kernels may load 16 B).
        let arrays: [&[u32]; 8] = [
            &ids, &pos, &slots, &tables, &ctx_lens, &q_starts, &q_lens, &rows,
        ];
        let mut packed: Vec<u32> = Vec::new();
        let mut offs = [0usize; 8];
        for (o, a) in offs.iter_mut().zip(arrays) {
            *o = packed.len() * 4;
            packed.extend_from_slice(a);
            packed.resize(packed.len().next_multiple_of(4), 0);
        }
        let buf = dc.scratch_upload("step_inputs", &packed)?;
        let at = |i: usize| buf.ptr() + offs[i] as u64;

        Ok(StepInputs {
            step: plan.step,
            tokens: ids.len(),
            seqs: plan.seqs.len(),
            decode_only: plan.seqs.iter().all(|s| s.tokens.len() == 1),
            max_ctx: ctx_lens.iter().copied().max().unwrap_or(0) as usize,
            max_q: q_lens.iter().copied().max().unwrap_or(0) as usize,
            max_blocks,
            ids: at(0),
            pos: at(1),
            slots: at(2),
            tables: at(3),
            ctx_lens: at(4),
            q_starts: at(5),
            q_lens: at(6),
            logit_rows: at(7),
            num_logit_rows: rows.len(),
            all_rows: rows.iter().enumerate().all(|(i, &r)| r as usize == i)
                && rows.len() == ids.len(),
            head: plan.head,
            _buf: buf,
        })
    }
}

/// The kernel path of one worker: its device, the model and the rotary table.
pub struct DeviceCompute {
    /// Private: launches must go through [`DeviceCompute::launch`] (recorded with graphs
    /// on) and everything else through [`DeviceCompute::device`] (which issues what was
    /// recorded first).
    dev: Box<dyn Device>,
    cfg: std::sync::Arc<ModelConfig>,
    inv_freq: Buf,
    /// Temporaries by purpose, reused by every layer and step: even a pool allocation is
    /// a driver call, so per-layer allocations would add up over a decode step. Only
    /// this handle's stream touches them (what goes to a peer is a fresh copy), so a
    /// buffer is free for the next layer once this one's launches are queued. Not
    /// counted in the memory meter (which tracks weights and KV); a few activations'
    /// worth.
    scratch: Mutex<HashMap<&'static str, Arc<Buf>>>,
    exchange: Exchange,
    /// Workers on GPUs of their own: the communicators (NCCL, or the emulated twin) that
    /// carry partials and hand-offs between them (`None`: every worker on one device).
    coll: Option<Arc<CommBook>>,
    /// Launch recording for graphs (`None`: every launch goes out at once).
    graphs: Option<Mutex<Recorder>>,
    /// Every worker on this one device: the mailboxes its decode-sized all-reduces go
    /// through (`None`: buffers handed over at every exchange, see [`super::mailbox`]).
    mail: Option<Arc<Mailboxes>>,
    /// The mailboxes this worker holds (see [`HeldMailboxes`]).
    boxes: Mutex<HeldMailboxes>,
    /// Prefill-sized GEMMs on the sm_90a wgmma kernels (the device has them: compute
    /// capability 9.0), else `gemm_mma_*`: same arguments and epilogues, 1.56x the
    /// mma kernel's TFLOP/s at 4096³ on an H200 (70.9% of cuBLAS; runs 5 and 7).
    wgmma: bool,
    /// Prefill attention on tensor cores (`attn_prefill_mma_bf16`, same arguments:
    /// 15.3x the SIMT kernel at 4 x 2048 causal tokens on an H200, run 5), which takes
    /// head_dim 64 or 128 only; `attn_prefill_bf16` for the others.
    attn_mma: bool,
}

fn u(x: usize) -> Arg {
    Arg::U32(x as u32)
}

impl DeviceCompute {
    pub fn new(dev: Box<dyn Device>, cfg: std::sync::Arc<ModelConfig>) -> Result<Self> {
        if let Some(w) = cfg.sliding_window {
            return Err(Error::Unsupported(format!(
                "sliding-window attention (window {w}) is not in the device kernels yet; use --device cpu"
            )));
        }
        if !cfg.head_dim.is_multiple_of(8) || cfg.head_dim > 256 {
            return Err(Error::Unsupported(format!(
                "head_dim {}: the device attention kernels need a multiple of 8, at most 256",
                cfg.head_dim
            )));
        }
        let inv = crate::backend::cpu::ops::rope_inv_freq(&cfg);
        let inv_freq = upload_new(dev.as_ref(), &inv)?;
        let wgmma = dev.has_kernel("gemm_wgmma_bf16");
        let attn_mma = matches!(cfg.head_dim, 64 | 128);
        Ok(DeviceCompute {
            wgmma,
            attn_mma,
            dev,
            cfg,
            inv_freq,
            scratch: Mutex::new(HashMap::new()),
            exchange: Exchange::default(),
            coll: None,
            graphs: None,
            mail: None,
            boxes: Mutex::new(HeldMailboxes::default()),
        })
    }

    /// Exchanges with the group through `book`'s communicators (workers on GPUs of their
    /// own) instead of same-device buffers; only with the same-device (device) exchange.
    pub fn with_collectives(mut self, book: Arc<CommBook>) -> Self {
        self.coll = Some(book);
        self
    }

    /// The communicators this worker exchanges through, when it has a GPU of its own.
    pub fn collectives(&self) -> Option<&Arc<CommBook>> {
        self.coll.as_ref()
    }

    /// Exchanges decode-sized all-reduces through `mail`'s mailboxes (workers that
    /// share one device, same-device exchange; see [`super::mailbox`]).
    pub fn with_mailboxes(mut self, mail: Arc<Mailboxes>) -> Self {
        self.mail = Some(mail);
        self
    }

    /// How this worker exchanges partials and hidden states with its group.
    pub fn with_exchange(mut self, exchange: Exchange) -> Self {
        self.exchange = exchange;
        self
    }

    /// Launches a kernel, or records it while a segment is being recorded for graphs.
    fn launch(&self, name: &str, grid: [u32; 3], block: u32, args: &[Arg]) -> Result<()> {
        trace::timed("launch", || self.launch_now(name, grid, block, args))
    }

    fn launch_now(&self, name: &str, grid: [u32; 3], block: u32, args: &[Arg]) -> Result<()> {
        if let Some(r) = &self.graphs {
            let l = Launch {
                name: name.to_string(),
                grid,
                block,
                args: args.to_vec(),
            };
            if graph::lock(r).record(l).is_none() {
                return Ok(());
            }
        }
        // SAFETY: every call site below passes the kernel's documented parameter list
        // with pointers into live buffers sized for the launch.
        unsafe { self.dev.launch(name, grid, block, args) }
    }

    /// The device for anything but a launch: the recorded run is issued first, so the
    /// call keeps its place in the stream order (see [`super::graph`]).
    fn d(&self) -> Result<&dyn Device> {
        self.flush()?;
        Ok(self.dev.as_ref())
    }

    /// The device, for work outside this type (loads, flips, hand-offs, the step's
    /// synchronize): anything recorded is issued first (nothing is, between segments).
    pub fn device(&self) -> Result<&dyn Device> {
        self.d()
    }

    /// Issues the launches recorded so far (a no-op without graphs).
    fn flush(&self) -> Result<()> {
        match &self.graphs {
            Some(r) => graph::lock(r).flush(self.dev.as_ref()),
            None => Ok(()),
        }
    }

    /// Runs one segment's device work. With graphs on, its launches are recorded and
    /// issued as runs (replayed as graphs where they repeat, see [`super::graph`]) at
    /// the end or before any other device call; a failed segment's pending launches
    /// are dropped. Nothing the segment launched may be freed before it returns.
    pub fn segment<R>(&self, f: impl FnOnce() -> Result<R>) -> Result<R> {
        let Some(rec) = &self.graphs else {
            return f();
        };
        // (A panic in `f` drops the scope unfinished: the recorded launches go with it.)
        let scope = Recorder::enter(rec);
        let r = f();
        let ended = scope.finish(self.dev.as_ref(), r.is_ok());
        let out = r?;
        ended?;
        Ok(out)
    }

    /// Turns graphs on for this worker (see [`super::graph`]): up to `capacity` runs
    /// remembered, counted in `stats`.
    pub fn with_graphs(mut self, capacity: usize, stats: Arc<GraphStats>) -> Self {
        self.graphs = Some(Mutex::new(Recorder::new(capacity, stats)));
        self
    }

    /// Freezes the graph recorder while a switch is in flight (see
    /// [`Recorder::set_frozen`]); no-op without graphs.
    pub fn freeze_graphs(&self, frozen: bool) {
        if let Some(r) = &self.graphs {
            graph::lock(r).set_frozen(frozen);
        }
    }

    fn alloc(&self, bytes: usize) -> Result<Buf> {
        self.d()?.alloc(bytes.max(16))
    }

    /// The scratch buffer `key`, at least `bytes` long (grown to the next power of two).
    fn scratch(&self, key: &'static str, bytes: usize) -> Result<Arc<Buf>> {
        let mut m = self
            .scratch
            .lock()
            .map_err(|_| dev_err("scratch table poisoned"))?;
        if let Some(b) = m.get(key).filter(|b| b.len() >= bytes) {
            return Ok(b.clone());
        }
        let b = Arc::new(self.alloc(bytes.next_power_of_two())?);
        m.insert(key, b.clone());
        Ok(b)
    }

    /// The mailbox of group `g` in step `step` ([`HeldMailboxes::get`]).
    fn mailbox(&self, mail: &Mailboxes, g: &Group, step: u64) -> Result<Arc<Buf>> {
        self.boxes
            .lock()
            .map_err(|_| dev_err("mailbox cache poisoned"))?
            .get(mail, || self.d(), g.workers(), step)
    }

    /// Uploads `data` into scratch buffer `key`.
    pub fn scratch_upload<T: Pod>(&self, key: &'static str, data: &[T]) -> Result<Arc<Buf>> {
        let bytes = pod::bytes_of(data);
        let b = self.scratch(key, bytes.len())?;
        self.d()?.upload(&b, 0, bytes)?;
        Ok(b)
    }

    /// `out[r] = RMSNorm(x[r]) * w` for `rows` rows of the hidden size (may be in place).
    fn rmsnorm(&self, out: &Buf, x: &Buf, w: &Buf, rows: usize) -> Result<()> {
        let h = self.cfg.hidden_size;
        let args = [
            Arg::from(out),
            Arg::from(x),
            Arg::from(w),
            u(h),
            Arg::F32(self.cfg.rms_norm_eps),
        ];
        self.launch(
            "rmsnorm_bf16",
            [rows as u32, 1, 1],
            row_threads(h, 2),
            &args,
        )
    }

    /// `y[m, n] = x[m, k] · W[n, k]ᵀ (+ bias) (+ residual)`, bf16 or f32 out.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        y: u64,
        x: u64,
        w: &Buf,
        bias: u64,
        residual: u64,
        (m, n, k): (usize, usize, usize),
        f32out: bool,
    ) -> Result<()> {
        check_weight(w, n, k)?;
        let args = crate::kernels::gemm_args([y, x, w.ptr(), bias, residual], (m, n, k), (k, n));
        let out = if f32out { "_f32out" } else { "" };
        if m <= DECODE_MAX_M || k % 8 != 0 {
            let gx = (n as u32).div_ceil(DEC_COLS);
            let block = dec_block(gx, self.dev.sm_count());
            self.launch(&format!("gemm_decode_bf16{out}"), [gx, 1, 1], block, &args)
        } else if self.wgmma {
            let grid = [(n as u32).div_ceil(WG_BN), (m as u32).div_ceil(WG_BM), 1];
            self.launch(&format!("gemm_wgmma_bf16{out}"), grid, WG_THREADS, &args)
        } else {
            let grid = [(n as u32).div_ceil(128), (m as u32).div_ceil(128), 1];
            self.launch(&format!("gemm_mma_bf16{out}"), grid, 128, &args)
        }
    }

    /// The q, k and v projections of a decode-sized step (`m` rows of `x`, `k` wide) in
    /// one launch of the grouped decode GEMM, two launches fewer per layer. Its block size
    /// is chosen for the whole grid, so where that differs from what three
    /// [`DeviceCompute::gemm`] launches would pick (small k/v grids on a GPU with few
    /// SMs) the K split, and so the last bits of the sums, differ from theirs; at equal
    /// block size the results are identical. Each entry is (output, weight `[n, k]`,
    /// bias pointer or 0, n). `norm`: the layer's input RMSNorm weight, applied to `x`
    /// inside the kernel (`x` is then the raw hidden state; needs `k % 8 == 0`, see
    /// [`fuse_norm`]), or `None` when `x` is normalized already.
    fn decode_qkv(
        &self,
        qkv: &[(&Arc<Buf>, &Buf, u64, usize); 3],
        x: &Buf,
        norm: Option<&Buf>,
        (m, k): (usize, usize),
    ) -> Result<()> {
        for (_, w, _, n) in qkv {
            check_weight(w, *n, k)?;
        }
        let gx: u32 = qkv.iter().map(|e| (e.3 as u32).div_ceil(DEC_COLS)).sum();
        let block = dec_block(gx, self.dev.sm_count());
        let mut args: Vec<Arg> = qkv.iter().map(|e| Arg::from(e.0)).collect();
        args.push(Arg::from(x));
        args.extend(qkv.iter().map(|e| Arg::from(e.1)));
        args.extend(qkv.iter().map(|e| Arg::Ptr(e.2)));
        args.extend(self.norm_args(norm));
        args.push(u(m));
        args.extend(qkv.iter().map(|e| u(e.3)));
        args.extend([u(k), u(k)]);
        self.launch("gemm_decode_qkv_bf16", [gx, 1, 1], block, &args)
    }

    /// RoPE on `t` rows of q and k (heads of `hd`) in place, then k and v into their
    /// KV-cache slots: one launch (`rope_kv_write_bf16`).
    fn rope_kv_write(
        &self,
        q: &Buf,
        k: &Buf,
        v: &Buf,
        kv: &DevKv,
        inp: &StepInputs,
        (t, nq, nkv, hd): (usize, usize, usize, usize),
    ) -> Result<()> {
        self.launch(
            "rope_kv_write_bf16",
            [t as u32, 1, 1],
            row_threads((nq + nkv) * hd / 2, 2),
            &[
                Arg::from(q),
                Arg::from(k),
                Arg::from(v),
                Arg::Ptr(inp.pos),
                Arg::from(&self.inv_freq),
                Arg::from(&kv.k),
                Arg::from(&kv.v),
                Arg::Ptr(inp.slots),
                u(nq),
                u(nkv),
                u(hd),
                u(nq * hd),
                u(nkv * hd),
                u(nkv * hd),
            ],
        )
    }

    /// A decode step's input RMSNorm, q/k/v projections, RoPE and KV-cache write in one
    /// launch (`gemm_decode_qkv_rope_bf16`: the same bits as [`DeviceCompute::decode_qkv`]
    /// with the norm, then [`DeviceCompute::rope_kv_write`]): q rotated into `qkv[0]`'s
    /// buffer, k and v straight into their cache slots. `x` is the raw hidden state;
    /// needs `k % 8 == 0` ([`fuse_norm`]) and `hd % 16 == 0`.
    #[allow(clippy::too_many_arguments)]
    fn decode_qkv_rope(
        &self,
        qkv: &[(&Arc<Buf>, &Buf, u64, usize); 3],
        x: &Buf,
        norm: &Buf,
        kv: &DevKv,
        inp: &StepInputs,
        (m, k): (usize, usize),
        hd: usize,
    ) -> Result<()> {
        for (_, w, _, n) in qkv {
            check_weight(w, *n, k)?;
        }
        let (nq, nkv) = (qkv[0].3, qkv[1].3);
        let gx = ((nq + 2 * nkv) / DEC_COLS as usize) as u32;
        let block = dec_block(gx, self.dev.sm_count());
        let mut args = vec![Arg::from(qkv[0].0), Arg::from(x)];
        args.extend(qkv.iter().map(|e| Arg::from(e.1)));
        args.extend(qkv.iter().map(|e| Arg::Ptr(e.2)));
        args.extend(self.norm_args(Some(norm)));
        args.extend([
            Arg::Ptr(inp.pos),
            Arg::from(&self.inv_freq),
            Arg::from(&kv.k),
            Arg::from(&kv.v),
            Arg::Ptr(inp.slots),
        ]);
        args.extend([m, nq, nkv, k, k, hd].map(u));
        self.launch("gemm_decode_qkv_rope_bf16", [gx, 1, 1], block, &args)
    }

    /// The `norm, eps` arguments of a fused-norm decode kernel (null pointer: none).
    fn norm_args(&self, norm: Option<&Buf>) -> [Arg; 2] {
        [
            norm.map_or(Arg::Ptr(0), Arg::from),
            Arg::F32(self.cfg.rms_norm_eps),
        ]
    }

    /// Sums a tensor-parallel group's f32 partials `[rows, cols]` through `comm`, adds
    /// `bias` and rounds to bf16; returns the device buffer of the result.
    fn reduce_partials(
        &self,
        comm: &Comm,
        g: &Group,
        part: &Buf,
        (rows, cols): (usize, usize),
        step: u64,
        bias: Option<&Buf>,
    ) -> Result<Arc<Buf>> {
        let mut sum: Vec<f32> = download_vec(self.d()?, part, rows * cols)?;
        comm.all_reduce_sum(g.workers(), step, &mut sum)?;
        let b: Option<Vec<bf16>> = match bias {
            Some(b) => Some(download_vec(self.d()?, b, cols)?),
            None => None,
        };
        let out: Vec<bf16> = sum
            .chunks_exact(cols.max(1))
            .flat_map(|r| {
                r.iter().enumerate().map(|(c, &v)| match &b {
                    Some(b) => bf16::from_f32(v + b[c].to_f32()),
                    None => bf16::from_f32(v),
                })
            })
            .collect();
        self.scratch_upload("reduced", &out)
    }

    /// The embedding segment: this worker's vocabulary rows, summed over the group.
    pub fn embed(
        &self,
        comm: &Comm,
        g: &Group,
        s: &DevShards,
        inp: &StepInputs,
    ) -> Result<Arc<Buf>> {
        let _nvtx = nvtx::range("embed");
        let h = self.cfg.hidden_size;
        let vocab = TensorKind::Embed
            .region(&self.cfg, s.group_size, s.index)
            .rows;
        // The hidden state lives in a scratch buffer too: one per worker per step.
        let x = self.scratch("hidden", inp.tokens * h * 2)?;
        self.launch(
            "embedding_bf16",
            [inp.tokens as u32, 1, 1],
            row_threads(h, 2),
            &[
                Arg::from(&x),
                Arg::from(s.get(TensorKind::Embed)?),
                Arg::Ptr(inp.ids),
                u(h),
                u(vocab.start),
                u(vocab.end),
            ],
        )?;
        if g.len() == 1 {
            return Ok(x);
        }
        // Exactly one member holds each token's row (the others' are zero), so the sum is
        // exact in any order and either exchange gives the same bits.
        let _ar = nvtx::range("embed all-reduce");
        if self.exchange == Exchange::SameDevice {
            let me = crate::parallel::WorkerId(comm.me());
            let idx = g
                .position(me)
                .ok_or_else(|| dev_err(format!("{me} is not in group {g}")))?;
            let n = inp.tokens * h;
            let grid = [n.div_ceil(BLOCK as usize).min(1024) as u32, 1, 1];
            if let Some(book) = &self.coll {
                // Every member's rows in its slot, then the peers' added in group order.
                let c = book.group(me, g)?;
                let slots = self.scratch("gather", g.len() * n * 2)?;
                self.d()?.copy(&slots, idx * n * 2, &x, 0, n * 2)?;
                self.all_gather(comm, g, idx, &c, inp.step, &slots, n * 2)?;
                for j in (0..g.len()).filter(|&j| j != idx) {
                    self.launch(
                        "residual_add_bf16",
                        grid,
                        BLOCK,
                        &[
                            Arg::from(&x),
                            Arg::from(&x),
                            Arg::Ptr(slots.at(j * n * 2)?),
                            u(n),
                        ],
                    )?;
                }
                return Ok(x);
            }
            self.share_with_group(comm, g, idx, inp.step, &x, 0, n * 2, |_, b| {
                self.launch(
                    "residual_add_bf16",
                    grid,
                    BLOCK,
                    &[Arg::from(&x), Arg::from(&x), Arg::from(b), u(n)],
                )
            })?;
            return Ok(x);
        }
        let rows: Vec<bf16> = download_vec(self.d()?, &x, inp.tokens * h)?;
        let mut sum: Vec<f32> = rows.iter().map(|v| v.to_f32()).collect();
        comm.all_reduce_sum(g.workers(), inp.step, &mut sum)?;
        let b: Vec<bf16> = sum.iter().map(|&v| bf16::from_f32(v)).collect();
        self.scratch_upload("hidden", &b)
    }

    /// One decoder layer on this worker's shard; updates the hidden state `x` in place.
    #[allow(clippy::too_many_arguments)]
    pub fn layer(
        &self,
        comm: &Comm,
        g: &Group,
        l: LayerId,
        s: &DevShards,
        kv: &DevKv,
        geom: KvGeometry,
        inp: &StepInputs,
        x: &Buf,
    ) -> Result<()> {
        let _nvtx = nvtx::range_with(|| l.to_string());
        let cfg = &*self.cfg;
        let (h, hd, t) = (cfg.hidden_size, cfg.head_dim, inp.tokens);
        let heads = HeadShard::new(cfg, s.group_size, s.index);
        if kv.kv_heads != heads.kv_heads {
            return Err(dev_err(format!(
                "layer {}: resident KV heads {:?}, placement needs {:?}",
                l.0, kv.kv_heads, heads.kv_heads
            )));
        }
        let (nq, nkv) = (heads.q_heads.len(), heads.kv_heads.len());

        // Attention block.
        let half = nvtx::range_with(|| format!("{l} attention"));
        let xn = self.scratch("xn", t * h * 2)?;
        let fused = fuse_norm(t, h);
        let input_norm = s.get(TensorKind::InputNorm(l))?;
        if !fused {
            self.rmsnorm(&xn, x, input_norm, t)?;
        }
        let q = self.scratch("q", t * nq * hd * 2)?;
        let k = self.scratch("k", t * nkv * hd * 2)?;
        let v = self.scratch("v", t * nkv * hd * 2)?;
        let qkv = [
            (
                &q,
                s.get(TensorKind::Q(l))?,
                s.ptr(TensorKind::QBias(l)),
                nq * hd,
            ),
            (
                &k,
                s.get(TensorKind::K(l))?,
                s.ptr(TensorKind::KBias(l)),
                nkv * hd,
            ),
            (
                &v,
                s.get(TensorKind::V(l))?,
                s.ptr(TensorKind::VBias(l)),
                nkv * hd,
            ),
        ];
        if fused && hd % DEC_COLS as usize == 0 {
            // norm, q/k/v, RoPE and the KV-cache write in one launch
            self.decode_qkv_rope(&qkv, x, input_norm, kv, inp, (t, h), hd)?;
        } else {
            if fused {
                self.decode_qkv(&qkv, x, Some(input_norm), (t, h))?;
            } else if t <= DECODE_MAX_M || h % 8 != 0 {
                self.decode_qkv(&qkv, &xn, None, (t, h))?;
            } else {
                for (out, w, b, n) in qkv {
                    self.gemm(out.ptr(), xn.ptr(), w, b, 0, (t, n, h), false)?;
                }
            }
            self.rope_kv_write(&q, &k, &v, kv, inp, (t, nq, nkv, hd))?;
        }
        let attn = self.scratch("attn", t * nq * hd * 2)?;
        self.attention(&attn, &q, kv, nq, nkv, geom, inp)?;
        self.project_residual(
            comm,
            g,
            s,
            &attn,
            TensorKind::O(l),
            TensorKind::OBias(l),
            nq * hd,
            inp,
            x,
        )?;

        // MLP block.
        drop(half);
        let _half = nvtx::range_with(|| format!("{l} mlp"));
        let post_norm = s.get(TensorKind::PostNorm(l))?;
        let inter = TensorKind::Gate(l)
            .region(cfg, s.group_size, s.index)
            .rows
            .len();
        let act = self.scratch("act", t * inter * 2)?;
        let (wg, wu) = (s.get(TensorKind::Gate(l))?, s.get(TensorKind::Up(l))?);
        let biased = s.tensors.contains_key(&TensorKind::GateBias(l))
            || s.tensors.contains_key(&TensorKind::UpBias(l));
        // the norm goes into the gate/up decode GEMM unless a separate launch needs xn
        let fused = fuse_norm(t, h) && !biased;
        if !fused {
            self.rmsnorm(&xn, x, post_norm, t)?;
        }
        if biased {
            // No fused kernel with biases: two GEMMs, then SiLU·mul.
            let up = self.scratch("up", t * inter * 2)?;
            self.gemm(
                act.ptr(),
                xn.ptr(),
                wg,
                s.ptr(TensorKind::GateBias(l)),
                0,
                (t, inter, h),
                false,
            )?;
            self.gemm(
                up.ptr(),
                xn.ptr(),
                wu,
                s.ptr(TensorKind::UpBias(l)),
                0,
                (t, inter, h),
                false,
            )?;
            self.launch(
                "silu_mul_bf16",
                [(t * inter).div_ceil(BLOCK as usize).min(1024) as u32, 1, 1],
                BLOCK,
                &[
                    Arg::from(&act),
                    Arg::from(&act),
                    Arg::from(&up),
                    u(t),
                    u(inter),
                    u(inter),
                    u(inter),
                ],
            )?;
        } else {
            let args = [
                Arg::from(&act),
                Arg::from(&xn),
                Arg::from(wg),
                Arg::from(wu),
                u(t),
                u(inter),
                u(h),
                u(h),
                u(inter),
            ];
            if t <= DECODE_MAX_M || h % 8 != 0 {
                let gx = (inter as u32).div_ceil(8);
                let block = dec_block(gx, self.dev.sm_count());
                // (x, norm, eps) in place of the normalized xn when fused
                let (src, norm) = if fused {
                    (Arg::from(x), Some(post_norm))
                } else {
                    (Arg::from(&xn), None)
                };
                let mut dargs = vec![args[0], src, args[2], args[3]];
                dargs.extend(self.norm_args(norm));
                dargs.extend_from_slice(&args[4..]);
                self.launch("gemm_decode_silu_bf16", [gx, 1, 1], block, &dargs)?;
            } else if self.wgmma {
                // (SiLU: gate and up columns share a tile, so half of WG_BN per block)
                let grid = [
                    (inter as u32).div_ceil(WG_BN / 2),
                    (t as u32).div_ceil(WG_BM),
                    1,
                ];
                self.launch("gemm_wgmma_silu_bf16", grid, WG_THREADS, &args)?;
            } else {
                let grid = [(inter as u32).div_ceil(64), (t as u32).div_ceil(128), 1];
                self.launch("gemm_mma_silu_bf16", grid, 128, &args)?;
            }
        }
        self.project_residual(
            comm,
            g,
            s,
            &act,
            TensorKind::Down(l),
            TensorKind::DownBias(l),
            inter,
            inp,
            x,
        )
    }

    /// `x += in · Wᵀ (+ bias)` for a RowParallel weight: fused into the GEMM's epilogue
    /// on one rank; across a group, f32 partials summed through the Comm layer.
    #[allow(clippy::too_many_arguments)]
    fn project_residual(
        &self,
        comm: &Comm,
        g: &Group,
        s: &DevShards,
        input: &Buf,
        w: TensorKind,
        bias: TensorKind,
        k: usize,
        inp: &StepInputs,
        x: &Buf,
    ) -> Result<()> {
        let (h, t) = (self.cfg.hidden_size, inp.tokens);
        let kind = w;
        let w = s.get(w)?;
        if g.len() == 1 {
            return self.gemm(
                x.ptr(),
                input.ptr(),
                w,
                s.ptr(bias),
                x.ptr(),
                (t, h, k),
                false,
            );
        }
        if self.exchange == Exchange::SameDevice {
            let ar = nvtx::range_with(|| all_reduce_name(kind));
            let set = match kind {
                TensorKind::O(_) => MailSet::Attention,
                _ => MailSet::Mlp,
            };
            let r =
                self.reduce_on_device(comm, g, inp.step, set, input, w, s.ptr(bias), (t, h, k), x);
            drop(ar);
            return r;
        }
        let part = self.scratch("part", t * h * 4)?;
        self.gemm(part.ptr(), input.ptr(), w, 0, 0, (t, h, k), true)?;
        let ar = nvtx::range_with(|| all_reduce_name(kind));
        let o = self.reduce_partials(comm, g, &part, (t, h), inp.step, s.tensors.get(&bias))?;
        drop(ar);
        self.launch(
            "residual_add_bf16",
            [(t * h).div_ceil(BLOCK as usize).min(1024) as u32, 1, 1],
            BLOCK,
            &[Arg::from(x), Arg::from(x), Arg::from(&o), u(t * h)],
        )
    }

    /// `x += Σ_group (input · Wᵀ) (+ bias)` across a group of ranks (this member's part
    /// of `set` of its mailbox on decode-sized steps): this member's f32 partial goes
    /// into its slot of `[group, t, h]` and the peers' partials into theirs — through
    /// the group's mailbox ([`super::mailbox`]: written in place, an event posted to
    /// the peers), through a copy handed to every peer ([`DeviceCompute::share_with_group`],
    /// larger steps), or all-gathered by NCCL (workers on GPUs of their own) — then one
    /// split-K reduce launch sums the slots in group order and applies the bias, bf16
    /// rounding and residual add of the one-rank GEMM.
    #[allow(clippy::too_many_arguments)]
    fn reduce_on_device(
        &self,
        comm: &Comm,
        g: &Group,
        step: u64,
        set: MailSet,
        input: &Buf,
        w: &Buf,
        bias: u64,
        (t, h, k): (usize, usize, usize),
        x: &Buf,
    ) -> Result<()> {
        let me = crate::parallel::WorkerId(comm.me());
        let idx = g
            .position(me)
            .ok_or_else(|| dev_err(format!("{me} is not in group {g}")))?;
        let part_bytes = t * h * 4;
        if let (None, Some(mail)) = (&self.coll, &self.mail) {
            if t <= MAILBOX_TOKENS {
                let mb = self.mailbox(mail, g, step)?;
                let at = |j: usize| mb.at(mail.slot_offset(g.len(), set, j, part_bytes));
                self.gemm(at(idx)?, input.ptr(), w, 0, 0, (t, h, k), true)?;
                self.post_to_group(comm, g, idx, step, part_bytes)?;
                mail.count_post();
                return self.reduce_slots(at(0)?, bias, (t, h), g.len(), x);
            }
        }
        let red = self.scratch("reduce", g.len() * part_bytes)?;
        self.gemm(
            red.at(idx * part_bytes)?,
            input.ptr(),
            w,
            0,
            0,
            (t, h, k),
            true,
        )?;
        match &self.coll {
            Some(book) => {
                let c = book.group(me, g)?;
                self.all_gather(comm, g, idx, &c, step, &red, part_bytes)?;
            }
            None => self.share_with_group(
                comm,
                g,
                idx,
                step,
                &red,
                idx * part_bytes,
                part_bytes,
                |j, b| self.d()?.copy(&red, j * part_bytes, b, 0, part_bytes),
            )?,
        }
        self.reduce_slots(red.ptr(), bias, (t, h), g.len(), x)
    }

    /// `x = bf16(Σ_j slots[j] (+ bias)) + x` over `members` f32 slots `[t, h]` packed
    /// from `slots`, in member order: the split-K reduce kernel's ordered sum and the
    /// one-rank GEMM's epilogue.
    fn reduce_slots(
        &self,
        slots: u64,
        bias: u64,
        (t, h): (usize, usize),
        members: usize,
        x: &Buf,
    ) -> Result<()> {
        let n = (t * h) as u32;
        self.launch(
            "gemm_splitk_reduce_bf16",
            [n.div_ceil(256).max(1), 1, 1],
            256,
            &[
                Arg::from(x),
                Arg::Ptr(slots),
                Arg::Ptr(bias),
                Arg::from(x),
                u(t),
                u(h),
                u(h),
                u(members),
            ],
        )
    }

    /// The mailbox half of an exchange in group `g` (this worker is member `idx`): this
    /// worker's `bytes` in its slot are ready after the work queued so far, which an
    /// event tells every peer through the Comm layer; then this stream waits for every
    /// peer's event, in group order. Like [`Self::share_with_group`], no host wait on
    /// the device.
    fn post_to_group(
        &self,
        comm: &Comm,
        g: &Group,
        idx: usize,
        step: u64,
        bytes: usize,
    ) -> Result<()> {
        let ready = self.d()?.record()?;
        for (j, peer) in g.workers().iter().enumerate() {
            if j != idx {
                comm.send_posted(peer.0, Tag::AllReduce(step), ready.clone(), bytes as u64)?;
            }
        }
        for (j, peer) in g.workers().iter().enumerate() {
            if j != idx {
                let (e, n) = trace::timed("exchange wait", || {
                    comm.recv_posted(peer.0, Tag::AllReduce(step))
                })?;
                if n != bytes as u64 {
                    return Err(dev_err(format!(
                        "mailbox exchange from {peer}: {n} B, expected {bytes}"
                    )));
                }
                self.d()?.wait(&e)?;
            }
        }
        Ok(())
    }

    /// Same-device exchange within group `g` (this worker is member `idx`) in step
    /// `step`: a copy of `bytes` bytes of `src` from `off` (a fresh buffer, marked ready
    /// by an event on this stream) goes to every peer through the Comm layer, one buffer
    /// shared by all of them (each only reads it; counted once per peer), and
    /// `each(j, buf)` queues this worker's use of member `j`'s buffer, in group order,
    /// after its stream waits for the sender's event. Nothing here blocks the host: a
    /// buffer is freed after every stream's queued work once its last reader drops it.
    #[allow(clippy::too_many_arguments)]
    fn share_with_group(
        &self,
        comm: &Comm,
        g: &Group,
        idx: usize,
        step: u64,
        src: &Buf,
        off: usize,
        bytes: usize,
        mut each: impl FnMut(usize, &Buf) -> Result<()>,
    ) -> Result<()> {
        if g.len() > 1 {
            // One copy for the whole group (every peer only reads it): an allocation and
            // a copy per exchange, not per peer (at tp4 on one GPU the host's driver
            // calls are the step's bottleneck: docs/gpu-results.md, run 8).
            let mut out = trace::timed("exchange send", || -> Result<Buf> {
                let b = self.alloc(bytes)?;
                self.d()?.copy(&b, 0, src, off, bytes)?;
                Ok(b)
            })?;
            // A peer's stream waits for this event before reading.
            out.set_ready(self.d()?.record()?);
            let out = Arc::new(out);
            for (j, peer) in g.workers().iter().enumerate() {
                if j != idx {
                    comm.send_shared(peer.0, Tag::AllReduce(step), out.clone())?;
                }
            }
        }
        for (j, peer) in g.workers().iter().enumerate() {
            if j != idx {
                let b = trace::timed("exchange wait", || {
                    comm.recv_shared(peer.0, Tag::AllReduce(step))
                })?;
                if b.len() < bytes {
                    return Err(dev_err(format!(
                        "exchange from {peer}: {} B, expected {bytes}",
                        b.len()
                    )));
                }
                wait_ready(self.d()?, &b)?;
                each(j, &b)?;
                // `b` is freed at the end of this iteration, and a free is ordered only
                // after work already issued: issue what `each` recorded.
                self.flush()?;
            }
        }
        Ok(())
    }

    /// All-gather within group `g` (this worker is member `idx`, rank `idx` of `c`, the
    /// group's communicator) in step `step`, in place over `g.len()` slots of `bytes`
    /// bytes of `slots`: a notice to every peer through the Comm layer first (it counts
    /// the slot this worker's data fills at each peer, as the same-device exchange
    /// counts its copies, and its receipt checks that every peer is in this step before
    /// the collective is queued), then the collective on this worker's stream.
    #[allow(clippy::too_many_arguments)]
    fn all_gather(
        &self,
        comm: &Comm,
        g: &Group,
        idx: usize,
        c: &Communicator,
        step: u64,
        slots: &Buf,
        bytes: usize,
    ) -> Result<()> {
        if c.rank() != idx || c.size() != g.len() {
            return Err(dev_err(format!(
                "communicator rank {} of {} for member {idx} of group {g}",
                c.rank(),
                c.size()
            )));
        }
        let tag = Tag::AllReduce(step);
        let peers = || g.workers().iter().enumerate().filter(|&(j, _)| j != idx);
        for (_, peer) in peers() {
            comm.send_wire(peer.0, tag, bytes as u64)?;
        }
        for (_, peer) in peers() {
            let got = comm.recv_wire(peer.0, tag)?;
            if got != bytes as u64 {
                return Err(dev_err(format!(
                    "all-gather with {peer}: {got} B a slot, expected {bytes}"
                )));
            }
        }
        c.queue(self.d()?, &[CollOp::AllGather { buf: slots, bytes }])
    }

    /// Sends `n` bf16 values of the hidden state `x` to worker `to` (on another GPU)
    /// through the all-worker communicator, after a counted notice.
    pub fn send_hidden(
        &self,
        comm: &Comm,
        x: &Buf,
        n: usize,
        to: WorkerId,
        tag: Tag,
    ) -> Result<()> {
        let book = self
            .coll
            .as_ref()
            .ok_or_else(|| dev_err("no communicators"))?;
        let c = book.p2p(WorkerId(comm.me()))?;
        comm.send_wire(to.0, tag, (n * 2) as u64)?;
        c.queue(
            self.d()?,
            &[CollOp::Send {
                buf: x,
                off: 0,
                bytes: n * 2,
                peer: to.0,
            }],
        )
    }

    /// Receives `n` bf16 values of a hidden state sent with [`Self::send_hidden`] from
    /// worker `from` into a fresh buffer (this stream's later work reads it after the
    /// receive: stream order).
    pub fn recv_hidden(&self, comm: &Comm, n: usize, from: WorkerId, tag: Tag) -> Result<Buf> {
        let book = self
            .coll
            .as_ref()
            .ok_or_else(|| dev_err("no communicators"))?;
        let c = book.p2p(WorkerId(comm.me()))?;
        let got = comm.recv_wire(from.0, tag)?;
        if got != (n * 2) as u64 {
            return Err(dev_err(format!(
                "hand-off from {from}: {got} B, expected {} B",
                n * 2
            )));
        }
        let b = self.alloc(n * 2)?;
        c.queue(
            self.d()?,
            &[CollOp::Recv {
                buf: &b,
                off: 0,
                bytes: n * 2,
                peer: from.0,
            }],
        )?;
        Ok(b)
    }

    /// A hidden state of `n` bf16 values handed to the next pipeline stage on the same
    /// device: a copy in a fresh buffer whose ownership moves with the message, marked
    /// ready after the copy (the receiver waits for it: [`super::wait_ready`]).
    pub fn hidden_for_peer(&self, x: &Buf, n: usize) -> Result<Buf> {
        let mut b = self.alloc(n * 2)?;
        self.d()?.copy(&b, 0, x, 0, n * 2)?;
        mark_ready(self.d()?, &mut b)?;
        Ok(b)
    }

    pub fn exchange(&self) -> Exchange {
        self.exchange
    }

    /// Paged attention of the step's queries: the decode kernel (split-K over long
    /// contexts) when every sequence has one new token, the causal prefill kernel else.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        out: &Buf,
        q: &Buf,
        kv: &DevKv,
        nq: usize,
        nkv: usize,
        geom: KvGeometry,
        inp: &StepInputs,
    ) -> Result<()> {
        let hd = self.cfg.head_dim;
        let scale = Arg::F32(1.0 / (hd as f32).sqrt());
        let gx = (nkv * (nq / nkv).div_ceil(4)) as u32;
        let common = [
            u(nq),
            u(nkv),
            u(hd),
            u(geom.block_size),
            u(inp.max_blocks),
            u(nq * hd),
        ];
        if !inp.decode_only {
            let mut args = vec![
                Arg::from(out),
                Arg::from(q),
                Arg::from(&kv.k),
                Arg::from(&kv.v),
                Arg::Ptr(inp.tables),
                Arg::Ptr(inp.ctx_lens),
                Arg::Ptr(inp.q_starts),
                Arg::Ptr(inp.q_lens),
            ];
            args.extend_from_slice(&common);
            args.push(scale);
            if self.attn_mma {
                // One block per (q head, 64-query tile, sequence), 4 warps.
                return self.launch(
                    "attn_prefill_mma_bf16",
                    [
                        nq as u32,
                        (inp.max_q as u32).div_ceil(FA_BM),
                        inp.seqs as u32,
                    ],
                    FA_THREADS,
                    &args,
                );
            }
            return self.launch(
                "attn_prefill_bf16",
                [gx, (inp.max_q as u32).div_ceil(4), inp.seqs as u32],
                BLOCK,
                &args,
            );
        }
        // Split long contexts so that about two blocks per SM are busy.
        let blocks = gx as usize * inp.seqs;
        let want = (2 * self.dev.sm_count() as usize).div_ceil(blocks.max(1));
        let split_tokens = inp.max_ctx.div_ceil(want.max(1)).div_ceil(256).max(1) * 256;
        let splits = inp.max_ctx.div_ceil(split_tokens).max(1);
        let (o_part, ml_part) = if splits > 1 {
            (
                Some(self.scratch("o_part", inp.seqs * nq * splits * hd * 4)?),
                Some(self.scratch("ml_part", inp.seqs * nq * splits * 2 * 4)?),
            )
        } else {
            (None, None)
        };
        let p = |b: &Option<Arc<Buf>>| Arg::Ptr(b.as_ref().map_or(0, |b| b.ptr()));
        let mut args = vec![
            Arg::from(out),
            p(&o_part),
            p(&ml_part),
            Arg::from(q),
            Arg::from(&kv.k),
            Arg::from(&kv.v),
            Arg::Ptr(inp.tables),
            Arg::Ptr(inp.ctx_lens),
        ];
        args.extend_from_slice(&common);
        args.push(u(split_tokens));
        args.push(scale);
        // The cp.async-pipelined kernel (same parameters, launch shape and outputs as
        // `attn_decode_bf16`): 2.03x its bandwidth at batch 32, 4k context on an H200
        // (run 5 in docs/gpu-results.md).
        self.launch(
            "attn_decode_pipelined_bf16",
            [gx, inp.seqs as u32, splits as u32],
            BLOCK,
            &args,
        )?;
        if splits > 1 {
            self.launch(
                "attn_decode_combine_bf16",
                [nq as u32, inp.seqs as u32, 1],
                BLOCK,
                &[
                    Arg::from(out),
                    p(&o_part),
                    p(&ml_part),
                    Arg::Ptr(inp.ctx_lens),
                    u(nq),
                    u(hd),
                    u(splits),
                    u(split_tokens),
                ],
            )?;
        }
        Ok(())
    }

    /// The LM head on this worker's vocabulary slice: f32 logits of the wanted rows, or
    /// only each row's greedy pick in the slice (`argmax_f32` on the device, see
    /// [`HeadOutput`]), sent to the driver (which gathers the slices) through the Comm
    /// layer.
    pub fn head(&self, comm: &Comm, s: &DevShards, inp: &StepInputs, x: &Buf) -> Result<()> {
        let _nvtx = nvtx::range("lm head");
        let h = self.cfg.hidden_size;
        let r = inp.num_logit_rows;
        let v_local = s.get(TensorKind::LmHead)?.len() / (2 * h);
        let mut sent = Vec::new();
        if r > 0 {
            let sel = self.scratch("sel", r * h * 2)?;
            let final_norm = s.get(TensorKind::FinalNorm)?;
            if inp.all_rows {
                // every row, in order (decode): normalized straight out of x
                self.rmsnorm(&sel, x, final_norm, r)?;
            } else {
                // The embedding kernel is a row gather: rows `logit_rows` of x.
                self.launch(
                    "embedding_bf16",
                    [r as u32, 1, 1],
                    row_threads(h, 2),
                    &[
                        Arg::from(&sel),
                        Arg::from(x),
                        Arg::Ptr(inp.logit_rows),
                        u(h),
                        u(0),
                        u(inp.tokens),
                    ],
                )?;
                self.rmsnorm(&sel, &sel, final_norm, r)?;
            }
            let out = self.scratch("logits", r * v_local * 4)?;
            self.gemm(
                out.ptr(),
                sel.ptr(),
                s.get(TensorKind::LmHead)?,
                0,
                0,
                (r, v_local, h),
                true,
            )?;
            sent = match inp.head {
                HeadOutput::Logits => download_vec(self.d()?, &out, r * v_local)?,
                HeadOutput::Argmax => {
                    // Indices, then values, in one buffer: one download.
                    let picks = self.scratch("picks", r * 8)?;
                    self.launch(
                        "argmax_f32",
                        [r as u32, 1, 1],
                        row_threads(v_local, 8),
                        &[
                            Arg::from(&picks),
                            Arg::Ptr(picks.at(r * 4)?),
                            Arg::from(&out),
                            u(v_local),
                        ],
                    )?;
                    let p: Vec<u32> = download_vec(self.d()?, &picks, 2 * r)?;
                    let values: Vec<f32> = p[r..].iter().map(|&b| f32::from_bits(b)).collect();
                    sampling::pack_picks(&values, &p[..r])
                }
            };
        }
        comm.send(comm.driver(), Tag::Logits(inp.step), sent)
    }

    /// The hidden state for a hand-off: downloaded as f32 (bf16 values, exact).
    pub fn hidden_to_host(&self, x: &Buf, n: usize) -> Result<Vec<f32>> {
        let b: Vec<bf16> = download_vec(self.d()?, x, n)?;
        Ok(b.iter().map(|v| v.to_f32()).collect())
    }

    /// A hidden state handed over by a peer on this device (its buffer, of `n` bf16
    /// values), copied into this worker's own hidden-state scratch buffer: the layers
    /// then launch on the same address every step, so their runs repeat (graphs), where
    /// a fresh pool buffer per step would change them. The received buffer is freed
    /// after the copy (stream-ordered).
    pub fn adopt_hidden(&self, b: Buf, n: usize) -> Result<Arc<Buf>> {
        let d = self.d()?;
        wait_ready(d, &b)?;
        let x = self.scratch("hidden", n * 2)?;
        d.copy(&x, 0, &b, 0, n * 2)?;
        Ok(x)
    }

    /// A received hidden state, back on this device.
    pub fn hidden_from_host(&self, v: &[f32]) -> Result<Arc<Buf>> {
        let b: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
        self.scratch_upload("hidden", &b)
    }
}

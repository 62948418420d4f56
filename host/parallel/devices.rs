//! Workers on devices: which GPU each worker runs on, which transport links two workers,
//! and which communicators a placement needs. Pure logic, tested on the CPU; the CUDA
//! backend builds streams and communicators from it.
//!
//! - Several workers may share one GPU (the test machine has one): NCCL refuses two
//!   ranks of one communicator on the same device, so such pairs use the same-device
//!   transport (device-to-device copies and a reduce kernel) and NCCL serves the rest.
//! - Communicators for a placement are split from one world communicator
//!   (`ncclCommSplit`), one split per distinct group of the placement: every world rank
//!   calls the split with the group's color if it is a member (key = its index in the
//!   group) or `NCCL_SPLIT_NOCOLOR` otherwise. A reconfiguration only adds splits for
//!   its new groups; nothing is re-initialised.
//! - The KV cache is sized from the device's free memory after the weights, keeping a
//!   stated reserve for activations and the reshard window
//!   ([`kv_blocks_from_free_memory`], [`kv_reserve_bytes`], [`kv_blocks_cap`]).

use super::shard::HeadShard;
use super::{Group, Placement, Segment, Topology, WorkerId};
use crate::error::{Error, Result};
use crate::model::ModelConfig;

/// A GPU ordinal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub usize);

/// How two workers exchange bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Same worker: a local copy.
    Local,
    /// Different workers on one GPU: device-to-device copies (+ a reduce kernel).
    SameDevice,
    /// Different GPUs: NCCL.
    Nccl,
}

/// Which device each worker runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceMap {
    device_of: Vec<DeviceId>,
}

impl DeviceMap {
    /// `workers` workers spread over `devices` GPUs: worker `w` on device `w % devices`
    /// (one worker per GPU when there are enough GPUs).
    pub fn round_robin(workers: usize, devices: usize) -> Result<Self> {
        if devices == 0 {
            return Err(Error::Device("no CUDA device".into()));
        }
        Ok(DeviceMap {
            device_of: (0..workers).map(|w| DeviceId(w % devices)).collect(),
        })
    }

    pub fn device(&self, w: WorkerId) -> DeviceId {
        self.device_of[w.0]
    }

    /// Devices the map spreads workers over (the highest ordinal used, plus one).
    pub fn num_devices(&self) -> usize {
        self.device_of.iter().map(|d| d.0 + 1).max().unwrap_or(0)
    }

    pub fn num_workers(&self) -> usize {
        self.device_of.len()
    }

    pub fn transport(&self, a: WorkerId, b: WorkerId) -> Transport {
        if a == b {
            Transport::Local
        } else if self.device(a) == self.device(b) {
            Transport::SameDevice
        } else {
            Transport::Nccl
        }
    }

    /// Whether NCCL can run `group` as one communicator (all members on distinct GPUs).
    pub fn nccl_capable(&self, group: &Group) -> bool {
        let mut devs: Vec<DeviceId> = group.workers().iter().map(|&w| self.device(w)).collect();
        devs.sort();
        devs.windows(2).all(|p| p[0] != p[1])
    }
}

/// One `ncclCommSplit` of the world communicator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommSplit {
    pub group: Group,
    /// The split's color (members pass it; others pass NCCL_SPLIT_NOCOLOR).
    pub color: u32,
}

impl CommSplit {
    /// What world rank `w` passes to the split: `Some((color, key))` or `None` for
    /// NCCL_SPLIT_NOCOLOR.
    pub fn args_for(&self, w: WorkerId) -> Option<(u32, u32)> {
        self.group.position(w).map(|i| (self.color, i as u32))
    }
}

/// How each distinct group of a placement communicates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommPlan {
    /// Groups run by NCCL, one split each, colors in first-use order.
    pub nccl: Vec<CommSplit>,
    /// Groups with members sharing a GPU: same-device transport.
    pub same_device: Vec<Group>,
}

/// The communicators `placement` needs, `existing` splits reused (a switch adds only
/// splits for groups it has not seen; colors continue after the existing ones).
pub fn comm_plan(placement: &Placement, devices: &DeviceMap, existing: &[CommSplit]) -> CommPlan {
    let mut nccl: Vec<CommSplit> = Vec::new();
    let mut same_device: Vec<Group> = Vec::new();
    let mut next_color = existing.iter().map(|s| s.color + 1).max().unwrap_or(0);
    for seg in placement.segments() {
        let g = placement.group(seg);
        if g.len() < 2 || nccl.iter().any(|s| s.group == *g) || same_device.contains(g) {
            continue;
        }
        if devices.nccl_capable(g) {
            let color = match existing.iter().find(|s| s.group == *g) {
                Some(s) => s.color,
                None => {
                    next_color += 1;
                    next_color - 1
                }
            };
            nccl.push(CommSplit {
                group: g.clone(),
                color,
            });
        } else {
            same_device.push(g.clone());
        }
    }
    CommPlan { nccl, same_device }
}

/// KV blocks that fit in `free_bytes` of device memory after `weight_bytes`, keeping
/// `reserve` of the free memory (activations, the reshard window, fragmentation).
pub fn kv_blocks_for(
    free_bytes: u64,
    weight_bytes: u64,
    reserve: f64,
    bytes_per_block: u64,
) -> Result<usize> {
    if !(0.0..1.0).contains(&reserve) || bytes_per_block == 0 {
        return Err(Error::Device(format!(
            "bad KV sizing: reserve {reserve}, {bytes_per_block} bytes per block"
        )));
    }
    let usable = (free_bytes as f64 * (1.0 - reserve)) as u64;
    let left = usable.checked_sub(weight_bytes).ok_or_else(|| {
        Error::Device(format!(
            "weights need {weight_bytes} bytes, only {usable} usable of {free_bytes} free"
        ))
    })?;
    let blocks = (left / bytes_per_block) as usize;
    if blocks == 0 {
        return Err(Error::Device("no room for a single KV block".into()));
    }
    Ok(blocks)
}

/// Bytes of one element on the device: weights and KV cache are bf16 there.
pub const DEVICE_ELEM_BYTES: u64 = 2;

/// The least memory kept out of the KV cache by [`kv_reserve_bytes`].
pub const KV_RESERVE_MIN_BYTES: u64 = 1 << 30;

/// Device memory kept out of the KV cache for activations and scratch buffers, the CUDA
/// context and kernel module, the reshard window of an online switch and fragmentation:
/// 10% of the device's total memory or 1 GiB, whichever is larger.
pub fn kv_reserve_bytes(total_bytes: u64) -> u64 {
    (total_bytes / 10).max(KV_RESERVE_MIN_BYTES)
}

/// What the workers of one device hold: see [`device_loads`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceLoad {
    /// Bytes of their bf16 weights.
    pub weights: u64,
    /// Bytes one KV block of `block_size` tokens (in every layer's pool) costs them.
    pub kv_per_block: u64,
}

/// Per device `0..devices.num_devices()`, what the workers of `topo` (the static
/// placement's worker ids, worker `w` on `devices.device(w)`) hold there.
///
/// Weights: what the workers upload, each segment's tensors in the member's region
/// ([`crate::parallel::TensorKind::region`]), so replicated norms, KV projections
/// replicated when `tp > kv_heads`, and a tied LM head (uploaded beside the embedding)
/// are all counted as often as they are resident. KV: K and V, bf16, `head_dim` per
/// head, for each rank the KV heads its query heads read ([`HeadShard`]): split when
/// `tp <= kv_heads`, replicated when `tp > kv_heads` (tp8 of 4 KV heads holds 8 KV-head
/// copies per layer, not 4).
pub fn device_loads(
    cfg: &ModelConfig,
    topo: Topology,
    block_size: usize,
    devices: &DeviceMap,
) -> Result<Vec<DeviceLoad>> {
    let p = Placement::static_topology(topo, cfg)?;
    if devices.num_workers() < topo.world_size() {
        return Err(Error::Device(format!(
            "{topo} needs {} workers, the device map has {}",
            topo.world_size(),
            devices.num_workers()
        )));
    }
    let mut loads = vec![DeviceLoad::default(); devices.num_devices()];
    let kv_head_bytes = 2 * block_size as u64 * cfg.head_dim as u64 * DEVICE_ELEM_BYTES;
    for seg in p.segments() {
        let g = p.group(seg);
        let tp = g.len();
        for (r, &w) in g.workers().iter().enumerate() {
            let load = &mut loads[devices.device(w).0];
            for k in crate::runtime::worker::segment_tensors(cfg, seg) {
                load.weights += k.region(cfg, tp, r).len() as u64 * DEVICE_ELEM_BYTES;
            }
            if let Segment::Layer(_) = seg {
                load.kv_per_block +=
                    HeadShard::new(cfg, tp, r).kv_heads.len() as u64 * kv_head_bytes;
            }
        }
    }
    Ok(loads)
}

/// Everything of `topo` on one device.
fn all_on_one(cfg: &ModelConfig, topo: Topology, block_size: usize) -> Result<DeviceLoad> {
    let one = DeviceMap::round_robin(topo.world_size(), 1)?;
    Ok(device_loads(cfg, topo, block_size, &one)?[0])
}

/// Bytes of the bf16 weights every rank of `topo` holds, summed over the ranks (see
/// [`device_loads`]).
pub fn weight_bytes_bf16(cfg: &ModelConfig, topo: Topology) -> Result<u64> {
    Ok(all_on_one(cfg, topo, 0)?.weights)
}

/// Device bytes one KV block (of `block_size` tokens, in every layer's pool) costs over
/// all ranks of `topo` (see [`device_loads`]).
pub fn kv_bytes_per_block(cfg: &ModelConfig, topo: Topology, block_size: usize) -> Result<u64> {
    Ok(all_on_one(cfg, topo, block_size)?.kv_per_block)
}

/// KV blocks (per layer, as `EngineConfig::kv_blocks`) that fit on a device with
/// `free_bytes` free, for `topo` with every rank on that one device: see
/// [`kv_blocks_on_devices`].
pub fn kv_blocks_from_free_memory(
    cfg: &ModelConfig,
    topo: Topology,
    block_size: usize,
    free_bytes: u64,
    reserve_bytes: u64,
) -> Result<usize> {
    let one = DeviceMap::round_robin(topo.world_size(), 1)?;
    let mem = [DeviceMemory {
        free: free_bytes,
        reserve: reserve_bytes,
    }];
    Ok(kv_blocks_on_devices(cfg, topo, block_size, &one, &mem)?.0)
}

/// One device's memory as the KV sizing sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Free bytes now (before the model is loaded).
    pub free: u64,
    /// Bytes kept out of the KV cache ([`kv_reserve_bytes`] of the device's total).
    pub reserve: u64,
}

/// KV blocks (per layer, as `EngineConfig::kv_blocks`: every worker allocates that many
/// for its layers) that fit on every device of `devices` for `topo`, and the device
/// that binds. Sizing happens before the model is loaded, so on each device the weights
/// of its workers ([`device_loads`]) and its reserve are subtracted from its free memory
/// and what is left divided by its workers' bytes per block; the least over the devices
/// with KV heads is the answer, uncapped (see [`kv_blocks_cap`]). Fails with
/// [`Error::Device`], naming the device when there are several, when one cannot hold
/// its weights, its reserve and one block; `mem[d]` is device `d`'s memory.
pub fn kv_blocks_on_devices(
    cfg: &ModelConfig,
    topo: Topology,
    block_size: usize,
    devices: &DeviceMap,
    mem: &[DeviceMemory],
) -> Result<(usize, DeviceId)> {
    if block_size == 0 {
        return Err(Error::Device("bad KV sizing: block_size 0".into()));
    }
    let loads = device_loads(cfg, topo, block_size, devices)?;
    if mem.len() < loads.len() {
        return Err(Error::Device(format!(
            "bad KV sizing: the memory of {} devices for {} in use",
            mem.len(),
            loads.len()
        )));
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let mut best: Option<(u64, DeviceId)> = None;
    for (d, (load, m)) in loads.iter().zip(mem).enumerate() {
        if load.kv_per_block == 0 {
            continue; // no worker of a layer here
        }
        let left = m
            .free
            .checked_sub(load.weights)
            .and_then(|x| x.checked_sub(m.reserve))
            .unwrap_or(0);
        let blocks = left / load.kv_per_block;
        if blocks == 0 {
            let (on, whose) = match loads.len() {
                1 => (String::new(), "all ranks"),
                _ => (format!("GPU {d}: "), "its ranks"),
            };
            return Err(Error::Device(format!(
                "{on}{:.2} GiB free cannot hold the {topo} weights ({:.2} GiB, bf16, {whose}) plus the reserve ({:.2} GiB) and one KV block ({} bytes)",
                gib(m.free),
                gib(load.weights),
                gib(m.reserve),
                load.kv_per_block
            )));
        }
        if best.is_none_or(|(b, _)| blocks < b) {
            best = Some((blocks, DeviceId(d)));
        }
    }
    let (blocks, d) = best.ok_or_else(|| Error::Device(format!("{topo} has no layers")))?;
    Ok((usize::try_from(blocks).unwrap_or(usize::MAX), d))
}

/// The most KV blocks of `block_size` tokens the `u32` slot ids of the attention kernels
/// address (slot `block * block_size + offset` stays below `u32::MAX`, their "skip"
/// marker).
pub fn kv_blocks_addressable(block_size: usize) -> usize {
    u32::MAX as usize / block_size.max(1)
}

/// The most KV blocks worth allocating: `max_running` sequences at the model's full
/// context, and never more than [`kv_blocks_addressable`].
pub fn kv_blocks_cap(cfg: &ModelConfig, block_size: usize, max_running: usize) -> usize {
    let bs = block_size.max(1);
    let per_seq = cfg.max_position_embeddings.div_ceil(bs);
    max_running
        .saturating_mul(per_seq)
        .min(kv_blocks_addressable(bs))
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::random::tiny_config;
    use crate::parallel::Topology;

    #[test]
    fn transports_follow_devices() {
        let one_gpu = DeviceMap::round_robin(4, 1).unwrap();
        assert_eq!(
            one_gpu.transport(WorkerId(0), WorkerId(0)),
            Transport::Local
        );
        assert_eq!(
            one_gpu.transport(WorkerId(0), WorkerId(3)),
            Transport::SameDevice
        );
        let eight = DeviceMap::round_robin(8, 8).unwrap();
        assert_eq!(eight.transport(WorkerId(0), WorkerId(3)), Transport::Nccl);
        assert!(DeviceMap::round_robin(2, 0).is_err());
    }

    #[test]
    fn tp2pp2_on_one_gpu_uses_same_device_groups_and_on_four_gpus_nccl_splits() {
        let cfg = tiny_config();
        let p = Placement::static_topology(Topology::new(2, 2), &cfg).unwrap();
        let one = comm_plan(&p, &DeviceMap::round_robin(4, 1).unwrap(), &[]);
        assert!(one.nccl.is_empty());
        assert_eq!(one.same_device.len(), 2);
        let four = comm_plan(&p, &DeviceMap::round_robin(4, 4).unwrap(), &[]);
        assert_eq!(four.nccl.len(), 2, "one split per stage group");
        assert_eq!(four.nccl[0].args_for(WorkerId(1)), Some((0, 1)));
        assert_eq!(four.nccl[0].args_for(WorkerId(2)), None);
        assert_eq!(four.nccl[1].args_for(WorkerId(2)), Some((1, 0)));
    }

    #[test]
    fn a_switch_reuses_existing_splits_and_adds_new_colors() {
        let cfg = tiny_config();
        let devs = DeviceMap::round_robin(4, 4).unwrap();
        let a = Placement::static_topology(Topology::new(2, 2), &cfg).unwrap();
        let first = comm_plan(&a, &devs, &[]);
        let b = Placement::static_topology(Topology::new(4, 1), &cfg).unwrap();
        let second = comm_plan(&b, &devs, &first.nccl);
        assert_eq!(second.nccl.len(), 1);
        assert_eq!(
            second.nccl[0].color, 2,
            "colors continue after the existing ones"
        );
        // Back to tp2pp2: its groups keep their old colors.
        let third = comm_plan(&a, &devs, &first.nccl);
        assert_eq!(third.nccl, first.nccl);
    }

    #[test]
    fn kv_sizing_keeps_the_reserve() {
        let gib = 1u64 << 30;
        let blocks = kv_blocks_for(80 * gib, 14 * gib, 0.1, 2 << 20).unwrap();
        assert_eq!(
            blocks as u64,
            ((80.0 * 0.9) as u64 * gib - 14 * gib) / (2 << 20)
        );
        assert!(kv_blocks_for(10 * gib, 14 * gib, 0.1, 1 << 20).is_err());
        assert!(kv_blocks_for(10 * gib, 1, 1.0, 1).is_err());
    }

    #[test]
    fn weight_bytes_count_every_rank_in_bf16() {
        let cfg = tiny_config();
        let p = cfg.num_params() as u64;
        assert_eq!(weight_bytes_bf16(&cfg, Topology::new(1, 1)).unwrap(), 2 * p);
        // Pipeline stages hold disjoint layers: no extra bytes.
        assert_eq!(weight_bytes_bf16(&cfg, Topology::new(1, 3)).unwrap(), 2 * p);
        // tp2: split tensors add up to the whole; the norms (two per layer and the final
        // one) are replicated on both ranks.
        let h = cfg.hidden_size as u64;
        let norms = (2 * cfg.num_layers as u64 + 1) * h;
        assert_eq!(
            weight_bytes_bf16(&cfg, Topology::new(2, 2)).unwrap(),
            2 * (p + norms)
        );
        // tp8 of 4 KV heads: every K and V projection is held twice over.
        let kv_proj = 2 * cfg.num_layers as u64 * cfg.kv_dim() as u64 * h;
        assert_eq!(
            weight_bytes_bf16(&cfg, Topology::new(8, 1)).unwrap(),
            2 * (p + 7 * norms + kv_proj)
        );
        assert!(weight_bytes_bf16(&cfg, Topology::new(3, 1)).is_err());
    }

    #[test]
    fn kv_block_bytes_count_replicated_kv_heads() {
        let cfg = tiny_config();
        // K and V x 16 tokens x 4 KV heads x 32 dims x bf16 x 6 layers.
        let one = 2 * 16 * 4 * 32 * 2 * 6;
        assert_eq!(
            kv_bytes_per_block(&cfg, Topology::new(1, 1), 16).unwrap(),
            one
        );
        // Split heads (tp <= kv_heads) and stages add up to the same.
        for (tp, pp) in [(2, 1), (4, 1), (2, 2), (1, 6)] {
            assert_eq!(
                kv_bytes_per_block(&cfg, Topology::new(tp, pp), 16).unwrap(),
                one,
                "tp{tp}pp{pp}"
            );
        }
        // tp8 > 4 KV heads: each rank holds a copy of its query heads' KV head.
        assert_eq!(
            kv_bytes_per_block(&cfg, Topology::new(8, 1), 16).unwrap(),
            2 * one
        );
        assert_eq!(
            kv_bytes_per_block(&cfg, Topology::new(1, 1), 32).unwrap(),
            2 * one
        );
    }

    #[test]
    fn kv_blocks_from_free_memory_subtracts_weights_and_keeps_the_reserve() {
        let cfg = tiny_config();
        let t = Topology::new(2, 1);
        let w = weight_bytes_bf16(&cfg, t).unwrap();
        let pb = kv_bytes_per_block(&cfg, t, 16).unwrap();
        let reserve = 1u64 << 30;
        let free = w + reserve + 10 * pb + pb - 1;
        assert_eq!(
            kv_blocks_from_free_memory(&cfg, t, 16, free, reserve).unwrap(),
            10
        );
        // The reserve is kept whole: one byte more of it (or less free) costs a block.
        assert_eq!(
            kv_blocks_from_free_memory(&cfg, t, 16, free, reserve + pb).unwrap(),
            9
        );
        assert_eq!(
            kv_blocks_from_free_memory(&cfg, t, 16, free - pb, reserve).unwrap(),
            9
        );
        assert_eq!(
            kv_blocks_from_free_memory(&cfg, t, 16, free, 0).unwrap() as u64,
            (reserve + 11 * pb - 1) / pb
        );
        // Replicated KV heads make blocks dearer.
        let t8 = Topology::new(8, 1);
        let (w8, pb8) = (
            weight_bytes_bf16(&cfg, t8).unwrap(),
            kv_bytes_per_block(&cfg, t8, 16).unwrap(),
        );
        assert_eq!(
            kv_blocks_from_free_memory(&cfg, t8, 16, w8 + reserve + 10 * pb8, reserve).unwrap(),
            10
        );
    }

    #[test]
    fn too_little_memory_is_an_error_naming_the_sizes() {
        let cfg = tiny_config();
        let t = Topology::new(1, 1);
        let w = weight_bytes_bf16(&cfg, t).unwrap();
        let pb = kv_bytes_per_block(&cfg, t, 16).unwrap();
        let reserve = 1u64 << 30;
        for free in [0, w, w + reserve - 1, w + reserve, w + reserve + pb - 1] {
            let e = kv_blocks_from_free_memory(&cfg, t, 16, free, reserve)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("device: "), "{e}");
            assert!(e.contains("weights") && e.contains("reserve"), "{e}");
        }
        assert_eq!(
            kv_blocks_from_free_memory(&cfg, t, 16, w + reserve + pb, reserve).unwrap(),
            1
        );
        assert!(kv_blocks_from_free_memory(&cfg, t, 0, u64::MAX, 0).is_err());
        assert!(kv_blocks_from_free_memory(&cfg, Topology::new(3, 1), 16, u64::MAX, 0).is_err());
    }

    /// Spread over GPUs, each device holds what its workers upload: the loads add up to
    /// the one-device sums, and the KV sizing is bound by the fullest device, named
    /// when it cannot hold a block.
    #[test]
    fn kv_sizing_on_several_gpus_takes_the_tightest() {
        let cfg = tiny_config();
        let t = Topology::new(2, 2);
        let (w, pb) = (
            weight_bytes_bf16(&cfg, t).unwrap(),
            kv_bytes_per_block(&cfg, t, 16).unwrap(),
        );
        for gpus in [1, 2, 4] {
            let map = DeviceMap::round_robin(4, gpus).unwrap();
            let loads = device_loads(&cfg, t, 16, &map).unwrap();
            assert_eq!(loads.len(), gpus);
            assert_eq!(loads.iter().map(|l| l.weights).sum::<u64>(), w);
            assert_eq!(loads.iter().map(|l| l.kv_per_block).sum::<u64>(), pb);
        }
        // Four GPUs: worker w holds one rank of one stage: a quarter of the KV of every
        // block, and its share of its stage's weights.
        let map = DeviceMap::round_robin(4, 4).unwrap();
        let loads = device_loads(&cfg, t, 16, &map).unwrap();
        assert!(loads.iter().all(|l| l.kv_per_block == pb / 4), "{loads:?}");
        let reserve = 1u64 << 30;
        let mem = |d: usize, blocks: u64| DeviceMemory {
            free: loads[d].weights + reserve + blocks * loads[d].kv_per_block,
            reserve,
        };
        let m: Vec<DeviceMemory> = [(0, 9), (1, 7), (2, 12), (3, 8)]
            .iter()
            .map(|&(d, b)| mem(d, b))
            .collect();
        assert_eq!(
            kv_blocks_on_devices(&cfg, t, 16, &map, &m).unwrap(),
            (7, DeviceId(1))
        );
        let mut short = m.clone();
        short[2].free = loads[2].weights + reserve + loads[2].kv_per_block - 1;
        let e = kv_blocks_on_devices(&cfg, t, 16, &map, &short)
            .unwrap_err()
            .to_string();
        assert!(e.contains("GPU 2:") && e.contains("its ranks"), "{e}");
        // the memory of fewer devices than the map uses is refused, not indexed past
        assert!(kv_blocks_on_devices(&cfg, t, 16, &map, &m[..2]).is_err());
        // on one GPU it is the all-ranks sizing
        let one = DeviceMap::round_robin(4, 1).unwrap();
        let free = w + reserve + 5 * pb;
        assert_eq!(
            kv_blocks_on_devices(&cfg, t, 16, &one, &[DeviceMemory { free, reserve }]).unwrap(),
            (5, DeviceId(0))
        );
    }

    #[test]
    fn reserve_and_cap() {
        let gib = 1u64 << 30;
        assert_eq!(kv_reserve_bytes(80 * gib), 8 * gib);
        assert_eq!(kv_reserve_bytes(4 * gib), gib);
        assert_eq!(kv_reserve_bytes(0), gib);
        let mut cfg = tiny_config();
        // 64 sequences of 1024 tokens in blocks of 16.
        assert_eq!(kv_blocks_cap(&cfg, 16, 64), 64 * 64);
        assert_eq!(kv_blocks_cap(&cfg, 1000, 1), 2);
        cfg.max_position_embeddings = usize::MAX / 2;
        assert_eq!(kv_blocks_cap(&cfg, 16, 64), u32::MAX as usize / 16);
    }
}

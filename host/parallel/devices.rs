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
//!   stated reserve for activations and the reshard window.

use super::{Group, Placement, WorkerId};
use crate::error::{Error, Result};

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
}

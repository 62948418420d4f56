//! Parallel layout: who holds which slice of which tensor.
//!
//! - [`topology`]: `tpXppY` and its validation against a model;
//! - [`shard`]: how each weight tensor is split inside a tensor-parallel group
//!   (ColumnParallel, RowParallel, VocabParallel, Replicated);
//! - [`placement`]: the per-layer map from every layer (plus embedding and LM head) to
//!   the group of workers that runs it. The runtime executes any placement; a static
//!   topology is just one of them.

pub mod devices;
pub mod placement;
pub mod shard;
pub mod topology;

pub use placement::{Group, Placement, Segment};
pub use shard::{split_range, Region, ShardSpec, TensorKind};
pub use topology::Topology;

use std::fmt;

/// A worker: a device with its own memory (a thread on the CPU backend). Lives across
/// reconfigurations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(pub usize);

/// A position in a topology (`stage * tp + tp_rank`). A reconfiguration re-assigns
/// ranks to workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rank(pub usize);

/// A decoder layer index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LayerId(pub usize);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "w{}", self.0)
    }
}

impl fmt::Display for Rank {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{}", self.0)
    }
}

impl fmt::Display for LayerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "layer {}", self.0)
    }
}

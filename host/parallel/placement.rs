//! The per-layer placement: for the embedding, every decoder layer and the LM head, the
//! ordered group of workers that runs it with tensor parallelism of degree `group.len()`
//! (member `i` holds shard `i` of every split tensor, see [`super::shard`]).
//!
//! Between two consecutive segments on different groups the hidden state, replicated
//! inside the first group, is handed to the second: a pipeline-stage boundary is exactly
//! such a change of group. The runtime executes any placement, so a reconfiguration is a
//! sequence of placements that differ a layer at a time.

use super::{LayerId, Rank, Topology, WorkerId};
use crate::error::{Error, Result};
use crate::model::ModelConfig;
use std::fmt;

/// Ordered workers of a tensor-parallel group; index = tensor-parallel rank in the group.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Group(pub Vec<WorkerId>);

impl Group {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn position(&self, w: WorkerId) -> Option<usize> {
        self.0.iter().position(|&x| x == w)
    }

    pub fn contains(&self, w: WorkerId) -> bool {
        self.0.contains(&w)
    }

    pub fn workers(&self) -> &[WorkerId] {
        &self.0
    }
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[")?;
        for (i, w) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ",")?;
            }
            write!(f, "{w}")?;
        }
        write!(f, "]")
    }
}

/// One unit of the forward pass, in execution order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Segment {
    Embed,
    Layer(LayerId),
    Head,
}

impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Segment::Embed => write!(f, "embed"),
            Segment::Layer(l) => write!(f, "layer {}", l.0),
            Segment::Head => write!(f, "head"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub embed: Group,
    pub layers: Vec<Group>,
    pub head: Group,
}

impl Placement {
    /// The placement of a static topology, rank `stage * tp + i` played by
    /// `workers[rank]`.
    pub fn from_topology(topo: Topology, cfg: &ModelConfig, workers: &[WorkerId]) -> Result<Self> {
        topo.validate(cfg)?;
        if workers.len() != topo.world_size() {
            return Err(Error::Topology(format!(
                "{topo} needs {} workers, got {}",
                topo.world_size(),
                workers.len()
            )));
        }
        let stage_group = |s: usize| Group(workers[s * topo.tp..(s + 1) * topo.tp].to_vec());
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for s in 0..topo.pp {
            for _ in topo.stage_layers(cfg.num_layers, s) {
                layers.push(stage_group(s));
            }
        }
        Ok(Placement {
            embed: stage_group(0),
            layers,
            head: stage_group(topo.pp - 1),
        })
    }

    /// Identity assignment: rank `i` on worker `i`.
    pub fn static_topology(topo: Topology, cfg: &ModelConfig) -> Result<Self> {
        let workers: Vec<WorkerId> = (0..topo.world_size()).map(WorkerId).collect();
        Self::from_topology(topo, cfg, &workers)
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn group(&self, seg: Segment) -> &Group {
        match seg {
            Segment::Embed => &self.embed,
            Segment::Layer(l) => &self.layers[l.0],
            Segment::Head => &self.head,
        }
    }

    pub fn group_mut(&mut self, seg: Segment) -> &mut Group {
        match seg {
            Segment::Embed => &mut self.embed,
            Segment::Layer(l) => &mut self.layers[l.0],
            Segment::Head => &mut self.head,
        }
    }

    /// All segments in execution order.
    pub fn segments(&self) -> impl Iterator<Item = Segment> {
        std::iter::once(Segment::Embed)
            .chain((0..self.layers.len()).map(|l| Segment::Layer(LayerId(l))))
            .chain(std::iter::once(Segment::Head))
    }

    /// Every worker that takes part, sorted.
    pub fn workers(&self) -> Vec<WorkerId> {
        let mut v: Vec<WorkerId> = self
            .segments()
            .flat_map(|s| self.group(s).0.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// The static topology this placement is, if it is one (used for display).
    pub fn as_topology(&self) -> Option<Topology> {
        let mut stages: Vec<&Group> = Vec::new();
        for g in &self.layers {
            if stages.last() != Some(&g) {
                if stages.contains(&g) {
                    return None;
                }
                stages.push(g);
            }
        }
        let tp = stages.first()?.len();
        if stages.iter().any(|g| g.len() != tp)
            || self.embed != *stages[0]
            || self.head != **stages.last()?
        {
            return None;
        }
        let topo = Topology::new(tp, stages.len());
        // Stage sizes must be the balanced split.
        let mut l = 0;
        for (s, g) in stages.iter().enumerate() {
            for _ in topo.stage_layers(self.layers.len(), s) {
                if self.layers.get(l) != Some(g) {
                    return None;
                }
                l += 1;
            }
        }
        Some(topo)
    }

    /// The rank a worker plays in `topo` under this placement, if it is that topology.
    pub fn rank_of(&self, topo: Topology, w: WorkerId) -> Option<Rank> {
        for s in 0..topo.pp {
            let first = topo.stage_layers(self.layers.len(), s).start;
            if let Some(i) = self.layers.get(first)?.position(w) {
                return Some(Rank(s * topo.tp + i));
            }
        }
        None
    }

    /// Short description: the topology name when it is one, else per-layer group sizes.
    pub fn describe(&self) -> String {
        match self.as_topology() {
            Some(t) => t.to_string(),
            None => {
                let sizes: Vec<String> = self.layers.iter().map(|g| g.len().to_string()).collect();
                format!("mixed[{}]", sizes.join(","))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;

    fn cfg() -> ModelConfig {
        crate::model::random::tiny_config()
    }

    #[test]
    fn static_placement_roundtrips_topology() {
        let cfg = cfg();
        for (tp, pp) in [(1, 1), (2, 2), (4, 1), (1, 4), (2, 3), (8, 1)] {
            let t = Topology::new(tp, pp);
            let p = Placement::static_topology(t, &cfg).unwrap();
            assert_eq!(p.as_topology(), Some(t));
            assert_eq!(p.workers().len(), tp * pp);
            assert_eq!(p.rank_of(t, WorkerId(tp * pp - 1)), Some(Rank(tp * pp - 1)));
        }
    }

    #[test]
    fn mixed_placement_is_not_a_topology() {
        let cfg = cfg();
        let mut p = Placement::static_topology(Topology::new(2, 1), &cfg).unwrap();
        p.layers[0] = Group(vec![WorkerId(0)]);
        assert_eq!(p.as_topology(), None);
        assert!(p.describe().starts_with("mixed"));
    }
}

//! A static `tp × pp` topology: `pp` contiguous pipeline stages (sizes differ by at most
//! one layer when `pp` does not divide the layer count), each a tensor-parallel group of
//! `tp` ranks.

use super::shard::split_range;
use crate::error::{Error, Result};
use crate::model::ModelConfig;
use std::fmt;
use std::ops::Range;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Topology {
    pub tp: usize,
    pub pp: usize,
}

impl Topology {
    pub fn new(tp: usize, pp: usize) -> Self {
        Topology { tp, pp }
    }

    pub fn world_size(&self) -> usize {
        self.tp * self.pp
    }

    /// Layers of pipeline stage `stage` (earlier stages take the extra layers).
    pub fn stage_layers(&self, num_layers: usize, stage: usize) -> Range<usize> {
        split_range(num_layers, self.pp, stage)
    }

    /// Checks that the model can be split this way; the error says which rule fails.
    pub fn validate(&self, cfg: &ModelConfig) -> Result<()> {
        let (tp, pp) = (self.tp, self.pp);
        if tp == 0 || pp == 0 {
            return Err(Error::Topology(format!(
                "{self}: tp and pp must be at least 1"
            )));
        }
        if !cfg.num_heads.is_multiple_of(tp) {
            return Err(Error::Topology(format!(
                "{self}: tp={tp} does not divide num_attention_heads={}",
                cfg.num_heads
            )));
        }
        let kvh = cfg.num_kv_heads;
        if !tp.is_multiple_of(kvh) && !kvh.is_multiple_of(tp) {
            return Err(Error::Topology(format!(
                "{self}: tp={tp} and num_key_value_heads={kvh} must divide one another (KV heads are split when tp <= kv heads, replicated when tp > kv heads)"
            )));
        }
        if tp > cfg.intermediate_size || tp > cfg.vocab_size {
            return Err(Error::Topology(format!(
                "{self}: tp={tp} exceeds intermediate_size={} or vocab_size={}",
                cfg.intermediate_size, cfg.vocab_size
            )));
        }
        if pp > cfg.num_layers {
            return Err(Error::Topology(format!(
                "{self}: pp={pp} exceeds the number of layers ({})",
                cfg.num_layers
            )));
        }
        Ok(())
    }
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tp{}pp{}", self.tp, self.pp)
    }
}

impl FromStr for Topology {
    type Err = Error;

    /// Parses `tp2pp4` (either part may be omitted: `tp2` = tp2pp1, `pp3` = tp1pp3).
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::Topology(format!("`{s}`: expected a topology like tp2pp2"));
        let t = s.trim().to_ascii_lowercase();
        let (mut tp, mut pp) = (None, None);
        let mut rest = t.as_str();
        while !rest.is_empty() {
            let (key, tail) = if let Some(r) = rest.strip_prefix("tp") {
                ("tp", r)
            } else if let Some(r) = rest.strip_prefix("pp") {
                ("pp", r)
            } else {
                return Err(bad());
            };
            let n_len = tail.chars().take_while(|c| c.is_ascii_digit()).count();
            let n: usize = tail[..n_len].parse().map_err(|_| bad())?;
            let slot = if key == "tp" { &mut tp } else { &mut pp };
            if slot.is_some() || n == 0 {
                return Err(bad());
            }
            *slot = Some(n);
            rest = &tail[n_len..];
        }
        if tp.is_none() && pp.is_none() {
            return Err(bad());
        }
        Ok(Topology::new(tp.unwrap_or(1), pp.unwrap_or(1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        let t: Topology = "tp2pp3".parse().unwrap();
        assert_eq!((t.tp, t.pp), (2, 3));
        assert_eq!(t.to_string(), "tp2pp3");
        assert_eq!("pp4".parse::<Topology>().unwrap(), Topology::new(1, 4));
        assert_eq!("TP8".parse::<Topology>().unwrap(), Topology::new(8, 1));
        for bad in ["", "tp", "tp0pp1", "tp2tp2", "x2", "tp2pp-1", "tp2 pp2"] {
            assert!(bad.parse::<Topology>().is_err(), "{bad}");
        }
    }

    #[test]
    fn uneven_stages_cover_all_layers() {
        let t = Topology::new(1, 4);
        let stages: Vec<_> = (0..4).map(|s| t.stage_layers(6, s)).collect();
        assert_eq!(stages, vec![0..2, 2..4, 4..5, 5..6]);
    }
}

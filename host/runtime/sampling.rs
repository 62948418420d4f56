//! Token selection from a row of logits: greedy (first maximum, as `torch.argmax`), or
//! temperature + top-p (nucleus) sampling with a per-request seeded generator so that a
//! run is reproducible.

use crate::backend::cpu::ops;
use crate::model::random::mix64;

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Sampling {
    #[default]
    Greedy,
    /// `temperature > 0`, `0 < top_p <= 1`.
    Random {
        temperature: f32,
        top_p: f32,
        seed: u64,
    },
}

/// A small deterministic generator (splitmix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub fn sample(logits: &[f32], sampling: &Sampling, rng: &mut Rng) -> u32 {
    match *sampling {
        Sampling::Greedy => ops::argmax(logits) as u32,
        Sampling::Random {
            temperature, top_p, ..
        } => {
            let mut p: Vec<f32> = logits.iter().map(|&x| x / temperature).collect();
            ops::softmax(&mut p);
            let mut idx: Vec<usize> = (0..p.len()).collect();
            idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            let mut keep = 0;
            let mut cum = 0.0f64;
            for &i in &idx {
                cum += p[i] as f64;
                keep += 1;
                if cum >= top_p as f64 {
                    break;
                }
            }
            let r = rng.next_f64() * cum;
            let mut acc = 0.0f64;
            for &i in &idx[..keep] {
                acc += p[i] as f64;
                if r < acc {
                    return i as u32;
                }
            }
            idx[keep - 1] as u32
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // p = softmax: token 2 carries almost all the mass.
        let logits = [0.0, 1.0, 10.0, 2.0];
        let s = Sampling::Random {
            temperature: 1.0,
            top_p: 0.5,
            seed: 1,
        };
        let mut rng = Rng::new(7);
        for _ in 0..100 {
            assert_eq!(sample(&logits, &s, &mut rng), 2);
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln()]; // p = 0.25, 0.75
        let s = Sampling::Random {
            temperature: 1.0,
            top_p: 1.0,
            seed: 0,
        };
        let mut rng = Rng::new(42);
        let n = 20000;
        let ones = (0..n)
            .filter(|_| sample(&logits, &s, &mut rng) == 1)
            .count();
        let f = ones as f64 / n as f64;
        // 4.5 sigma of a binomial(20000, 0.75) is about 0.014.
        assert!((f - 0.75).abs() < 0.014, "{f}");
    }
}

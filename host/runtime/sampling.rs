//! Token selection from a row of logits: greedy (first maximum, as `torch.argmax`), or
//! temperature + top-p (nucleus) sampling with a per-request seeded generator so that a
//! run is reproducible.

use crate::backend::cpu::ops;
use crate::error::{Error, Result};
use crate::model::random::mix64;
use std::ops::Range;

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
            let p = probabilities(logits, temperature);
            let n = p.len();
            // Most probable first, ties to the lower index: a total order, so the first k
            // after a partial selection and a sort of those k are exactly the first k of
            // a full sort. The nucleus is usually a small prefix: select 64, then 16×
            // more while the mass is short of top_p (a full sort of a 32k vocabulary
            // cost about a millisecond a row; a flat row whose nucleus is most of it
            // costs two selections more than that).
            let order = |a: &usize, b: &usize| p[*b].total_cmp(&p[*a]).then(a.cmp(b));
            let mut idx: Vec<usize> = (0..n).collect();
            let mut k = n.min(64);
            loop {
                if k < n {
                    idx.select_nth_unstable_by(k, order);
                }
                idx[..k].sort_by(order);
                if let Some(tok) = draw_from_nucleus(&p, &idx[..k], top_p, k == n, rng) {
                    return tok;
                }
                k = n.min(16 * k);
            }
        }
    }
}

/// The draw of top-p sampling from probabilities `p` with `sorted` their most probable
/// indices in order: keeps the shortest prefix whose mass reaches `top_p` and draws from
/// it. `None` when `sorted` is short of that mass and not `all` of the vocabulary (the
/// caller sorts more); with `all`, the whole of it is the nucleus.
fn draw_from_nucleus(
    p: &[f32],
    sorted: &[usize],
    top_p: f32,
    all: bool,
    rng: &mut Rng,
) -> Option<u32> {
    let mut keep = 0;
    let mut cum = 0.0f64;
    for &i in sorted {
        cum += p[i] as f64;
        keep += 1;
        if cum >= top_p as f64 {
            break;
        }
    }
    if cum < top_p as f64 && !all {
        return None;
    }
    let r = rng.next_f64() * cum;
    let mut acc = 0.0f64;
    for &i in &sorted[..keep] {
        acc += p[i] as f64;
        if r < acc {
            return Some(i as u32);
        }
    }
    Some(sorted[keep - 1] as u32)
}

/// Top-p by a full sort of the vocabulary: what [`sample`] did before it selected the
/// nucleus partially, kept as the reference its tests and `benches/sampling.rs` compare
/// against (the same draws, seed for seed).
#[doc(hidden)]
pub fn top_p_by_full_sort(logits: &[f32], temperature: f32, top_p: f32, rng: &mut Rng) -> u32 {
    let p = probabilities(logits, temperature);
    let mut idx: Vec<usize> = (0..p.len()).collect();
    idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    draw_from_nucleus(&p, &idx, top_p, true, rng).unwrap_or(0)
}

/// Each row's greedy pick within one vocabulary slice, as an LM head rank sends it to the
/// driver when a step wants no logits ([`crate::runtime::worker::HeadOutput::Argmax`]):
/// per row its largest logit, then that logit's index in the slice as raw bits (exact
/// for any index: these floats are carried, never computed with). 8 bytes a row
/// instead of 4 × the slice's width.
pub fn pack_picks(values: &[f32], indices: &[u32]) -> Vec<f32> {
    values
        .iter()
        .zip(indices)
        .flat_map(|(&v, &i)| [v, f32::from_bits(i)])
        .collect()
}

/// [`pack_picks`] of the rows of `logits` (`[rows, width]`, one vocabulary slice).
pub fn pick_rows(logits: &[f32], width: usize) -> Vec<f32> {
    let (values, indices): (Vec<f32>, Vec<u32>) = logits
        .chunks_exact(width.max(1))
        .map(|row| {
            let i = ops::argmax(row);
            (row[i], i as u32)
        })
        .unzip();
    pack_picks(&values, &indices)
}

/// The greedy token of each of `rows` rows from every head rank's [`pack_picks`], given
/// with the vocabulary range of its slice, slices in vocabulary order: the largest
/// value, ties to the lowest vocabulary index (the earlier slice), a NaN never winning,
/// so the token is the one [`ops::argmax`] picks over the gathered logits. Malformed
/// parts (wrong length, an index outside its slice) are errors.
pub fn merge_picks(parts: &[(Range<usize>, Vec<f32>)], rows: usize) -> Result<Vec<u32>> {
    let mut best: Vec<Option<(f32, usize)>> = vec![None; rows];
    // (An empty slice has no pick; `Topology::validate` keeps tp <= vocab anyway.)
    for (slice, part) in parts.iter().filter(|(slice, _)| !slice.is_empty()) {
        if part.len() != 2 * rows {
            return Err(Error::Comm(format!(
                "greedy picks of vocabulary {slice:?}: {} floats, expected {}",
                part.len(),
                2 * rows
            )));
        }
        for (b, pick) in best.iter_mut().zip(part.chunks_exact(2)) {
            let (v, i) = (pick[0], pick[1].to_bits() as usize);
            if i >= slice.len() {
                return Err(Error::Comm(format!(
                    "greedy pick {i} outside vocabulary slice {slice:?}"
                )));
            }
            // A slice of NaN sends NaN: any later slice's value replaces it.
            if b.is_none_or(|(bv, _)| v > bv || (bv.is_nan() && !v.is_nan())) {
                *b = Some((v, slice.start + i));
            }
        }
    }
    best.into_iter()
        .enumerate()
        .map(|(r, b)| match b {
            Some((v, i)) if !v.is_nan() => Ok(i as u32),
            _ => Err(Error::Numerics(format!("row {r}: every logit is NaN"))),
        })
        .collect()
}

/// The sampling probabilities of a row of logits at `temperature`: softmax of
/// `(x - max) / temperature`, the max subtracted first, so that a tiny temperature
/// sends the other logits to -inf (probability 0) instead of every logit to ±inf (NaN).
fn probabilities(logits: &[f32], temperature: f32) -> Vec<f32> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut p: Vec<f32> = logits.iter().map(|&x| (x - max) / temperature).collect();
    ops::softmax(&mut p);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Logits drawn from a few values (ties across and within slices, -inf, NaN rows),
    /// split into vocabulary slices as a TP head would: merging each slice's picks gives
    /// the argmax of the whole row.
    #[test]
    fn merged_slice_picks_equal_the_full_argmax() {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(3, |d| d.as_nanos() as u64);
        let mut rng = Rng::new(seed);
        let pool = [-3.0, 0.5, 0.5, 4.0, f32::NEG_INFINITY, f32::NAN];
        for _ in 0..300 {
            let vocab = 1 + (rng.next_u64() % 40) as usize;
            let tp = 1 + (rng.next_u64() % 4) as usize;
            let rows = 1 + (rng.next_u64() % 3) as usize;
            let nan_heavy = rng.next_u64().is_multiple_of(5);
            let logits: Vec<f32> = (0..rows * vocab)
                .map(|_| {
                    let v = pool[(rng.next_u64() % pool.len() as u64) as usize];
                    if nan_heavy && rng.next_u64().is_multiple_of(2) {
                        f32::NAN
                    } else {
                        v
                    }
                })
                .collect();
            let parts: Vec<(Range<usize>, Vec<f32>)> = (0..tp)
                .map(|r| crate::parallel::split_range(vocab, tp, r))
                .filter(|sl| !sl.is_empty())
                .map(|sl| {
                    let local: Vec<f32> = (0..rows)
                        .flat_map(|i| logits[i * vocab..][sl.clone()].to_vec())
                        .collect();
                    let picks = pick_rows(&local, sl.len());
                    (sl, picks)
                })
                .collect();
            let all_nan = |i: usize| {
                logits[i * vocab..(i + 1) * vocab]
                    .iter()
                    .all(|v| v.is_nan())
            };
            let Ok(got) = merge_picks(&parts, rows) else {
                assert!(
                    (0..rows).any(all_nan),
                    "seed {seed}: error without a NaN row"
                );
                continue;
            };
            assert!(!(0..rows).any(all_nan), "seed {seed}: a NaN row picked");
            for (i, &g) in got.iter().enumerate() {
                let row = &logits[i * vocab..(i + 1) * vocab];
                assert_eq!(
                    g as usize,
                    ops::argmax(row),
                    "seed {seed}, tp {tp}: {row:?}"
                );
            }
        }
    }

    /// The partial selection draws exactly the tokens the full sort drew, seed for seed:
    /// flat and peaked rows (nuclei of a few tokens to most of the vocabulary), ties, and
    /// vocabularies below and above the first selection's 64.
    #[test]
    fn top_p_by_partial_selection_equals_the_full_sort() {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(5, |d| d.as_nanos() as u64);
        let mut g = Rng::new(seed);
        for _ in 0..200 {
            let vocab = [1, 2, 63, 64, 65, 300, 5000][(g.next_u64() % 7) as usize];
            let spread = [0.01, 1.0, 8.0][(g.next_u64() % 3) as usize];
            // Coarse values (multiples of 1/8) make exact ties common.
            let logits: Vec<f32> = (0..vocab)
                .map(|_| ((g.next_f64() * 8.0 * spread).round() / 8.0) as f32)
                .collect();
            let temperature = [0.5, 1.0, 1.7][(g.next_u64() % 3) as usize];
            let top_p = [0.1, 0.5, 0.9, 0.999, 1.0][(g.next_u64() % 5) as usize];
            let s = Sampling::Random {
                temperature,
                top_p,
                seed: 0,
            };
            let draw = g.next_u64();
            let (mut a, mut b) = (Rng::new(draw), Rng::new(draw));
            for _ in 0..5 {
                assert_eq!(
                    sample(&logits, &s, &mut a),
                    top_p_by_full_sort(&logits, temperature, top_p, &mut b),
                    "seed {seed}: vocab {vocab}, T {temperature}, top_p {top_p}"
                );
            }
        }
    }

    /// A temperature so small that logits / temperature overflow still samples the
    /// largest logit (it gave NaN probabilities, and the last token, before).
    #[test]
    fn a_tiny_temperature_samples_the_max() {
        let logits = [0.5f32, 3.0, -1.0, 2.9];
        for temperature in [1e-38f32, 1e-45, 1e-30] {
            let s = Sampling::Random {
                temperature,
                top_p: 0.9,
                seed: 0,
            };
            let mut rng = Rng::new(3);
            for _ in 0..20 {
                assert_eq!(sample(&logits, &s, &mut rng), 1, "T {temperature}");
            }
        }
    }

    #[test]
    fn malformed_picks_are_errors() {
        assert!(merge_picks(&[(0..4, vec![1.0])], 1).is_err());
        assert!(merge_picks(&[(0..4, pack_picks(&[1.0], &[4]))], 1).is_err());
        // A row whose logits are all NaN (the kernel sends NaN at 0): an error, not 0.
        let nan = merge_picks(&[(0..4, pack_picks(&[f32::NAN], &[0]))], 1);
        assert!(matches!(nan, Err(Error::Numerics(_))), "{nan:?}");
        assert_eq!(
            merge_picks(&[(0..4, pack_picks(&[1.0], &[3]))], 1).unwrap(),
            vec![3]
        );
    }

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

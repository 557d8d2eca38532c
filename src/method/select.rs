//! Exact top-k selection by magnitude with bounded memory.
//!
//! The k elements of largest magnitude are found without sorting a copy of the tensor:
//!
//! ```text
//! key(i)  = bits(|x_i|) as u32          (monotone in |x| for non-negative floats)
//! pass 1  histogram of key >> 16        -> bucket h holding the k-th largest key
//! pass 2  histogram of key & 0xFFFF among keys in bucket h -> threshold key T
//! pass 3  count keys equal to T per fixed block -> index of the last tied element kept
//!         (skipped when every key equal to T is kept)
//! keep(i) = key(i) > T  or  (key(i) == T  and  i <= last_tie_index)
//! ```
//!
//! Ties at the threshold are broken by lowest index, so exactly k elements are kept.
//! Memory is two 65,536-entry histograms per job; the passes read the mapped inputs.
//! All counts are integers, so the result does not depend on threads or chunk size.

use crate::convert::TILE_ELEMS;
use crate::error::Result;
use crate::view::{TensorInputs, REDUCE_BLOCK_ELEMS};

/// The set of the k largest elements under the order (key descending, index ascending).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopSet {
    /// k = 0.
    Empty,
    /// k >= n.
    All,
    /// Keys above `key` are in, and keys equal to `key` at index <= `last_tie_index`.
    Threshold {
        /// The k-th largest key.
        key: u32,
        /// Index of the last element whose key equals `key` that is in the set.
        last_tie_index: u64,
    },
}

impl TopSet {
    /// True when element `index` with magnitude key `key` is in the set.
    #[inline(always)]
    pub fn contains(&self, key: u32, index: u64) -> bool {
        match *self {
            TopSet::Empty => false,
            TopSet::All => true,
            TopSet::Threshold {
                key: t,
                last_tie_index,
            } => key > t || (key == t && index <= last_tie_index),
        }
    }
}

/// Magnitude key of an f32: its bits without the sign. NaN sorts above infinity.
#[inline(always)]
pub fn magnitude_key(x: f32) -> u32 {
    x.to_bits() & 0x7FFF_FFFF
}

/// One selection request: the top `k` of the keys of `source` (an index that `key_of`
/// understands, such as a model number).
#[derive(Clone, Copy, Debug)]
pub struct SelectJob {
    /// The key stream to select from.
    pub source: usize,
    /// How many elements to keep.
    pub k: u64,
}

const BUCKETS: usize = 1 << 16;

/// Runs every job over `inputs` with three passes over the data in all.
///
/// `keys_of(tiles, source, keys)` writes the key of every element of the current tile for
/// the key stream `source` into `keys`, which is as long as the tile.
pub fn select_top(
    inputs: &TensorInputs<'_>,
    jobs: &[SelectJob],
    keys_of: impl Fn(&[&[f32]], usize, &mut [u32]) + Sync + Send,
) -> Result<Vec<TopSet>> {
    let n = inputs.elems;
    let mut results: Vec<Option<TopSet>> = jobs
        .iter()
        .map(|job| match job.k {
            0 => Some(TopSet::Empty),
            k if k >= n => Some(TopSet::All),
            _ => None,
        })
        .collect();
    let open: Vec<(usize, SelectJob)> = jobs
        .iter()
        .enumerate()
        .filter(|(i, _)| results[*i].is_none())
        .map(|(i, j)| (i, *j))
        .collect();
    if open.is_empty() {
        return Ok(results.into_iter().map(Option::unwrap).collect());
    }

    // Pass 1: histogram of the high 16 bits.
    let high = inputs.fold_blocks::<f32, Vec<Vec<u64>>>(
        || vec![vec![0u64; BUCKETS]; open.len()],
        |hists, _, tiles| {
            let mut buf = [0u32; TILE_ELEMS];
            let keys = &mut buf[..tiles.first().map_or(0, |t| t.len())];
            for (h, (_, job)) in hists.iter_mut().zip(&open) {
                keys_of(tiles, job.source, keys);
                for &key in keys.iter() {
                    h[(key >> 16) as usize] += 1;
                }
            }
        },
        add_histograms,
    )?;
    let high_picks: Vec<(u32, u64)> = open
        .iter()
        .zip(&high)
        .map(|((_, job), h)| pick_bucket(h, job.k))
        .collect();

    // Pass 2: histogram of the low 16 bits within the chosen high bucket.
    let low = inputs.fold_blocks::<f32, Vec<Vec<u64>>>(
        || vec![vec![0u64; BUCKETS]; open.len()],
        |hists, _, tiles| {
            let mut buf = [0u32; TILE_ELEMS];
            let keys = &mut buf[..tiles.first().map_or(0, |t| t.len())];
            for ((h, (_, job)), &(bucket, _)) in hists.iter_mut().zip(&open).zip(&high_picks) {
                keys_of(tiles, job.source, keys);
                for &key in keys.iter() {
                    if key >> 16 == bucket {
                        h[(key & 0xFFFF) as usize] += 1;
                    }
                }
            }
        },
        add_histograms,
    )?;
    // (threshold key, ties needed, ties present) per open job.
    let thresholds: Vec<(u32, u64, u64)> = open
        .iter()
        .zip(&low)
        .zip(&high_picks)
        .map(|(((_, job), h), &(bucket, above))| {
            let (low_bucket, above_low) = pick_bucket(h, job.k - above);
            let ties_needed = job.k - above - above_low;
            (
                (bucket << 16) | low_bucket,
                ties_needed,
                h[low_bucket as usize],
            )
        })
        .collect();

    // When every element at the threshold is kept (the usual case for continuous values),
    // no tie needs breaking and the third pass is skipped.
    let mut tie_jobs = Vec::new();
    for (slot, ((i, _), &(key, needed, present))) in open.iter().zip(&thresholds).enumerate() {
        if needed == present {
            results[*i] = Some(TopSet::Threshold {
                key,
                last_tie_index: u64::MAX,
            });
        } else {
            tie_jobs.push(slot);
        }
    }
    if tie_jobs.is_empty() {
        return Ok(results.into_iter().map(Option::unwrap).collect());
    }

    // Pass 3: per-block counts of keys equal to the threshold, to find the last tie kept.
    let counts = inputs.map_blocks::<f32, Vec<u64>>(
        || vec![0u64; tie_jobs.len()],
        |c, _, tiles| {
            let mut buf = [0u32; TILE_ELEMS];
            let keys = &mut buf[..tiles.first().map_or(0, |t| t.len())];
            for (count, &slot) in c.iter_mut().zip(&tie_jobs) {
                let (source, key) = (open[slot].1.source, thresholds[slot].0);
                keys_of(tiles, source, keys);
                *count += keys.iter().filter(|&&k| k == key).count() as u64;
            }
        },
    )?;
    for (column, &slot) in tie_jobs.iter().enumerate() {
        let (i, job) = &open[slot];
        let (key, needed, _) = thresholds[slot];
        let mut seen = 0u64;
        let mut block = 0usize;
        while seen + counts[block][column] < needed {
            seen += counts[block][column];
            block += 1;
        }
        let last = last_tie_in_block(
            inputs,
            block as u64,
            job.source,
            key,
            needed - seen,
            &keys_of,
        )?;
        results[*i] = Some(TopSet::Threshold {
            key,
            last_tie_index: last,
        });
    }
    Ok(results.into_iter().map(Option::unwrap).collect())
}

fn add_histograms(mut a: Vec<Vec<u64>>, b: Vec<Vec<u64>>) -> Vec<Vec<u64>> {
    for (x, y) in a.iter_mut().zip(b) {
        for (p, q) in x.iter_mut().zip(y) {
            *p += q;
        }
    }
    a
}

/// Returns the bucket that contains the k-th largest key (k >= 1) and the number of keys in
/// higher buckets.
fn pick_bucket(hist: &[u64], k: u64) -> (u32, u64) {
    let mut above = 0u64;
    for bucket in (0..hist.len()).rev() {
        if above + hist[bucket] >= k {
            return (bucket as u32, above);
        }
        above += hist[bucket];
    }
    unreachable!("histogram holds fewer than k = {k} keys")
}

/// Scans one block for the `nth` (1-based) key equal to `key` and returns its index.
fn last_tie_in_block(
    inputs: &TensorInputs<'_>,
    block: u64,
    source: usize,
    key: u32,
    nth: u64,
    keys_of: &(impl Fn(&[&[f32]], usize, &mut [u32]) + Sync),
) -> Result<u64> {
    let start = block * REDUCE_BLOCK_ELEMS;
    let range = start..(start + REDUCE_BLOCK_ELEMS).min(inputs.elems);
    let mut reader = crate::view::TileReader::<f32>::new(inputs.views.len());
    let mut seen = 0u64;
    let mut found = None;
    reader.for_each_tile(&inputs.views, range, |tile_start, tiles| {
        if found.is_some() {
            return;
        }
        let mut buf = [0u32; TILE_ELEMS];
        let keys = &mut buf[..tiles[0].len()];
        keys_of(tiles, source, keys);
        for (j, &k) in keys.iter().enumerate() {
            if k == key {
                seen += 1;
                if seen == nth {
                    found = Some(tile_start + j as u64);
                    return;
                }
            }
        }
    })?;
    Ok(found.expect("the block contains the ties counted in it"))
}

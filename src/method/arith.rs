//! Linear averaging, task arithmetic and the sparsified task-vector methods (TIES, DARE,
//! breadcrumbs), which share one kernel.
//!
//! ```text
//! tau_t    = theta_t - theta_0
//! tau~_t   = mask_t * tau_t * rescale_t          (mask: top-k, breadcrumbs band or DARE)
//! with sign election (TIES variants):
//!   elected  = sign(sum_t w_t * tau~_t), zero counted as +
//!   agree_t  = sign(w_t * tau~_t) == elected      (a zero never agrees)
//!   merged   = sum_t w_t tau~_t agree_t / (normalize ? sum_t w_t agree_t, 0 -> 1 : 1)
//! without:
//!   merged   = sum_t w_t tau~_t / (normalize ? sum_t w_t : 1)
//! theta      = theta_0 + lambda * merged
//! ```
//!
//! Masks are decided on the f32 task vector whatever the working precision, so a mask is
//! the same in f32 and f64 mode.

use super::fused::{Point, Pointwise, MAX_INPUTS};
use super::rng;
use super::select::{magnitude_key, select_top, SelectJob, TopSet};
use super::{impl_kernel, KernelStats, Layout, MethodKind, Rescale, Resolver, TensorKernel};
use crate::convert::Real;
use crate::error::Result;
use crate::view::TensorInputs;

/// `sum_t w_t x_t / (normalize ? sum_t w_t : 1)`; the base, when present, is an input too.
///
/// The weights are divided by their sum before the kernel runs, so that the average of
/// one model returns its values exactly (`w / w` is exactly 1, `w * x * (1 / w)` is not).
struct Linear {
    weights: Vec<f64>,
    /// The weights as f32, for the fused path (the first [`MAX_INPUTS`]).
    weights_f32: [f32; MAX_INPUTS],
}

impl Linear {
    #[inline(always)]
    fn apply<A: Real>(&self, _start: u64, inputs: &[&[A]], out: &mut [A], _s: &mut KernelStats) {
        out.fill(A::ZERO);
        for (x, &w) in inputs.iter().zip(&self.weights) {
            let w = A::from_f64(w);
            for (o, &v) in out.iter_mut().zip(x.iter()) {
                *o = *o + w * v;
            }
        }
    }
}
impl_kernel!(Linear, fused);

impl Pointwise for Linear {
    fn accepts(&self, inputs: usize) -> bool {
        inputs == self.weights.len()
    }

    #[inline(always)]
    fn point<const N: usize>(&self, x: &[f32; N]) -> Point {
        let mut o = 0.0f32;
        for (&v, &w) in x.iter().zip(&self.weights_f32) {
            o += w * v;
        }
        Point::value(o)
    }
}

/// Returns the first [`MAX_INPUTS`] weights as f32, rounded as `Real::from_f64` rounds them.
fn weights_f32(weights: &[f64]) -> [f32; MAX_INPUTS] {
    std::array::from_fn(|i| weights.get(i).map_or(0.0, |&w| w as f32))
}

pub(super) fn linear(ctx: &Resolver<'_>, layout: Layout) -> Result<Box<dyn TensorKernel>> {
    let mut weights = Vec::with_capacity(layout.len());
    if layout.has_base {
        weights.push(ctx.base_or("weight", 1.0));
    }
    for m in 0..layout.models {
        weights.push(ctx.model_or(m, "weight", 1.0));
    }
    let sum: f64 = weights.iter().sum();
    if ctx.flag("normalize", true) {
        if sum == 0.0 || !sum.is_finite() {
            return Err(ctx.invalid(format!(
                "the weights sum to {sum}, so they cannot be normalized; set normalize: false or change the weights"
            )));
        }
        for w in &mut weights {
            *w /= sum;
        }
    }
    Ok(Box::new(Linear {
        weights_f32: weights_f32(&weights),
        weights,
    }))
}

/// `theta_0 + scale * sum_t w_t (theta_t - theta_0)`.
struct TaskArithmetic {
    weights: Vec<f64>,
    scale: f64,
    /// The weights as f32, for the fused path (the first [`MAX_INPUTS`]).
    weights_f32: [f32; MAX_INPUTS],
}

impl TaskArithmetic {
    #[inline(always)]
    fn apply<A: Real>(&self, _start: u64, inputs: &[&[A]], out: &mut [A], _s: &mut KernelStats) {
        let base = inputs[0];
        out.fill(A::ZERO);
        for (x, &w) in inputs[1..].iter().zip(&self.weights) {
            let w = A::from_f64(w);
            for ((o, &v), &b) in out.iter_mut().zip(x.iter()).zip(base) {
                *o = *o + w * (v - b);
            }
        }
        let scale = A::from_f64(self.scale);
        for (o, &b) in out.iter_mut().zip(base) {
            *o = b + scale * *o;
        }
    }
}
impl_kernel!(TaskArithmetic, fused);

impl Pointwise for TaskArithmetic {
    fn accepts(&self, inputs: usize) -> bool {
        inputs == self.weights.len() + 1
    }

    #[inline(always)]
    fn point<const N: usize>(&self, x: &[f32; N]) -> Point {
        let base = x[0];
        let mut o = 0.0f32;
        for (&v, &w) in x[1..].iter().zip(&self.weights_f32) {
            o += w * (v - base);
        }
        Point::value(base + (self.scale as f32) * o)
    }
}

fn weights_and_scale(
    ctx: &Resolver<'_>,
    layout: Layout,
    normalize_default: bool,
) -> Result<(Vec<f64>, f64, bool)> {
    let weights: Vec<f64> = (0..layout.models)
        .map(|m| ctx.model_or(m, "weight", 1.0))
        .collect();
    let lambda = ctx.global_or("lambda", 1.0);
    let normalize = ctx.flag("normalize", normalize_default);
    Ok((weights, lambda, normalize))
}

pub(super) fn task_arithmetic(ctx: &Resolver<'_>, layout: Layout) -> Result<Box<dyn TensorKernel>> {
    let (weights, lambda, normalize) = weights_and_scale(ctx, layout, false)?;
    let sum: f64 = weights.iter().sum();
    let scale = if normalize {
        if sum == 0.0 {
            return Err(ctx.invalid(
                "the weights sum to 0, so they cannot be normalized; set normalize: false".into(),
            ));
        }
        lambda / sum
    } else {
        lambda
    };
    Ok(Box::new(TaskArithmetic {
        weights_f32: weights_f32(&weights),
        weights,
        scale,
    }))
}

/// The sparsification rule of one model's task vector.
#[derive(Clone, Copy, Debug)]
enum Mask {
    /// Keep the elements in `keep` and outside `drop`.
    Magnitude { keep: Band, drop: Band },
    /// Keep each element with probability `density`, by the counter-based generator.
    Random { key: u64, density: f64 },
}

/// A [`TopSet`] as two numbers, so that membership is a branch-free comparison:
/// `key > threshold || (key == threshold && index <= last_tie_index)`.
#[derive(Clone, Copy, Debug)]
struct Band {
    threshold: u32,
    last_tie_index: u64,
}

impl Band {
    fn new(set: TopSet) -> Band {
        match set {
            // Keys never exceed 0x7FFF_FFFF, so nothing is above or equal to u32::MAX.
            TopSet::Empty => Band {
                threshold: u32::MAX,
                last_tie_index: 0,
            },
            TopSet::All => Band {
                threshold: 0,
                last_tie_index: u64::MAX,
            },
            TopSet::Threshold {
                key,
                last_tie_index,
            } => Band {
                threshold: key,
                last_tie_index,
            },
        }
    }

    #[inline(always)]
    fn contains(&self, key: u32, index: u64) -> bool {
        (key > self.threshold) | ((key == self.threshold) & (index <= self.last_tie_index))
    }

    /// Returns how many leading elements of the tile `[start, start + len)` may be in the
    /// set when their key equals the threshold: element `j` of the tile is a kept tie
    /// exactly when `j < ties_below(start, len)`.
    fn ties_below(&self, start: u64, len: usize) -> u32 {
        let limit = self.last_tie_index.saturating_add(1).saturating_sub(start);
        limit.min(len as u64) as u32
    }
}

impl Mask {
    fn keeps(&self, tau: f32, index: u64) -> bool {
        match *self {
            Mask::Magnitude { keep, drop } => {
                let key = magnitude_key(tau);
                keep.contains(key, index) & !drop.contains(key, index)
            }
            Mask::Random { key, density } => rng::uniform(key, index) < density,
        }
    }
}

/// Writes `w * tau` where the mask keeps an element and 0 elsewhere, and returns the
/// number kept and the number of task-vector elements that are NaN or infinite. The mask
/// is decided on the f32 task vector in both precisions.
#[inline(always)]
fn sparsify<A: Real>(
    mask: Mask,
    w: A,
    x: &[A],
    base: &[A],
    start: u64,
    out: &mut [A],
) -> (u64, u64) {
    let mut non_finite = 0u32;
    for (&x, &b) in x.iter().zip(base) {
        // NaN or infinite when either input is.
        non_finite += !(x - b).is_finite() as u32;
    }
    let mut kept = 0u64;
    match mask {
        Mask::Magnitude { keep, drop } => {
            // Tie limits relative to this tile, so the loop compares 32-bit indices.
            let (keep_ties, drop_ties) = (
                keep.ties_below(start, out.len()),
                drop.ties_below(start, out.len()),
            );
            let mut count = 0u32;
            for (j, ((o, &x), &b)) in out.iter_mut().zip(x).zip(base).enumerate() {
                let key = magnitude_key(x.to_f32() - b.to_f32());
                let j = j as u32;
                let in_keep = (key > keep.threshold) | ((key == keep.threshold) & (j < keep_ties));
                let in_drop = (key > drop.threshold) | ((key == drop.threshold) & (j < drop_ties));
                let k = in_keep & !in_drop;
                count += k as u32;
                *o = if k { w * (x - b) } else { A::ZERO };
            }
            kept = count as u64;
        }
        Mask::Random { key, density } => {
            for (j, ((o, &x), &b)) in out.iter_mut().zip(x).zip(base).enumerate() {
                let k = rng::uniform(key, start + j as u64) < density;
                kept += k as u64;
                *o = if k { w * (x - b) } else { A::ZERO };
            }
        }
    }
    (kept, u64::from(non_finite))
}

/// The shared kernel of TIES, DARE and breadcrumbs.
struct Sparse {
    weights: Vec<f64>,
    masks: Vec<Mask>,
    rescales: Vec<f64>,
    sign_election: bool,
    normalize: bool,
    lambda: f64,
}

impl Sparse {
    #[inline(always)]
    fn apply<A: Real>(&self, start: u64, inputs: &[&[A]], out: &mut [A], stats: &mut KernelStats) {
        let base = inputs[0];
        let n = out.len();
        let models = self.weights.len();

        // Sparsified, weighted task vectors w_t * tau~_t, one row per model, then the
        // per-element sums, agreeing sums and agreeing weights. Every loop runs over
        // elements with the models outside, so it vectorises.
        let mut scratch = vec![A::ZERO; n * (models + 3)];
        let (weighted, rest) = scratch.split_at_mut(n * models);
        let (sum, rest) = rest.split_at_mut(n);
        let (agreed, divisor) = rest.split_at_mut(n);
        for m in 0..models {
            let w = A::from_f64(self.weights[m] * self.rescales[m]);
            let row = &mut weighted[m * n..(m + 1) * n];
            let (kept, non_finite) = sparsify(self.masks[m], w, inputs[1 + m], base, start, row);
            stats.kept += kept;
            stats.non_finite_inputs += non_finite;
        }
        stats.considered += (n * models) as u64;
        for row in weighted.chunks_exact(n) {
            for (s, &v) in sum.iter_mut().zip(row) {
                *s = *s + v;
            }
        }

        let lambda = A::from_f64(self.lambda);
        if self.sign_election {
            // A model agrees when its weighted value is non-zero with the elected sign
            // (sign of the sum, zero counted as positive).
            for (row, &w) in weighted.chunks_exact(n).zip(&self.weights) {
                let w = A::from_f64(w);
                for (((a, d), &v), &s) in agreed
                    .iter_mut()
                    .zip(divisor.iter_mut())
                    .zip(row)
                    .zip(sum.iter())
                {
                    let positive = s >= A::ZERO;
                    let agrees = (positive & (v > A::ZERO)) | (!positive & (v < A::ZERO));
                    *a = *a + if agrees { v } else { A::ZERO };
                    *d = *d + if agrees { w } else { A::ZERO };
                }
            }
            for (((o, &b), &a), &d) in out
                .iter_mut()
                .zip(base)
                .zip(agreed.iter())
                .zip(divisor.iter())
            {
                let merged = if self.normalize && d != A::ZERO {
                    a / d
                } else {
                    a
                };
                *o = b + lambda * merged;
            }
        } else {
            let total: f64 = self.weights.iter().sum();
            let divisor = A::from_f64(if self.normalize && total != 0.0 {
                total
            } else {
                1.0
            });
            for ((o, &b), &s) in out.iter_mut().zip(base).zip(sum.iter()) {
                let merged = if self.normalize { s / divisor } else { s };
                *o = b + lambda * merged;
            }
        }
    }
}
impl_kernel!(Sparse);

pub(super) fn sparse(
    ctx: &Resolver<'_>,
    layout: Layout,
    inputs: &TensorInputs<'_>,
) -> Result<Box<dyn TensorKernel>> {
    let kind = ctx.method.kind;
    let normalize_default = kind == MethodKind::Ties;
    let (weights, lambda, normalize) = weights_and_scale(ctx, layout, normalize_default)?;
    let n = inputs.elems;

    // Densities (and gammas) per model, validated.
    let mut densities = Vec::with_capacity(layout.models);
    for m in 0..layout.models {
        let d = match kind {
            MethodKind::Ties => ctx.model_or(m, "density", 1.0),
            _ => ctx.model_required(m, "density")?,
        };
        densities.push(ctx.check_range(
            &format!("density of model {}", m + 1),
            d,
            d > 0.0 && d <= 1.0,
            "(0, 1]",
        )?);
    }

    let key_of = |tiles: &[&[f32]], source: usize, keys: &mut [u32]| {
        let (x, b) = (tiles[layout.model(source)], tiles[layout.base()]);
        for ((k, &x), &b) in keys.iter_mut().zip(x).zip(b) {
            *k = magnitude_key(x - b);
        }
    };
    let masks: Vec<Mask> = match kind {
        MethodKind::Ties => {
            let jobs: Vec<SelectJob> = densities
                .iter()
                .enumerate()
                .map(|(m, &d)| SelectJob {
                    source: m,
                    k: top_k(d, n),
                })
                .collect();
            select_top(inputs, &jobs, key_of)?
                .into_iter()
                .map(|keep| Mask::Magnitude {
                    keep: Band::new(keep),
                    drop: Band::new(TopSet::Empty),
                })
                .collect()
        }
        MethodKind::Breadcrumbs | MethodKind::BreadcrumbsTies => {
            let mut jobs = Vec::with_capacity(2 * layout.models);
            for (m, &d) in densities.iter().enumerate() {
                let g = ctx.model_or(m, "gamma", 0.01);
                ctx.check_range(
                    &format!("gamma of model {}", m + 1),
                    g,
                    (0.0..1.0).contains(&g),
                    "[0, 1)",
                )?;
                let (top_drop, keep) = breadcrumbs_band(d, g, n);
                jobs.push(SelectJob {
                    source: m,
                    k: top_drop + keep,
                });
                jobs.push(SelectJob {
                    source: m,
                    k: top_drop,
                });
            }
            let sets = select_top(inputs, &jobs, key_of)?;
            sets.chunks(2)
                .map(|p| Mask::Magnitude {
                    keep: Band::new(p[0]),
                    drop: Band::new(p[1]),
                })
                .collect()
        }
        _ => {
            let seed = ctx.global_or("seed", 0.0) as u64;
            densities
                .iter()
                .enumerate()
                .map(|(m, &density)| Mask::Random {
                    key: rng::stream_key(seed, inputs.name, m),
                    density,
                })
                .collect()
        }
    };

    let rescales = match kind {
        MethodKind::DareLinear | MethodKind::DareTies => match ctx.method.rescale {
            Rescale::None => vec![1.0; layout.models],
            Rescale::Density => densities.iter().map(|d| 1.0 / d).collect(),
            Rescale::L1 => l1_rescales(inputs, layout, &masks)?,
        },
        _ => vec![1.0; layout.models],
    };
    let sign_election = matches!(
        kind,
        MethodKind::Ties | MethodKind::DareTies | MethodKind::BreadcrumbsTies
    );
    Ok(Box::new(Sparse {
        weights,
        masks,
        rescales,
        sign_election,
        normalize,
        lambda,
    }))
}

/// Number of elements TIES keeps: `max(1, floor(density * n))`, capped at n.
pub fn top_k(density: f64, n: u64) -> u64 {
    ((density * n as f64).floor() as u64).max(1).min(n)
}

/// Breadcrumbs' band in descending magnitude order: skip the `top_drop` largest, keep the
/// next `keep`. `keep = max(1, floor(density * n))`, `top_drop = floor(gamma * n)`, and
/// the band is moved down when it would run past n.
pub fn breadcrumbs_band(density: f64, gamma: f64, n: u64) -> (u64, u64) {
    let keep = top_k(density, n);
    let top_drop = ((gamma * n as f64).floor() as u64).min(n - keep);
    (top_drop, keep)
}

/// For DARE's L1 rule: `sum |tau| / sum |mask * tau|` per model, over the whole tensor.
fn l1_rescales(inputs: &TensorInputs<'_>, layout: Layout, masks: &[Mask]) -> Result<Vec<f64>> {
    let blocks = inputs.map_blocks::<f32, Vec<(f64, f64)>>(
        || vec![(0.0, 0.0); masks.len()],
        |sums, start, tiles| {
            for (m, (mask, sum)) in masks.iter().zip(sums.iter_mut()).enumerate() {
                let (x, b) = (tiles[layout.model(m)], tiles[layout.base()]);
                for (j, (&x, &b)) in x.iter().zip(b).enumerate() {
                    let tau = (x - b).abs() as f64;
                    sum.0 += tau;
                    if mask.keeps(x - b, start + j as u64) {
                        sum.1 += tau;
                    }
                }
            }
        },
    )?;
    let mut totals = vec![(0.0f64, 0.0f64); masks.len()];
    for block in blocks {
        for (t, b) in totals.iter_mut().zip(block) {
            t.0 += b.0;
            t.1 += b.1;
        }
    }
    Ok(totals
        .into_iter()
        .map(|(before, after)| if after > 0.0 { before / after } else { 1.0 })
        .collect())
}

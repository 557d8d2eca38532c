//! Methods weighted by Fisher (precision) estimates: Fisher averaging and
//! uncertainty-based gradient matching (Daheim et al., "Model Merging by
//! Uncertainty-Based Gradient Matching", ICLR 2024).
//!
//! ```text
//! fisher:    F~_t  = normalize(s_t * F_t) + epsilon      (or max(s_t * F_t, floor))
//!            theta = sum_t w_t F~_t theta_t / sum_t w_t F~_t
//! gradmatch: H0    = s_0 * F_0 + delta                   (F_0 = 0 without a base Fisher)
//!            Hbar  = H0 + sum_t alpha_t s_t F_t
//!            theta = theta_0 + sum_t alpha_t (H0 + s_t F_t) / Hbar * (theta_t - theta_0)
//! ```
//!
//! Fisher values that are negative, NaN or infinite are counted, and the engine stops the
//! merge when any are found. So are gradmatch elements with `Hbar <= 0`, which negative
//! weights can cause.

use super::fused::{Point, Pointwise, MAX_INPUTS};
use super::{impl_kernel, FisherNormalize, KernelStats, Layout, Resolver, TensorKernel};
use crate::convert::{Real, TILE_ELEMS};
use crate::error::Result;

/// Inputs a kernel call handles without allocating: a base, four models with Fishers
/// and a base Fisher.
const MAX_INLINE_INPUTS: usize = 10;

/// Default `epsilon` of Fisher averaging.
pub const DEFAULT_FISHER_EPSILON: f64 = 1e-8;
/// Default prior precision `delta` of gradmatch: the value of the authors' script.
pub const DEFAULT_DELTA: f64 = 1e-12;

#[inline(always)]
fn invalid_fisher<A: Real>(f: A) -> bool {
    // NaN compares false, and an infinity times zero is NaN.
    !(f >= A::ZERO && (f * A::ZERO) == A::ZERO)
}

struct Fisher {
    weights: Vec<f64>,
    scales: Vec<f64>,
    epsilon: f64,
    floor: Option<f64>,
    models: usize,
}

impl Fisher {
    #[inline(always)]
    fn apply<A: Real>(&self, _start: u64, inputs: &[&[A]], out: &mut [A], stats: &mut KernelStats) {
        let n = out.len();
        let mut numerator = vec![A::ZERO; n];
        let mut denominator = vec![A::ZERO; n];
        let epsilon = A::from_f64(self.epsilon);
        for m in 0..self.models {
            let (theta, fisher) = (inputs[m], inputs[self.models + m]);
            let w = A::from_f64(self.weights[m]);
            let s = A::from_f64(self.scales[m]);
            for j in 0..n {
                let f = fisher[j];
                stats.invalid_fisher += invalid_fisher(f) as u64;
                let scaled = s * f;
                let weight = match self.floor {
                    Some(floor) => {
                        let floor = A::from_f64(floor);
                        if scaled > floor {
                            scaled
                        } else {
                            floor
                        }
                    }
                    None => scaled + epsilon,
                };
                numerator[j] = numerator[j] + w * weight * theta[j];
                denominator[j] = denominator[j] + w * weight;
            }
        }
        for ((o, &num), &den) in out.iter_mut().zip(&numerator).zip(&denominator) {
            *o = num / den;
        }
    }
}
impl_kernel!(Fisher);

pub(super) fn fisher(ctx: &Resolver<'_>, layout: Layout) -> Result<Box<dyn TensorKernel>> {
    let models = layout.models;
    let weights: Vec<f64> = (0..models)
        .map(|m| ctx.model_or(m, "weight", 1.0))
        .collect();
    let mut scales = Vec::with_capacity(models);
    for m in 0..models {
        let default = ctx
            .method
            .default_fisher_scales
            .get(m)
            .copied()
            .unwrap_or(1.0);
        let s = ctx.model_or(m, "fisher_scale", default);
        ctx.check_range(
            &format!("fisher_scale of model {}", m + 1),
            s,
            s > 0.0,
            "(0, inf)",
        )?;
        let norm = match ctx.method.fisher_normalize {
            FisherNormalize::None => 1.0,
            FisherNormalize::L2 => {
                let n = ctx.method.fisher_norms.get(m).copied().unwrap_or(1.0);
                if n > 0.0 {
                    n
                } else {
                    1.0
                }
            }
        };
        scales.push(s / norm);
    }
    let epsilon = ctx.global_or("epsilon", DEFAULT_FISHER_EPSILON);
    ctx.check_range("epsilon", epsilon, epsilon >= 0.0, "[0, inf)")?;
    let floor = ctx.global("fisher_floor");
    if let Some(f) = floor {
        ctx.check_range("fisher_floor", f, f > 0.0, "(0, inf)")?;
    }
    if floor.is_none() && epsilon == 0.0 {
        return Err(ctx.invalid(
            "epsilon = 0 without fisher_floor divides 0 by 0 wherever every Fisher is 0; set epsilon > 0".into(),
        ));
    }
    Ok(Box::new(Fisher {
        weights,
        scales,
        epsilon,
        floor,
        models,
    }))
}

struct GradMatch {
    alphas: Vec<f64>,
    scales: Vec<f64>,
    delta: f64,
    base_scale: f64,
    layout: Layout,
    /// `alphas` and `scales` as f32, for the fused path (the first [`MAX_INPUTS`]).
    alphas_f32: [f32; MAX_INPUTS],
    scales_f32: [f32; MAX_INPUTS],
}

impl GradMatch {
    #[inline(always)]
    fn apply<A: Real>(&self, _start: u64, inputs: &[&[A]], out: &mut [A], stats: &mut KernelStats) {
        // Stack scratch of one tile: no allocation per call. Longer calls run tile by tile,
        // which gives the same values because the kernel is elementwise.
        let mut offset = 0;
        while offset < out.len() {
            let end = (offset + TILE_ELEMS).min(out.len());
            let tiles: [&[A]; MAX_INLINE_INPUTS] =
                std::array::from_fn(|i| inputs.get(i).map_or(&[][..], |x| &x[offset..end]));
            if inputs.len() <= MAX_INLINE_INPUTS {
                self.apply_tile(&tiles[..inputs.len()], &mut out[offset..end], stats);
            } else {
                let tiles: Vec<&[A]> = inputs.iter().map(|x| &x[offset..end]).collect();
                self.apply_tile(&tiles, &mut out[offset..end], stats);
            }
            offset = end;
        }
    }

    #[inline(always)]
    fn apply_tile<A: Real>(&self, inputs: &[&[A]], out: &mut [A], stats: &mut KernelStats) {
        let n = out.len();
        let l = self.layout;
        let base = inputs[l.base()];
        let delta = A::from_f64(self.delta);

        // H0 = s0 * F0 + delta.
        let mut h0 = [delta; TILE_ELEMS];
        let h0 = &mut h0[..n];
        if l.has_base_fisher {
            let s0 = A::from_f64(self.base_scale);
            for (h, &f) in h0.iter_mut().zip(inputs[l.base_fisher()]) {
                stats.invalid_fisher += invalid_fisher(f) as u64;
                *h = s0 * f + delta;
            }
        }

        // Hbar = H0 + sum_t alpha_t s_t F_t.
        let mut hbar = [delta; TILE_ELEMS];
        let hbar = &mut hbar[..n];
        hbar.copy_from_slice(h0);
        for m in 0..l.models {
            let a = A::from_f64(self.alphas[m]);
            let s = A::from_f64(self.scales[m]);
            let mut invalid = 0u32;
            for (h, &f) in hbar.iter_mut().zip(inputs[l.fisher(m)]) {
                invalid += invalid_fisher(f) as u32;
                *h = *h + a * (s * f);
            }
            stats.invalid_fisher += u64::from(invalid);
        }
        // NaN counts as non-positive.
        stats.nonpositive_precision += hbar
            .iter()
            .filter(|&&h| h.partial_cmp(&A::ZERO) != Some(std::cmp::Ordering::Greater))
            .count() as u64;

        // theta = theta_0 + sum_t alpha_t (H0 + s_t F_t) / Hbar * tau_t.
        out.fill(A::ZERO);
        for m in 0..l.models {
            let a = A::from_f64(self.alphas[m]);
            let s = A::from_f64(self.scales[m]);
            let (theta, fisher) = (&inputs[l.model(m)][..n], &inputs[l.fisher(m)][..n]);
            let base = &base[..n];
            for j in 0..n {
                let weight = a * (h0[j] + s * fisher[j]) / hbar[j];
                out[j] = out[j] + weight * (theta[j] - base[j]);
            }
        }
        for (o, &b) in out.iter_mut().zip(base) {
            *o = b + *o;
        }
    }
}
impl_kernel!(GradMatch, fused);

impl Pointwise for GradMatch {
    fn accepts(&self, inputs: usize) -> bool {
        // The input count alone then fixes the layout: 1 + 2M, plus 1 with a base Fisher.
        let l = self.layout;
        inputs == l.len() && l.has_base && l.has_fishers && (inputs % 2 == 0) == l.has_base_fisher
    }

    #[inline(always)]
    fn point<const N: usize>(&self, x: &[f32; N]) -> Point {
        // The operations of `apply_tile` for one element, in its order.
        let models = (N - 1) / 2;
        let has_base_fisher = N % 2 == 0;
        let base = x[0];
        let delta = self.delta as f32;

        // H0 and Hbar, counting invalid Fisher values on the way.
        let mut invalid = 0u32;
        let h0 = if has_base_fisher {
            let f = x[N - 1];
            invalid += invalid_fisher(f) as u32;
            (self.base_scale as f32) * f + delta
        } else {
            delta
        };
        let mut hbar = h0;
        for m in 0..models {
            let f = x[1 + models + m];
            invalid += invalid_fisher(f) as u32;
            hbar += self.alphas_f32[m] * (self.scales_f32[m] * f);
        }
        // A NaN precision counts as non-positive; this form compiles to one compare.
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        let nonpositive = (!(hbar > 0.0)) as u32;

        // theta_0 + sum_t alpha_t (H0 + s_t F_t) / Hbar * tau_t.
        let mut o = 0.0f32;
        for m in 0..models {
            let (a, s) = (self.alphas_f32[m], self.scales_f32[m]);
            let weight = a * (h0 + s * x[1 + models + m]) / hbar;
            o += weight * (x[1 + m] - base);
        }
        Point {
            value: base + o,
            invalid_fisher: invalid,
            nonpositive_precision: nonpositive,
        }
    }
}

pub(super) fn gradmatch(ctx: &Resolver<'_>, layout: Layout) -> Result<Box<dyn TensorKernel>> {
    let models = layout.models;
    let alphas: Vec<f64> = (0..models)
        .map(|m| ctx.model_or(m, "weight", 1.0))
        .collect();
    let mut scales = Vec::with_capacity(models);
    for m in 0..models {
        let default = ctx
            .method
            .default_fisher_scales
            .get(m)
            .copied()
            .unwrap_or(1.0);
        let s = ctx.model_or(m, "fisher_scale", default);
        scales.push(ctx.check_range(
            &format!("fisher_scale of model {}", m + 1),
            s,
            s > 0.0,
            "(0, inf)",
        )?);
    }
    let delta = ctx.global_or("delta", DEFAULT_DELTA);
    ctx.check_range(
        "delta",
        delta,
        delta > 0.0,
        "(0, inf): delta = 0 turns every element whose Fishers are all 0 into 0/0",
    )?;
    let base_scale = ctx.global_or("base_fisher_scale", ctx.method.default_base_fisher_scale);
    ctx.check_range(
        "base_fisher_scale",
        base_scale,
        base_scale > 0.0,
        "(0, inf)",
    )?;
    Ok(Box::new(GradMatch {
        alphas_f32: std::array::from_fn(|i| alphas.get(i).map_or(0.0, |&a| a as f32)),
        scales_f32: std::array::from_fn(|i| scales.get(i).map_or(0.0, |&s| s as f32)),
        alphas,
        scales,
        delta,
        base_scale,
        layout,
    }))
}

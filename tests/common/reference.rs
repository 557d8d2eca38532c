//! Plain f64 reference implementations of every merge method, one tensor at a time.
//!
//! Nothing here calls gradmerge's kernels. The only library functions used are
//! `method::rng::{stream_key, uniform}`, to draw the same DARE keep-masks as the engine.
//! Inputs are the exact decoded values of the stored tensors, so the stored f32, bf16 and
//! f16 values are exact in f64.

use gradmerge::method::rng::{stream_key, uniform};

/// Number of elements kept by magnitude trimming: `max(1, floor(density * n))`, at most n.
pub fn keep_count(density: f64, n: usize) -> usize {
    ((density * n as f64).floor() as usize).max(1).min(n)
}

/// Computes the task vector in f32: gradmerge decides every mask on these values.
pub fn task_vector_f32(model: &[f64], base: &[f64]) -> Vec<f32> {
    model
        .iter()
        .zip(base)
        .map(|(&x, &b)| x as f32 - b as f32)
        .collect()
}

/// Element indices sorted by magnitude, largest first, ties by lowest index.
fn magnitude_order(tau: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..tau.len()).collect();
    order.sort_by(|&i, &j| {
        tau[j]
            .abs()
            .partial_cmp(&tau[i].abs())
            .expect("finite task vectors")
            .then(i.cmp(&j))
    });
    order
}

/// Keep-mask of the `skip`-th to `(skip + keep)`-th largest magnitudes.
pub fn band_mask(tau: &[f32], skip: usize, keep: usize) -> Vec<bool> {
    let mut mask = vec![false; tau.len()];
    for &i in magnitude_order(tau).iter().skip(skip).take(keep) {
        mask[i] = true;
    }
    mask
}

/// TIES trim: keep the `keep_count(density, n)` largest magnitudes.
pub fn top_k_mask(tau: &[f32], density: f64) -> Vec<bool> {
    band_mask(tau, 0, keep_count(density, tau.len()))
}

/// Model Breadcrumbs: skip the `floor(gamma * n)` largest magnitudes (fewer when the kept
/// band would run past n), then keep the next `keep_count(density, n)`.
pub fn breadcrumbs_mask(tau: &[f32], density: f64, gamma: f64) -> Vec<bool> {
    let n = tau.len();
    let keep = keep_count(density, n);
    let skip = ((gamma * n as f64).floor() as usize).min(n - keep);
    band_mask(tau, skip, keep)
}

/// DARE: keep element i with probability `density`, by the engine's counter-based draws.
pub fn dare_mask(seed: u64, tensor: &str, model: usize, density: f64, n: usize) -> Vec<bool> {
    let key = stream_key(seed, tensor, model);
    (0..n).map(|i| uniform(key, i as u64) < density).collect()
}

/// DARE's L1 rule: `sum |tau| / sum |mask * tau|` over the f32 task vector, 1 when
/// nothing is kept.
pub fn l1_rescale(tau: &[f32], mask: &[bool]) -> f64 {
    let before: f64 = tau.iter().map(|t| t.abs() as f64).sum();
    let after: f64 = tau
        .iter()
        .zip(mask)
        .filter(|(_, &keep)| keep)
        .map(|(t, _)| t.abs() as f64)
        .sum();
    if after > 0.0 {
        before / after
    } else {
        1.0
    }
}

/// `sum_i w_i x_i`, divided by `sum_i w_i` when `normalize`.
pub fn linear(inputs: &[&[f64]], weights: &[f64], normalize: bool) -> Vec<f64> {
    let n = inputs[0].len();
    let total: f64 = weights.iter().sum();
    (0..n)
        .map(|j| {
            let sum: f64 = inputs.iter().zip(weights).map(|(x, w)| w * x[j]).sum();
            if normalize {
                sum / total
            } else {
                sum
            }
        })
        .collect()
}

/// `theta_0 + lambda * sum_t w_t tau_t`, the sum divided by `sum_t w_t` when `normalize`.
pub fn task_arithmetic(
    base: &[f64],
    models: &[&[f64]],
    weights: &[f64],
    lambda: f64,
    normalize: bool,
) -> Vec<f64> {
    let total: f64 = weights.iter().sum();
    (0..base.len())
        .map(|j| {
            let mut sum: f64 = models
                .iter()
                .zip(weights)
                .map(|(x, w)| w * (x[j] - base[j]))
                .sum();
            if normalize {
                sum /= total;
            }
            base[j] + lambda * sum
        })
        .collect()
}

/// The shared second half of TIES, DARE and breadcrumbs, after sparsification.
///
/// `masks[t]` and `rescales[t]` give `tau~_t = mask_t * rescale_t * tau_t`. With
/// `sign_election`, the elected sign is that of `sum_t w_t tau~_t` (zero counts as +),
/// and model t contributes where `w_t tau~_t` has exactly that sign (a zero never does).
/// With `normalize`, the sum is divided by the weights of the contributing models
/// (a divisor of 0 becomes 1), or by every weight without sign election.
pub struct Sparse<'a> {
    /// Per-model weights w_t.
    pub weights: &'a [f64],
    /// Per-model keep-masks.
    pub masks: &'a [Vec<bool>],
    /// Per-model rescale factors of the kept values.
    pub rescales: &'a [f64],
    /// TIES sign election and disjoint mean.
    pub sign_election: bool,
    /// Divide by the (agreeing) weights.
    pub normalize: bool,
    /// Scale of the merged task vector.
    pub lambda: f64,
}

impl Sparse<'_> {
    /// Merges one tensor.
    pub fn merge(&self, base: &[f64], models: &[&[f64]]) -> Vec<f64> {
        let n = base.len();
        let mut out = Vec::with_capacity(n);
        for j in 0..n {
            let weighted: Vec<f64> = (0..models.len())
                .map(|t| {
                    if self.masks[t][j] {
                        self.weights[t] * (self.rescales[t] * (models[t][j] - base[j]))
                    } else {
                        0.0
                    }
                })
                .collect();
            let sum: f64 = weighted.iter().sum();
            let merged = if self.sign_election {
                let elected = if sum >= 0.0 { 1.0 } else { -1.0 };
                let mut agreed = 0.0;
                let mut divisor = 0.0;
                for (t, &v) in weighted.iter().enumerate() {
                    if v != 0.0 && v.signum() == elected {
                        agreed += v;
                        divisor += self.weights[t];
                    }
                }
                if self.normalize && divisor != 0.0 {
                    agreed / divisor
                } else {
                    agreed
                }
            } else if self.normalize {
                let total: f64 = self.weights.iter().sum();
                sum / if total == 0.0 { 1.0 } else { total }
            } else {
                sum
            };
            out.push(base[j] + self.lambda * merged);
        }
        out
    }
}

/// Spherical interpolation from `x0` (t = 0) to `x1` (t = 1) over the flattened tensor.
pub fn slerp(x0: &[f64], x1: &[f64], t: f64) -> Vec<f64> {
    let norm = |v: &[f64]| {
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if n > 1e-8 {
            n
        } else {
            1.0
        }
    };
    let dot: f64 = x0.iter().zip(x1).map(|(a, b)| a * b).sum();
    let cos = (dot / (norm(x0) * norm(x1))).clamp(-1.0, 1.0);
    let (a, b) = if cos.abs() > 0.9995 {
        (1.0 - t, t)
    } else {
        let omega = cos.acos();
        let sin = omega.sin();
        ((omega - t * omega).sin() / sin, (t * omega).sin() / sin)
    };
    x0.iter().zip(x1).map(|(p, q)| a * p + b * q).collect()
}

/// Model Stock over rows of `row_elems` elements (the whole tensor when it equals n).
pub fn model_stock(base: &[f64], models: &[&[f64]], row_elems: usize) -> Vec<f64> {
    let k = models.len();
    let n = base.len();
    let mut out = Vec::with_capacity(n);
    for row_start in (0..n.max(1)).step_by(row_elems.max(1)) {
        let row = row_start..(row_start + row_elems).min(n);
        let tau = |t: usize| -> Vec<f64> { row.clone().map(|j| models[t][j] - base[j]).collect() };
        let taus: Vec<Vec<f64>> = (0..k).map(tau).collect();
        let norms: Vec<f64> = taus
            .iter()
            .map(|v| v.iter().map(|x| x * x).sum::<f64>().sqrt())
            .collect();
        let mut cos_sum = 0.0;
        let mut pairs = 0.0;
        for a in 0..k {
            for b in a + 1..k {
                let dot: f64 = taus[a].iter().zip(&taus[b]).map(|(x, y)| x * y).sum();
                cos_sum += (dot / (norms[a] * norms[b]).max(1e-6)).clamp(-1.0, 1.0);
                pairs += 1.0;
            }
        }
        let c = cos_sum / pairs;
        let denominator = 1.0 + (k as f64 - 1.0) * c;
        let ratio = if denominator.abs() < 1e-6 {
            0.0
        } else {
            k as f64 * c / denominator
        };
        for j in row {
            let mean = models.iter().map(|x| x[j]).sum::<f64>() / k as f64;
            out.push(ratio * mean + (1.0 - ratio) * base[j]);
        }
    }
    out
}

/// Fisher averaging: `sum_t w_t F~_t theta_t / sum_t w_t F~_t`, where
/// `F~_t = scales[t] * F_t + epsilon`, or `max(scales[t] * F_t, floor)` with a floor.
pub fn fisher(
    models: &[&[f64]],
    fishers: &[&[f64]],
    weights: &[f64],
    scales: &[f64],
    epsilon: f64,
    floor: Option<f64>,
) -> Vec<f64> {
    (0..models[0].len())
        .map(|j| {
            let mut numerator = 0.0;
            let mut denominator = 0.0;
            for t in 0..models.len() {
                let scaled = scales[t] * fishers[t][j];
                let f = match floor {
                    Some(floor) => scaled.max(floor),
                    None => scaled + epsilon,
                };
                numerator += weights[t] * f * models[t][j];
                denominator += weights[t] * f;
            }
            numerator / denominator
        })
        .collect()
}

/// Uncertainty-based gradient matching:
/// `theta_0 + sum_t alpha_t (H0 + s_t F_t) / (H0 + sum_s alpha_s s_s F_s) * tau_t` with
/// `H0 = s_0 F_0 + delta` (`F_0 = 0` without a base Fisher).
pub struct GradMatch<'a> {
    /// Per-model weights alpha_t.
    pub alphas: &'a [f64],
    /// Per-model Fisher scales s_t.
    pub scales: &'a [f64],
    /// The base Fisher and its scale s_0.
    pub base_fisher: Option<(&'a [f64], f64)>,
    /// Prior precision delta.
    pub delta: f64,
}

impl GradMatch<'_> {
    /// Merges one tensor.
    pub fn merge(&self, base: &[f64], models: &[&[f64]], fishers: &[&[f64]]) -> Vec<f64> {
        (0..base.len())
            .map(|j| {
                let h0 = self.delta + self.base_fisher.map_or(0.0, |(f, s0)| s0 * f[j]);
                let hbar = h0
                    + (0..models.len())
                        .map(|t| self.alphas[t] * self.scales[t] * fishers[t][j])
                        .sum::<f64>();
                let step: f64 = (0..models.len())
                    .map(|t| {
                        let precision = h0 + self.scales[t] * fishers[t][j];
                        self.alphas[t] * precision / hbar * (models[t][j] - base[j])
                    })
                    .sum();
                base[j] + step
            })
            .collect()
    }
}

/// The authors' script (Daheim et al., ICLR 2024, `uncertainty_based_gradient_matching.py`
/// in UKPLab/iclr2024-model-merging), which has one global scaling factor alpha:
///
/// ```text
/// preconditioner = 1 / (sum_t alpha s_t F_t + s_0 F_0 + delta)
/// summed         = sum_t preconditioner (s_t F_t + delta + s_0 F_0) tau_t
/// theta          = theta_0 + alpha * summed
/// ```
pub struct GradMatchScript<'a> {
    /// The global scaling factor alpha.
    pub alpha: f64,
    /// Per-model Fisher scales s_t.
    pub scales: &'a [f64],
    /// The base Fisher F_0.
    pub base_fisher: &'a [f64],
    /// The base Fisher's scale s_0.
    pub base_scale: f64,
    /// Prior precision delta.
    pub delta: f64,
}

impl GradMatchScript<'_> {
    /// Merges one tensor.
    pub fn merge(&self, base: &[f64], models: &[&[f64]], fishers: &[&[f64]]) -> Vec<f64> {
        (0..base.len())
            .map(|j| {
                let prior = self.base_scale * self.base_fisher[j];
                let total: f64 = (0..models.len())
                    .map(|t| self.alpha * self.scales[t] * fishers[t][j])
                    .sum();
                let preconditioner = 1.0 / (total + prior + self.delta);
                let summed: f64 = (0..models.len())
                    .map(|t| {
                        preconditioner
                            * (self.scales[t] * fishers[t][j] + self.delta + prior)
                            * (models[t][j] - base[j])
                    })
                    .sum();
                base[j] + self.alpha * summed
            })
            .collect()
    }
}

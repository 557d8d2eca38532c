//! Methods that need angles between whole tensors: slerp and Model Stock.
//!
//! Dot products and norms are summed in f64 per fixed block, and the blocks are added in
//! order, so the angles do not depend on chunk size or thread count.

use super::{impl_kernel, KernelStats, Layout, Resolver, TensorKernel};
use crate::convert::Real;
use crate::error::{Error, Result};
use crate::view::TensorInputs;

/// Norms below this are treated as 1 when normalising, as in mergekit's slerp.
const SLERP_NORM_EPS: f64 = 1e-8;
/// Above this |cos|, slerp falls back to linear interpolation.
const SLERP_DOT_THRESHOLD: f64 = 0.9995;

/// `a * theta_0 + b * theta_1`.
struct TwoPoint {
    a: f64,
    b: f64,
}

impl TwoPoint {
    #[inline(always)]
    fn apply<A: Real>(&self, _start: u64, inputs: &[&[A]], out: &mut [A], _s: &mut KernelStats) {
        let (a, b) = (A::from_f64(self.a), A::from_f64(self.b));
        for ((o, &x0), &x1) in out.iter_mut().zip(inputs[0]).zip(inputs[1]) {
            *o = a * x0 + b * x1;
        }
    }
}
impl_kernel!(TwoPoint);

pub(super) fn slerp(
    ctx: &Resolver<'_>,
    layout: Layout,
    inputs: &TensorInputs<'_>,
) -> Result<Box<dyn TensorKernel>> {
    if layout.models != 1 {
        return Err(Error::InvalidParameter(format!(
            "slerp interpolates exactly two models, the base and one other, but {} models besides the base were given; use linear or model_stock for more",
            layout.models
        )));
    }
    let t = ctx.global_required("t")?;
    ctx.check_range("t", t, (0.0..=1.0).contains(&t), "[0, 1]")?;

    // Dot product and squared norms of the raw vectors.
    let blocks = inputs.map_blocks::<f32, [f64; 3]>(
        || [0.0; 3],
        |acc, _, tiles| {
            for (&x0, &x1) in tiles[0].iter().zip(tiles[1]) {
                let (x0, x1) = (x0 as f64, x1 as f64);
                acc[0] += x0 * x1;
                acc[1] += x0 * x0;
                acc[2] += x1 * x1;
            }
        },
    )?;
    let [dot, n0, n1] = blocks.iter().fold([0.0; 3], |mut s, b| {
        for i in 0..3 {
            s[i] += b[i];
        }
        s
    });
    let (n0, n1) = (n0.sqrt(), n1.sqrt());
    let n0 = if n0 > SLERP_NORM_EPS { n0 } else { 1.0 };
    let n1 = if n1 > SLERP_NORM_EPS { n1 } else { 1.0 };
    let cos = (dot / (n0 * n1)).clamp(-1.0, 1.0);
    let (a, b) = slerp_coefficients(cos, t);
    Ok(Box::new(TwoPoint { a, b }))
}

/// Returns the coefficients of theta_0 and theta_1 for angle `acos(cos)` at `t`.
pub fn slerp_coefficients(cos: f64, t: f64) -> (f64, f64) {
    if cos.abs() > SLERP_DOT_THRESHOLD {
        return (1.0 - t, t);
    }
    let omega = cos.acos();
    let sin = omega.sin();
    (((1.0 - t) * omega).sin() / sin, (t * omega).sin() / sin)
}

/// `t * mean_t(theta_t) + (1 - t) * theta_0`, with `t` per tensor or per row.
struct ModelStock {
    ratios: Vec<f64>,
    row_elems: u64,
}

impl ModelStock {
    #[inline(always)]
    fn apply<A: Real>(&self, start: u64, inputs: &[&[A]], out: &mut [A], _s: &mut KernelStats) {
        let models = inputs.len() - 1;
        let inv = A::from_f64(1.0 / models as f64);
        for (j, o) in out.iter_mut().enumerate() {
            let mut sum = A::ZERO;
            for x in &inputs[1..] {
                sum = sum + x[j];
            }
            let row = ((start + j as u64) / self.row_elems) as usize;
            let t = A::from_f64(self.ratios[row.min(self.ratios.len() - 1)]);
            *o = t * (sum * inv) + (A::ONE - t) * inputs[0][j];
        }
    }
}
impl_kernel!(ModelStock);

pub(super) fn model_stock(
    ctx: &Resolver<'_>,
    layout: Layout,
    inputs: &TensorInputs<'_>,
) -> Result<Box<dyn TensorKernel>> {
    let k = layout.models;
    if k < 2 {
        return Err(Error::InvalidParameter(format!(
            "model_stock needs the base and at least two models, but {k} model besides the base was given"
        )));
    }
    let filter_wise = ctx.flag("filter_wise", false) && inputs.shape.len() >= 2;
    let row_elems = if filter_wise {
        inputs.shape[1..].iter().product::<u64>().max(1)
    } else {
        inputs.elems.max(1)
    };
    let rows = inputs.elems.div_ceil(row_elems).max(1) as usize;

    // Per row: dot products of every task-vector pair and squared norms, in f64. Rows are
    // summed in element order within each block, and blocks in order.
    let pairs: Vec<(usize, usize)> = (0..k)
        .flat_map(|i| (i + 1..k).map(move |j| (i, j)))
        .collect();
    let width = pairs.len() + k;
    let blocks =
        inputs.map_blocks::<f32, Vec<(usize, Vec<f64>)>>(Vec::new, |acc, start, tiles| {
            for (j, &base) in tiles[0].iter().enumerate() {
                let row = ((start + j as u64) / row_elems) as usize;
                if acc.last().map(|(r, _)| *r) != Some(row) {
                    acc.push((row, vec![0.0; width]));
                }
                let sums = &mut acc.last_mut().expect("pushed above").1;
                let base = base as f64;
                let tau = |m: usize| tiles[1 + m][j] as f64 - base;
                for (p, &(a, b)) in pairs.iter().enumerate() {
                    sums[p] += tau(a) * tau(b);
                }
                for m in 0..k {
                    sums[pairs.len() + m] += tau(m) * tau(m);
                }
            }
        })?;
    let mut totals = vec![vec![0.0f64; width]; rows];
    for block in blocks {
        for (row, sums) in block {
            for (t, s) in totals[row].iter_mut().zip(sums) {
                *t += s;
            }
        }
    }

    let ratios = totals
        .iter()
        .map(|sums| {
            let norms: Vec<f64> = (0..k).map(|m| sums[pairs.len() + m].sqrt()).collect();
            let cos_sum: f64 = pairs
                .iter()
                .enumerate()
                .map(|(p, &(a, b))| (sums[p] / (norms[a] * norms[b]).max(1e-6)).clamp(-1.0, 1.0))
                .sum();
            let c = cos_sum / pairs.len() as f64;
            let denominator = 1.0 + (k as f64 - 1.0) * c;
            if denominator.abs() < 1e-6 {
                0.0
            } else {
                k as f64 * c / denominator
            }
        })
        .collect();
    Ok(Box::new(ModelStock { ratios, row_elems }))
}

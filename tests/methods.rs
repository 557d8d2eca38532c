//! Every merge method against a plain f64 reference, the special cases that tie methods
//! together, byte-identical output across engine settings, and merges of the real MLP
//! checkpoints in `tests/data/mlp-digits` against their float64 golden files and test
//! accuracies.
//!
//! Merges run through `MergeJob` on safetensors files in a temporary folder and are read
//! back with the `safetensors` crate. With `Precision::F64`, every output value must equal
//! the reference rounded to the output dtype within one ulp.

#[path = "common/merge_io.rs"]
mod merge_io;
#[path = "common/reference.rs"]
mod reference;

use std::path::{Path, PathBuf};

use gradmerge::config::{MergeConfig, ModelEntry, TokenizerSource};
use gradmerge::dtype::Dtype;
use gradmerge::method::{FisherNormalize, MethodKind, Rescale};
use gradmerge::params::MergeParams;
use gradmerge::pipeline::{EngineOptions, Precision};
use gradmerge::source::IoMode;
use gradmerge::Error;

use merge_io::{
    assert_tensor_close, engine, ulp_distance, Case, Checkpoint, Merge, Profile,
    BASE_FISHER_EXAMPLES, FISHER_EXAMPLES, TIED_VALUES,
};
use reference as r;

/// Chunk sizes every reference comparison runs with: tiny, smaller than a tile
/// (1024 elements) and the default derived from the memory budget.
const CHUNKS: [Option<u64>; 3] = [Some(7), Some(1000), None];

/// Absolute difference allowed per unit of the largest input magnitude of a tensor: a
/// few f64 ulps (2^-52 is 2.2e-16) of the terms that a merge adds, for values that cancel
/// to nearly 0. It admits no difference for merged values above about 1e-7 times the
/// inputs, where one f32 ulp is larger.
const CANCELLATION_SLACK: f64 = 1e-14;

/// Runs `merge` once per chunk size in `chunks` and compares every output tensor with
/// `expected(name)`, within `max_ulps` of the output dtype.
fn check(
    case: &Case,
    merge: &Merge,
    precision: Precision,
    chunks: &[Option<u64>],
    max_ulps: u64,
    label: &str,
    expected: impl Fn(&str) -> Vec<f64>,
) {
    let reference: Vec<(String, Vec<u64>, Vec<f64>, f64)> = case
        .base
        .tensors
        .iter()
        .map(|t| {
            let largest = case
                .models
                .iter()
                .flat_map(|m| m.get(&t.name))
                .chain(&t.values)
                .fold(0.0f64, |a, &b| a.max(b.abs()));
            let slack = CANCELLATION_SLACK * largest;
            (t.name.clone(), t.shape.clone(), expected(&t.name), slack)
        })
        .collect();
    for &chunk in chunks {
        let out = merge.run(&case.out_dir(label), &engine(precision, chunk));
        assert_eq!(
            out.tensors.len(),
            reference.len(),
            "{label}: number of output tensors"
        );
        for (name, shape, values, slack) in &reference {
            let context = format!("{label}, chunk_elems {chunk:?}");
            assert_tensor_close(&out, name, shape, values, max_ulps, *slack, &context);
        }
    }
}

/// Runs the f32-output comparison that every method gets: `Precision::F64`, one ulp.
fn check_f64(case: &Case, merge: &Merge, label: &str, expected: impl Fn(&str) -> Vec<f64>) {
    check(case, merge, Precision::F64, &CHUNKS, 1, label, expected);
}

fn base_values<'a>(case: &'a Case, name: &str) -> &'a [f64] {
    case.base.get(name)
}

fn task_vectors_f32(case: &Case, name: &str) -> Vec<Vec<f32>> {
    let base = base_values(case, name);
    case.model_values(name)
        .iter()
        .map(|m| r::task_vector_f32(m, base))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Each method against the f64 reference.

#[test]
fn linear_matches_reference() {
    let case = Case::random(1, 3, Dtype::F32, Profile::General);
    let weights = [0.3, 1.2, 0.7];

    let merge = case.config(MethodKind::Linear).models("weight", &weights);
    check_f64(&case, &merge, "linear", |name| {
        r::linear(&case.model_values(name), &weights, true)
    });

    // The base as one more input, with its own weight, and no normalisation.
    let merge = case
        .config(MethodKind::Linear)
        .with_base(&case.base_path)
        .base_param("weight", 0.5)
        .models("weight", &weights)
        .global("normalize", 0.0);
    check_f64(&case, &merge, "linear with base", |name| {
        let mut inputs = vec![base_values(&case, name)];
        inputs.extend(case.model_values(name));
        r::linear(&inputs, &[0.5, 0.3, 1.2, 0.7], false)
    });
}

#[test]
fn task_arithmetic_matches_reference() {
    let case = Case::random(2, 3, Dtype::F32, Profile::General);
    let weights = [0.5, -0.7, 1.3];
    let merge = case
        .config(MethodKind::TaskArithmetic)
        .models("weight", &weights)
        .global("lambda", 0.8);
    check_f64(&case, &merge, "task_arithmetic", |name| {
        r::task_arithmetic(
            base_values(&case, name),
            &case.model_values(name),
            &weights,
            0.8,
            false,
        )
    });

    let merge = merge.global("normalize", 1.0);
    check_f64(&case, &merge, "task_arithmetic normalized", |name| {
        r::task_arithmetic(
            base_values(&case, name),
            &case.model_values(name),
            &weights,
            0.8,
            true,
        )
    });
}

/// TIES, DARE and breadcrumbs over one case, with the masks and rescales of `sparsify`.
fn sparse_reference(
    case: &Case,
    name: &str,
    weights: &[f64],
    sign_election: bool,
    normalize: bool,
    lambda: f64,
    sparsify: impl Fn(usize, &[f32]) -> (Vec<bool>, f64),
) -> Vec<f64> {
    let (masks, rescales): (Vec<Vec<bool>>, Vec<f64>) = task_vectors_f32(case, name)
        .iter()
        .enumerate()
        .map(|(m, tau)| sparsify(m, tau))
        .unzip();
    r::Sparse {
        weights,
        masks: &masks,
        rescales: &rescales,
        sign_election,
        normalize,
        lambda,
    }
    .merge(base_values(case, name), &case.model_values(name))
}

#[test]
fn ties_matches_reference() {
    let case = Case::random(3, 3, Dtype::F32, Profile::General);
    let weights = [1.0, 0.6, -0.4];
    let densities = [0.3, 0.5, 0.9];
    let merge = case
        .config(MethodKind::Ties)
        .models("weight", &weights)
        .models("density", &densities)
        .global("lambda", 1.1);
    let reference = |normalize: bool| {
        let case = &case;
        move |name: &str| {
            sparse_reference(case, name, &weights, true, normalize, 1.1, |m, tau| {
                (r::top_k_mask(tau, densities[m]), 1.0)
            })
        }
    };
    // normalize defaults to true for ties, as in mergekit.
    check_f64(&case, &merge, "ties", reference(true));
    let merge = merge.global("normalize", 0.0);
    check_f64(&case, &merge, "ties unnormalized", reference(false));
}

#[test]
fn ties_keeps_lowest_index_among_equal_magnitudes() {
    let case = Case::random(4, 2, Dtype::F32, Profile::General);
    let tau = &task_vectors_f32(&case, TIED_VALUES)[0];
    let k = r::keep_count(0.5, tau.len());
    let mut order: Vec<f32> = tau.iter().map(|t| t.abs()).collect();
    order.sort_by(|a, b| b.partial_cmp(a).unwrap());
    let threshold = order[k - 1];
    let at_threshold = tau.iter().filter(|t| t.abs() == threshold).count();
    let above = tau.iter().filter(|t| t.abs() > threshold).count();
    assert!(above < k, "the test data must have ties at the threshold");
    assert!(
        above + at_threshold > k,
        "the test data must have more ties than the top k can keep"
    );

    let merge = case
        .config(MethodKind::Ties)
        .first_models(1)
        .model(0, "density", 0.5)
        .global("normalize", 0.0);
    let out = merge.run(&case.out_dir("ties-one"), &engine(Precision::F64, Some(7)));
    let base = base_values(&case, TIED_VALUES);
    let merged = out.get(TIED_VALUES);
    let changed: Vec<usize> = (0..tau.len()).filter(|&j| merged[j] != base[j]).collect();
    let mask = r::top_k_mask(tau, 0.5);
    let nonzero_kept = (0..tau.len()).filter(|&j| mask[j] && tau[j] != 0.0).count();
    assert_eq!(changed.len(), nonzero_kept, "elements changed by the merge");
    for j in changed {
        assert!(
            mask[j],
            "element {j} (|tau| = {}) changed but is not in the top k",
            tau[j].abs()
        );
    }
}

#[test]
fn dare_linear_matches_reference() {
    let case = Case::random(5, 3, Dtype::F32, Profile::General);
    let weights = [0.9, 0.5, 1.4];
    let densities = [0.4, 0.6, 0.8];
    let seed = 17;
    let merge = case
        .config(MethodKind::DareLinear)
        .models("weight", &weights)
        .models("density", &densities)
        .global("seed", seed as f64)
        .global("lambda", 0.9);
    let reference = |rescale: Rescale| {
        let case = &case;
        move |name: &str| {
            let n = base_values(case, name).len();
            sparse_reference(case, name, &weights, false, false, 0.9, |m, tau| {
                let mask = r::dare_mask(seed, name, m, densities[m], n);
                let factor = match rescale {
                    Rescale::L1 => r::l1_rescale(tau, &mask),
                    Rescale::Density => 1.0 / densities[m],
                    Rescale::None => 1.0,
                };
                (mask, factor)
            })
        }
    };
    check_f64(&case, &merge, "dare_linear l1", reference(Rescale::L1));
    let merge = merge.rescale(Rescale::Density);
    check_f64(
        &case,
        &merge,
        "dare_linear density",
        reference(Rescale::Density),
    );
    let merge = merge.rescale(Rescale::None);
    check_f64(
        &case,
        &merge,
        "dare_linear no rescale",
        reference(Rescale::None),
    );
}

#[test]
fn dare_ties_matches_reference() {
    let case = Case::random(6, 3, Dtype::F32, Profile::General);
    let weights = [0.9, -0.5, 1.4];
    let densities = [0.3, 0.7, 0.5];
    let seed = 5;
    let merge = case
        .config(MethodKind::DareTies)
        .models("weight", &weights)
        .models("density", &densities)
        .global("seed", seed as f64);
    let reference = |normalize: bool| {
        let case = &case;
        move |name: &str| {
            let n = base_values(case, name).len();
            sparse_reference(case, name, &weights, true, normalize, 1.0, |m, tau| {
                let mask = r::dare_mask(seed, name, m, densities[m], n);
                let factor = r::l1_rescale(tau, &mask);
                (mask, factor)
            })
        }
    };
    // normalize defaults to false for dare_ties, as in mergekit.
    check_f64(&case, &merge, "dare_ties", reference(false));
    let merge = merge.global("normalize", 1.0);
    check_f64(&case, &merge, "dare_ties normalized", reference(true));
}

#[test]
fn breadcrumbs_matches_reference() {
    let case = Case::random(7, 3, Dtype::F32, Profile::General);
    let weights = [0.8, 1.1, 0.6];
    let densities = [0.5, 0.3, 0.9];
    let gammas = [0.05, 0.1, 0.2];
    let merge = case
        .config(MethodKind::Breadcrumbs)
        .models("weight", &weights)
        .models("density", &densities)
        .models("gamma", &gammas)
        .global("lambda", 0.7);
    check_f64(&case, &merge, "breadcrumbs", |name| {
        sparse_reference(&case, name, &weights, false, false, 0.7, |m, tau| {
            (r::breadcrumbs_mask(tau, densities[m], gammas[m]), 1.0)
        })
    });

    // The default gamma is 0.01.
    let merge = case
        .config(MethodKind::Breadcrumbs)
        .models("density", &densities)
        .global("normalize", 1.0);
    check_f64(&case, &merge, "breadcrumbs default gamma", |name| {
        sparse_reference(&case, name, &[1.0; 3], false, true, 1.0, |m, tau| {
            (r::breadcrumbs_mask(tau, densities[m], 0.01), 1.0)
        })
    });
}

#[test]
fn breadcrumbs_ties_matches_reference() {
    let case = Case::random(8, 3, Dtype::F32, Profile::General);
    let weights = [0.8, -0.3, 0.6];
    let densities = [0.6, 0.4, 0.7];
    let gammas = [0.1, 0.02, 0.3];
    let merge = case
        .config(MethodKind::BreadcrumbsTies)
        .models("weight", &weights)
        .models("density", &densities)
        .models("gamma", &gammas)
        .global("normalize", 1.0);
    check_f64(&case, &merge, "breadcrumbs_ties", |name| {
        sparse_reference(&case, name, &weights, true, true, 1.0, |m, tau| {
            (r::breadcrumbs_mask(tau, densities[m], gammas[m]), 1.0)
        })
    });
}

#[test]
fn slerp_matches_reference() {
    // The 0-d tensor and the few-valued tensor are (anti)parallel or nearly so, which
    // takes the linear fallback; the others take the spherical path.
    let case = Case::random(9, 1, Dtype::F32, Profile::General);
    for t in [0.0, 0.3, 0.75, 1.0] {
        let merge = case.config(MethodKind::Slerp).global("t", t);
        check_f64(&case, &merge, &format!("slerp t = {t}"), |name| {
            r::slerp(base_values(&case, name), case.models[0].get(name), t)
        });
    }
}

#[test]
fn model_stock_matches_reference() {
    let case = Case::random(10, 3, Dtype::F32, Profile::General);
    let merge = case.config(MethodKind::ModelStock);
    check_f64(&case, &merge, "model_stock", |name| {
        let n = base_values(&case, name).len();
        r::model_stock(base_values(&case, name), &case.model_values(name), n)
    });

    // Per row: the elements of one index along the first axis, for tensors of 2 or more
    // dimensions; 0-d and 1-d tensors stay whole.
    let merge = merge.global("filter_wise", 1.0);
    check_f64(&case, &merge, "model_stock filter_wise", |name| {
        let t = case.base.tensors.iter().find(|t| t.name == name).unwrap();
        let row = if t.shape.len() >= 2 {
            t.shape[1..].iter().product::<u64>() as usize
        } else {
            t.values.len()
        };
        r::model_stock(&t.values, &case.model_values(name), row)
    });
}

#[test]
fn model_stock_two_models_matches_reference() {
    let case = Case::random(11, 2, Dtype::F32, Profile::General);
    let merge = case.config(MethodKind::ModelStock);
    check_f64(&case, &merge, "model_stock two models", |name| {
        let n = base_values(&case, name).len();
        r::model_stock(base_values(&case, name), &case.model_values(name), n)
    });
}

#[test]
fn fisher_matches_reference() {
    let case = Case::random(12, 3, Dtype::F32, Profile::General);
    let weights = [1.0, 0.5, 2.0];
    let scales = &FISHER_EXAMPLES[..3];

    // fisher_scale defaults to each file's `fisher.examples`; epsilon defaults to 1e-8.
    let merge = case.config(MethodKind::Fisher).models("weight", &weights);
    check_f64(&case, &merge, "fisher", |name| {
        r::fisher(
            &case.model_values(name),
            &case.fisher_values(name),
            &weights,
            scales,
            1e-8,
            None,
        )
    });

    let set_scales = [2.0, 0.5, 7.0];
    let merge = merge
        .models("fisher_scale", &set_scales)
        .global("epsilon", 1e-3);
    check_f64(&case, &merge, "fisher with scales", |name| {
        r::fisher(
            &case.model_values(name),
            &case.fisher_values(name),
            &weights,
            &set_scales,
            1e-3,
            None,
        )
    });

    let merge = case
        .config(MethodKind::Fisher)
        .models("weight", &weights)
        .global("fisher_floor", 1e-3);
    check_f64(&case, &merge, "fisher_floor", |name| {
        r::fisher(
            &case.model_values(name),
            &case.fisher_values(name),
            &weights,
            scales,
            0.0,
            Some(1e-3),
        )
    });
}

#[test]
fn fisher_l2_normalize_matches_reference() {
    let case = Case::random(13, 3, Dtype::F32, Profile::General);
    // Each model's Fisher is divided by its L2 norm over every tensor of the file.
    let norms: Vec<f64> = case
        .fishers
        .iter()
        .map(|f| {
            f.tensors
                .iter()
                .flat_map(|t| &t.values)
                .map(|v| v * v)
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    let scales: Vec<f64> = (0..3).map(|m| FISHER_EXAMPLES[m] / norms[m]).collect();
    let merge = case
        .config(MethodKind::Fisher)
        .fisher_normalize(FisherNormalize::L2)
        .global("epsilon", 1e-4);
    check_f64(&case, &merge, "fisher l2", |name| {
        r::fisher(
            &case.model_values(name),
            &case.fisher_values(name),
            &[1.0; 3],
            &scales,
            1e-4,
            None,
        )
    });
}

#[test]
fn gradmatch_matches_reference() {
    let case = Case::random(14, 3, Dtype::F32, Profile::General);
    let alphas = [0.7, 1.0, 0.4];
    let scales = &FISHER_EXAMPLES[..3];

    // s_t and s_0 default to `fisher.examples`; delta defaults to 1e-12.
    let merge = case
        .config(MethodKind::GradMatch)
        .models("weight", &alphas)
        .with_base_fisher(&case.base_fisher_path);
    check_f64(&case, &merge, "gradmatch", |name| {
        r::GradMatch {
            alphas: &alphas,
            scales,
            base_fisher: Some((case.base_fisher.get(name), BASE_FISHER_EXAMPLES)),
            delta: 1e-12,
        }
        .merge(
            base_values(&case, name),
            &case.model_values(name),
            &case.fisher_values(name),
        )
    });

    let set_scales = [3.0, 0.25, 40.0];
    let merge = merge
        .models("fisher_scale", &set_scales)
        .global("base_fisher_scale", 9.0)
        .global("delta", 1e-3);
    check_f64(&case, &merge, "gradmatch with scales", |name| {
        r::GradMatch {
            alphas: &alphas,
            scales: &set_scales,
            base_fisher: Some((case.base_fisher.get(name), 9.0)),
            delta: 1e-3,
        }
        .merge(
            base_values(&case, name),
            &case.model_values(name),
            &case.fisher_values(name),
        )
    });

    let merge = case
        .config(MethodKind::GradMatch)
        .models("weight", &alphas)
        .global("delta", 1e-8);
    check_f64(&case, &merge, "gradmatch without base Fisher", |name| {
        r::GradMatch {
            alphas: &alphas,
            scales,
            base_fisher: None,
            delta: 1e-8,
        }
        .merge(
            base_values(&case, name),
            &case.model_values(name),
            &case.fisher_values(name),
        )
    });
}

#[test]
fn gradmatch_negative_weight_matches_reference() {
    let mut case = Case::random(15, 2, Dtype::F32, Profile::General);
    // Model 2's scaled Fisher is half the base's, so with alpha = -0.4 the merged
    // precision stays above 0.8 * s_0 * F_0 + delta.
    let s1 = FISHER_EXAMPLES[1];
    for (t, b) in case.fishers[1]
        .tensors
        .iter_mut()
        .zip(&case.base_fisher.tensors)
    {
        t.values = b
            .values
            .iter()
            .map(|f| merge_io::quantize(0.5 * BASE_FISHER_EXAMPLES * f / s1, Dtype::F32))
            .collect();
    }
    case.fishers[1].write(&case.fisher_paths[1]);

    let alphas = [1.0, -0.4];
    let merge = case
        .config(MethodKind::GradMatch)
        .models("weight", &alphas)
        .with_base_fisher(&case.base_fisher_path);
    check_f64(&case, &merge, "gradmatch negative weight", |name| {
        r::GradMatch {
            alphas: &alphas,
            scales: &FISHER_EXAMPLES[..2],
            base_fisher: Some((case.base_fisher.get(name), BASE_FISHER_EXAMPLES)),
            delta: 1e-12,
        }
        .merge(
            base_values(&case, name),
            &case.model_values(name),
            &case.fisher_values(name),
        )
    });
}

#[test]
fn gradmatch_nonpositive_precision_fails() {
    let case = Case::random(16, 2, Dtype::F32, Profile::General);
    let merge = case
        .config(MethodKind::GradMatch)
        .models("weight", &[1.0, -2.0]);
    let dest = case.out_dir("negative");
    let err = merge
        .run_with(&dest, &engine(Precision::F32, None), IoMode::Mmap)
        .expect_err("a merged precision <= 0 must stop the merge");
    assert!(
        matches!(err, Error::NonPositivePrecision { count, .. } if count > 0),
        "unexpected error: {err}"
    );
    assert!(!dest.exists(), "a failed merge left {}", dest.display());
}

// ---------------------------------------------------------------------------------------
// Other input and output dtypes.

#[test]
fn f32_arithmetic_bf16_output_within_one_ulp() {
    let case = Case::random(17, 3, Dtype::BF16, Profile::NoCancellation);
    let chunks = [Some(1000), None];
    // Weights that are binary fractions keep w * tau exact, so that a TIES sign vote that
    // is exactly 0 is 0 in f32 and f64 alike (bf16 task vectors often cancel exactly).
    let weights = [0.5, 0.75, 0.25];
    let densities = [0.5, 0.7, 0.4];
    let scales = &FISHER_EXAMPLES[..3];
    let check_bf16 = |merge: &Merge, label: &str, expected: &dyn Fn(&str) -> Vec<f64>| {
        check(&case, merge, Precision::F32, &chunks, 1, label, expected);
    };

    let merge = case.config(MethodKind::Linear).models("weight", &weights);
    check_bf16(&merge, "linear bf16", &|name| {
        r::linear(&case.model_values(name), &weights, true)
    });

    let merge = case
        .config(MethodKind::TaskArithmetic)
        .models("weight", &weights);
    check_bf16(&merge, "task_arithmetic bf16", &|name| {
        r::task_arithmetic(
            base_values(&case, name),
            &case.model_values(name),
            &weights,
            1.0,
            false,
        )
    });

    let merge = case
        .config(MethodKind::Ties)
        .models("weight", &weights)
        .models("density", &densities);
    check_bf16(&merge, "ties bf16", &|name| {
        sparse_reference(&case, name, &weights, true, true, 1.0, |m, tau| {
            (r::top_k_mask(tau, densities[m]), 1.0)
        })
    });

    let merge = case
        .config(MethodKind::DareTies)
        .models("weight", &weights)
        .models("density", &densities)
        .global("seed", 3.0);
    check_bf16(&merge, "dare_ties bf16", &|name| {
        let n = base_values(&case, name).len();
        sparse_reference(&case, name, &weights, true, false, 1.0, |m, tau| {
            let mask = r::dare_mask(3, name, m, densities[m], n);
            let factor = r::l1_rescale(tau, &mask);
            (mask, factor)
        })
    });

    let merge = case
        .config(MethodKind::BreadcrumbsTies)
        .models("density", &densities)
        .models("gamma", &[0.1, 0.1, 0.1]);
    check_bf16(&merge, "breadcrumbs_ties bf16", &|name| {
        sparse_reference(&case, name, &[1.0; 3], true, false, 1.0, |m, tau| {
            (r::breadcrumbs_mask(tau, densities[m], 0.1), 1.0)
        })
    });

    let merge = case
        .config(MethodKind::Slerp)
        .first_models(1)
        .global("t", 0.4);
    check_bf16(&merge, "slerp bf16", &|name| {
        r::slerp(base_values(&case, name), case.models[0].get(name), 0.4)
    });

    let merge = case.config(MethodKind::ModelStock);
    check_bf16(&merge, "model_stock bf16", &|name| {
        let n = base_values(&case, name).len();
        r::model_stock(base_values(&case, name), &case.model_values(name), n)
    });

    let merge = case.config(MethodKind::Fisher).models("weight", &weights);
    check_bf16(&merge, "fisher bf16", &|name| {
        r::fisher(
            &case.model_values(name),
            &case.fisher_values(name),
            &weights,
            scales,
            1e-8,
            None,
        )
    });

    let merge = case
        .config(MethodKind::GradMatch)
        .models("weight", &weights)
        .with_base_fisher(&case.base_fisher_path);
    check_bf16(&merge, "gradmatch bf16", &|name| {
        r::GradMatch {
            alphas: &weights,
            scales,
            base_fisher: Some((case.base_fisher.get(name), BASE_FISHER_EXAMPLES)),
            delta: 1e-12,
        }
        .merge(
            base_values(&case, name),
            &case.model_values(name),
            &case.fisher_values(name),
        )
    });
}

#[test]
fn f64_arithmetic_narrow_outputs_within_one_ulp() {
    // bf16 inputs to f32 output, and f32 inputs to bf16 and f16 output, in f64.
    let bf16_case = Case::random(18, 3, Dtype::BF16, Profile::General);
    let alphas = [0.5, 1.5, 1.0];
    let gradmatch = |case: &Case, name: &str| {
        r::GradMatch {
            alphas: &alphas,
            scales: &FISHER_EXAMPLES[..3],
            base_fisher: None,
            delta: 1e-6,
        }
        .merge(
            base_values(case, name),
            &case.model_values(name),
            &case.fisher_values(name),
        )
    };
    let merge = bf16_case
        .config(MethodKind::GradMatch)
        .models("weight", &alphas)
        .global("delta", 1e-6);
    check_f64(
        &bf16_case,
        &merge.clone().out_dtype(Dtype::F32),
        "gradmatch bf16 to f32",
        |name| gradmatch(&bf16_case, name),
    );
    check_f64(&bf16_case, &merge, "gradmatch bf16 to bf16", |name| {
        gradmatch(&bf16_case, name)
    });

    let f32_case = Case::random(19, 3, Dtype::F32, Profile::General);
    let merge = f32_case
        .config(MethodKind::GradMatch)
        .models("weight", &alphas)
        .global("delta", 1e-6);
    for dtype in [Dtype::BF16, Dtype::F16] {
        let merge = merge.clone().out_dtype(dtype);
        check_f64(
            &f32_case,
            &merge,
            &format!("gradmatch f32 to {dtype}"),
            |name| gradmatch(&f32_case, name),
        );
    }
}

#[test]
fn f16_inputs_match_reference() {
    let case = Case::random(20, 3, Dtype::F16, Profile::General);
    let weights = [0.5, -0.25, 1.0];
    let densities = [0.6, 0.5, 0.4];
    let merge = case
        .config(MethodKind::Ties)
        .models("weight", &weights)
        .models("density", &densities);
    check_f64(&case, &merge, "ties f16", |name| {
        sparse_reference(&case, name, &weights, true, true, 1.0, |m, tau| {
            (r::top_k_mask(tau, densities[m]), 1.0)
        })
    });
}

// ---------------------------------------------------------------------------------------
// Special cases that tie methods together.

/// Asserts that two merged checkpoints hold the same tensors within `max_ulps`.
fn assert_outputs_close(a: &Checkpoint, b: &Checkpoint, max_ulps: u64, label: &str) {
    assert_eq!(a.tensors.len(), b.tensors.len(), "{label}: tensor count");
    for t in &a.tensors {
        assert_tensor_close(b, &t.name, &t.shape, &t.values, max_ulps, 0.0, label);
    }
}

#[test]
fn gradmatch_zero_fishers_is_task_arithmetic() {
    // Without cancellation, so that f32 arithmetic stays within a few ulps of f64.
    let mut case = Case::random(21, 3, Dtype::F32, Profile::NoCancellation);
    for fisher in case.fishers.iter_mut().chain([&mut case.base_fisher]) {
        for t in &mut fisher.tensors {
            t.values.fill(0.0);
        }
    }
    for (fisher, path) in case.fishers.iter().zip(&case.fisher_paths) {
        fisher.write(path);
    }
    case.base_fisher.write(&case.base_fisher_path);

    let alphas = [0.7, -0.3, 1.2];
    let ta = case
        .config(MethodKind::TaskArithmetic)
        .models("weight", &alphas)
        .run(&case.out_dir("ta"), &engine(Precision::F64, None));
    for with_base_fisher in [false, true] {
        let mut merge = case
            .config(MethodKind::GradMatch)
            .models("weight", &alphas)
            .global("delta", 1e-8);
        if with_base_fisher {
            merge = merge.with_base_fisher(&case.base_fisher_path);
        }
        for precision in [Precision::F64, Precision::F32] {
            let gm = merge.run(&case.out_dir("gm"), &engine(precision, None));
            let label = format!("zero Fishers, base Fisher {with_base_fisher}, {precision:?}");
            // f32 arithmetic may round alpha * delta / delta, and the sums, differently.
            let max_ulps = if precision == Precision::F64 { 1 } else { 4 };
            assert_outputs_close(&ta, &gm, max_ulps, &label);
        }
    }
}

#[test]
fn gradmatch_tiny_prior_is_fisher_averaging() {
    // With H0 = delta -> 0, weights alpha_t = 1 and every Fisher > 0, gradmatch becomes
    // sum_t s_t F_t theta_t / sum_t s_t F_t. Differences are of order delta / (s F),
    // below 1e-8 here, plus the rounding of theta_0 + sum tau against sum theta.
    let mut case = Case::random(22, 3, Dtype::F32, Profile::NoCancellation);
    for fisher in &mut case.fishers {
        for t in &mut fisher.tensors {
            for v in &mut t.values {
                *v = merge_io::quantize(*v + 1e-3, Dtype::F32);
            }
        }
    }
    for (fisher, path) in case.fishers.iter().zip(&case.fisher_paths) {
        fisher.write(path);
    }
    let options = engine(Precision::F64, None);
    let fisher = case
        .config(MethodKind::Fisher)
        .global("epsilon", 1e-12)
        .run(&case.out_dir("fisher"), &options);
    let gm = case
        .config(MethodKind::GradMatch)
        .global("delta", 1e-12)
        .run(&case.out_dir("gm"), &options);
    assert_outputs_close(&fisher, &gm, 2, "gradmatch with delta 1e-12 against fisher");
}

#[test]
fn gradmatch_equal_alpha_matches_authors_script() {
    let case = Case::random(23, 3, Dtype::F32, Profile::General);
    for alpha in [0.3, 1.0, 1.5] {
        let merge = case
            .config(MethodKind::GradMatch)
            .models("weight", &[alpha; 3])
            .with_base_fisher(&case.base_fisher_path)
            .global("delta", 1e-8);
        check(
            &case,
            &merge,
            Precision::F64,
            &[None],
            1,
            &format!("gradmatch alpha {alpha} against the authors' script"),
            |name| {
                r::GradMatchScript {
                    alpha,
                    scales: &FISHER_EXAMPLES[..3],
                    base_fisher: case.base_fisher.get(name),
                    base_scale: BASE_FISHER_EXAMPLES,
                    delta: 1e-8,
                }
                .merge(
                    base_values(&case, name),
                    &case.model_values(name),
                    &case.fisher_values(name),
                )
            },
        );
    }
}

#[test]
fn breadcrumbs_zero_gamma_is_magnitude_pruning() {
    let case = Case::random(24, 3, Dtype::F32, Profile::General);
    let weights = [0.8, 1.0, -0.5];
    let densities = [0.3, 0.6, 0.45];
    let options = engine(Precision::F64, Some(1000));
    let breadcrumbs = case
        .config(MethodKind::Breadcrumbs)
        .models("weight", &weights)
        .models("density", &densities)
        .models("gamma", &[0.0; 3]);
    // TIES' trim followed by task arithmetic, without sign election.
    check(
        &case,
        &breadcrumbs,
        Precision::F64,
        &[Some(1000)],
        1,
        "breadcrumbs gamma 0",
        |name| {
            let base = base_values(&case, name);
            let pruned: Vec<Vec<f64>> = task_vectors_f32(&case, name)
                .iter()
                .zip(case.model_values(name))
                .zip(densities)
                .map(|((tau, model), d)| {
                    let mask = r::top_k_mask(tau, d);
                    (0..base.len())
                        .map(|j| if mask[j] { model[j] } else { base[j] })
                        .collect()
                })
                .collect();
            let pruned: Vec<&[f64]> = pruned.iter().map(Vec::as_slice).collect();
            r::task_arithmetic(base, &pruned, &weights, 1.0, false)
        },
    );

    // With sign election, gamma 0 is TIES, to the byte.
    let with_election = case
        .config(MethodKind::BreadcrumbsTies)
        .models("weight", &weights)
        .models("density", &densities)
        .models("gamma", &[0.0; 3])
        .global("normalize", 1.0);
    let ties = case
        .config(MethodKind::Ties)
        .models("weight", &weights)
        .models("density", &densities);
    let a = case.out_dir("breadcrumbs-ties");
    let b = case.out_dir("ties");
    with_election.run(&a, &options);
    ties.run(&b, &options);
    assert_eq!(
        std::fs::read(a.join("model.safetensors")).unwrap(),
        std::fs::read(b.join("model.safetensors")).unwrap(),
        "breadcrumbs_ties with gamma 0 differs from ties"
    );
}

#[test]
fn ties_full_density_one_model_is_task_arithmetic() {
    let case = Case::random(25, 1, Dtype::F32, Profile::General);
    for precision in [Precision::F32, Precision::F64] {
        for (weight, normalize) in [(1.0, true), (0.6, false), (-0.4, false)] {
            let label = format!("ties weight {weight}, normalize {normalize}, {precision:?}");
            let options = engine(precision, Some(1000));
            let ties = case
                .config(MethodKind::Ties)
                .model(0, "weight", weight)
                .global("normalize", if normalize { 1.0 } else { 0.0 });
            let ta = case
                .config(MethodKind::TaskArithmetic)
                .model(0, "weight", weight);
            let a = case.out_dir("ties");
            let b = case.out_dir("ta");
            ties.run(&a, &options);
            ta.run(&b, &options);
            assert_eq!(
                std::fs::read(a.join("model.safetensors")).unwrap(),
                std::fs::read(b.join("model.safetensors")).unwrap(),
                "{label}: output differs from task arithmetic"
            );
        }
    }
}

#[test]
fn linear_one_model_returns_it_exactly() {
    for dtype in [Dtype::F32, Dtype::BF16, Dtype::F16] {
        let case = Case::random(26, 1, dtype, Profile::General);
        let original = Checkpoint::read(&case.model_paths[0]);
        for precision in [Precision::F32, Precision::F64] {
            for weight in [1.0, 0.3, 7.0] {
                let label = format!("linear of one {dtype} model, weight {weight}, {precision:?}");
                let out = case.out_dir("linear");
                case.config(MethodKind::Linear)
                    .model(0, "weight", weight)
                    .run(&out, &engine(precision, Some(1000)));
                let merged = Checkpoint::read(&out.join("model.safetensors"));
                for t in &original.tensors {
                    let got = merged.get(&t.name);
                    for (j, (&x, &y)) in t.values.iter().zip(got).enumerate() {
                        assert!(
                            x.to_bits() == y.to_bits(),
                            "{label}: `{}`[{j}] is {y}, the input is {x}",
                            t.name
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn empty_tensors_merge_for_every_method() {
    let shapes: [(&str, &[u64]); 3] = [
        ("layers.0.empty", &[0]),
        ("layers.0.no_columns", &[4, 0]),
        ("layers.0.bias", &[5]),
    ];
    let case = Case::with_shapes(29, 2, Dtype::F32, Profile::General, &shapes);
    for method in MethodKind::ALL {
        let mut merge = case.config(method);
        if method.model_parameters().contains(&"density") {
            merge = merge.models("density", &[0.5, 0.5]);
        }
        if method == MethodKind::Slerp {
            merge = merge.first_models(1).global("t", 0.5);
        }
        let out = merge.run(
            &case.out_dir(method.name()),
            &engine(Precision::F32, Some(7)),
        );
        for (name, shape) in shapes {
            let tensor = out
                .tensors
                .iter()
                .find(|t| t.name == name)
                .unwrap_or_else(|| panic!("{method}: output has no tensor `{name}`"));
            assert_eq!(tensor.shape, shape, "{method}: shape of `{name}`");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Determinism across engine settings.

fn engine_options(threads: usize, chunk: Option<u64>, depth: Option<usize>) -> EngineOptions {
    EngineOptions {
        threads,
        chunk_elems: chunk,
        channel_depth: depth,
        ..EngineOptions::default()
    }
}

/// The merges whose output must not change with engine settings: those with whole-tensor
/// reductions (thresholds, random masks with L1 norms, angles, global Fisher norms) and
/// gradmatch.
fn determinism_merges(case: &Case) -> Vec<Merge> {
    vec![
        case.config(MethodKind::Ties)
            .models("density", &[0.3, 0.5, 0.7])
            .models("weight", &[1.0, -0.5, 0.8]),
        case.config(MethodKind::DareTies)
            .models("density", &[0.3, 0.5, 0.7])
            .global("seed", 11.0),
        case.config(MethodKind::GradMatch)
            .models("weight", &[0.5, 1.0, 0.8])
            .with_base_fisher(&case.base_fisher_path),
        case.config(MethodKind::ModelStock)
            .global("filter_wise", 1.0),
        case.config(MethodKind::ModelStock),
        case.config(MethodKind::Breadcrumbs)
            .models("density", &[0.3, 0.5, 0.7])
            .models("gamma", &[0.05, 0.1, 0.0]),
        case.config(MethodKind::Fisher)
            .fisher_normalize(FisherNormalize::L2),
    ]
}

/// Runs every determinism merge of `case` with each engine setting in `variants`, in f32
/// and f64, and asserts that the output files are identical to the byte.
fn assert_identical_outputs(case: &Case, variants: &[(&str, EngineOptions, IoMode)]) {
    for merge in determinism_merges(case) {
        let method = merge.config.method;
        for precision in [Precision::F32, Precision::F64] {
            let mut first: Option<(&str, Vec<u8>)> = None;
            for (label, options, io) in variants {
                let options = EngineOptions {
                    precision,
                    ..options.clone()
                };
                let dest = case.out_dir(method.name());
                merge
                    .run_with(&dest, &options, *io)
                    .unwrap_or_else(|e| panic!("{method} with {label}: {e}"));
                let bytes = std::fs::read(dest.join("model.safetensors")).unwrap();
                match &first {
                    None => first = Some((label, bytes)),
                    Some((first_label, first_bytes)) => assert!(
                        *first_bytes == bytes,
                        "{method}, {precision:?}: output with {label} differs from {first_label}"
                    ),
                }
            }
        }
    }
}

#[test]
fn output_identical_across_threads_and_io() {
    // Includes the tensor larger than one reduction block, so that reductions over
    // several blocks run on one and on two threads.
    let case = Case::random(27, 3, Dtype::BF16, Profile::General);
    assert_identical_outputs(
        &case,
        &[
            ("threads 1", engine_options(1, None, None), IoMode::Mmap),
            ("threads 2", engine_options(2, None, None), IoMode::Mmap),
            (
                "threads 1, chunk 7, read",
                engine_options(1, Some(7), None),
                IoMode::Read,
            ),
            (
                "threads 2, chunk 1000, channel 1, read",
                engine_options(2, Some(1000), Some(1)),
                IoMode::Read,
            ),
            (
                "threads 2, chunk 2^22",
                engine_options(2, Some(1 << 22), None),
                IoMode::Mmap,
            ),
        ],
    );
}

#[test]
fn output_identical_with_one_element_chunks() {
    // Every tensor but the one larger than a reduction block, to keep one-element chunks
    // fast.
    let small: Vec<(&str, &[u64])> = merge_io::SHAPES
        .iter()
        .copied()
        .filter(|(name, _)| *name != merge_io::LARGE)
        .collect();
    let case = Case::with_shapes(28, 3, Dtype::F32, Profile::General, &small);
    assert_identical_outputs(
        &case,
        &[
            ("threads 1", engine_options(1, None, None), IoMode::Mmap),
            (
                "threads 2, chunk 1, channel 1",
                engine_options(2, Some(1), Some(1)),
                IoMode::Mmap,
            ),
            (
                "threads 1, chunk 1, read",
                engine_options(1, Some(1), None),
                IoMode::Read,
            ),
        ],
    );
}

#[test]
fn fused_path_matches_tile_path() {
    // The fused kernels (linear, task_arithmetic, gradmatch on BF16 or F32) must give the
    // bytes of the tile kernels. F16 inputs and gradmatch with four models and a base
    // Fisher (ten inputs) take the tile path either way, and are here to show that the
    // fallback is chosen without changing anything.
    for dtype in [Dtype::BF16, Dtype::F32, Dtype::F16] {
        let case = Case::random(29, 4, dtype, Profile::General);
        for models in 1..=4 {
            let mut merges = vec![
                case.config(MethodKind::Linear).first_models(models),
                case.config(MethodKind::Linear)
                    .models("weight", &[0.3, -0.2, 0.5, 0.4])
                    .global("normalize", 0.0)
                    .first_models(models),
                case.config(MethodKind::TaskArithmetic)
                    .models("weight", &[1.0, -0.5, 0.8, 0.3])
                    .global("lambda", 0.7)
                    .first_models(models),
                case.config(MethodKind::GradMatch)
                    .models("weight", &[0.5, 1.0, 0.8, 0.6])
                    .first_models(models),
                case.config(MethodKind::GradMatch)
                    .models("weight", &[0.5, 1.0, 0.8, 0.6])
                    .with_base_fisher(&case.base_fisher_path)
                    .first_models(models),
            ];
            if dtype != Dtype::F32 {
                merges.push(
                    case.config(MethodKind::TaskArithmetic)
                        .out_dtype(Dtype::F32)
                        .first_models(models),
                );
            } else {
                merges.push(
                    case.config(MethodKind::GradMatch)
                        .out_dtype(Dtype::BF16)
                        .first_models(models),
                );
            }
            for merge in merges {
                let mut outputs = Vec::new();
                for fused in [true, false] {
                    let options = EngineOptions {
                        fused,
                        chunk_elems: Some(5000),
                        ..EngineOptions::default()
                    };
                    let dest = case.out_dir("fused");
                    merge
                        .run_with(&dest, &options, IoMode::Mmap)
                        .unwrap_or_else(|e| {
                            panic!("{} ({dtype}, {models} models): {e}", merge.config.method)
                        });
                    outputs.push(std::fs::read(dest.join("model.safetensors")).unwrap());
                }
                assert!(
                    outputs[0] == outputs[1],
                    "{} ({dtype}, {models} models, out {:?}): fused and tile outputs differ",
                    merge.config.method,
                    merge.config.out_dtype
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Real checkpoints: the MLP on transformed digits.

const DOMAINS: [&str; 5] = ["original", "rot30", "mirror", "shift", "thick"];
const TASKS: [&str; 4] = ["rot30", "mirror", "shift", "thick"];

fn mlp_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/mlp-digits")
}

/// Builds the merge of the four fine-tuned MLPs of the `dtype` folder into their base,
/// every model with weight `alpha`.
fn mlp_merge(method: MethodKind, dtype: &str, alpha: f64, base_fisher: bool) -> MergeConfig {
    let dir = mlp_dir().join(dtype);
    let mut params = MergeParams::default();
    for _ in TASKS {
        let mut map = gradmerge::params::ParamMap::new();
        map.insert(
            "weight".to_string(),
            gradmerge::params::ParamValue::Scalar(alpha),
        );
        params.models.push(map);
    }
    if method == MethodKind::GradMatch {
        params.global.insert(
            "delta".to_string(),
            gradmerge::params::ParamValue::Scalar(1e-8),
        );
    }
    MergeConfig {
        method,
        base_model: method
            .uses_base()
            .then(|| dir.join("models/base.safetensors")),
        base_fisher: base_fisher.then(|| dir.join("fishers/base.safetensors")),
        models: TASKS
            .iter()
            .map(|t| ModelEntry {
                path: dir.join(format!("models/{t}.safetensors")),
                fisher: method
                    .uses_fishers()
                    .then(|| dir.join(format!("fishers/{t}.safetensors"))),
            })
            .collect(),
        params,
        dtype: None,
        out_dtype: None,
        tokenizer_source: TokenizerSource::Base,
        rescale: Rescale::L1,
        fisher_normalize: FisherNormalize::None,
        layer_range: None,
    }
}

fn run_mlp(config: MergeConfig, out_dtype: Option<Dtype>, precision: Precision) -> Checkpoint {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("merged");
    let merge = Merge {
        config: MergeConfig {
            out_dtype,
            ..config
        },
    };
    merge.run(&dest, &engine(precision, None))
}

fn read_mlp(relative: &str) -> Checkpoint {
    Checkpoint::read(&mlp_dir().join(relative))
}

#[test]
fn mlp_merges_match_golden_files() {
    let cases = [
        (
            "ta-alpha1",
            mlp_merge(MethodKind::TaskArithmetic, "f32", 1.0, false),
        ),
        (
            "ubgm-alpha1",
            mlp_merge(MethodKind::GradMatch, "f32", 1.0, true),
        ),
        (
            "ubgm-alpha1-no-base-fisher",
            mlp_merge(MethodKind::GradMatch, "f32", 1.0, false),
        ),
    ];
    for (golden_name, config) in cases {
        let golden = read_mlp(&format!("golden/{golden_name}.safetensors"));
        let merged = run_mlp(config, None, Precision::F64);
        assert_eq!(merged.dtype, Dtype::F32, "{golden_name}: output dtype");
        assert_eq!(
            merged.tensors.len(),
            golden.tensors.len(),
            "{golden_name}: tensors"
        );
        for t in &golden.tensors {
            assert_tensor_close(&merged, &t.name, &t.shape, &t.values, 1, 0.0, golden_name);
        }
    }
}

#[test]
fn mlp_bf16_merges_match_reference() {
    let dir = "bf16";
    let base = read_mlp(&format!("{dir}/models/base.safetensors"));
    let models: Vec<Checkpoint> = TASKS
        .iter()
        .map(|t| read_mlp(&format!("{dir}/models/{t}.safetensors")))
        .collect();
    let fishers: Vec<Checkpoint> = TASKS
        .iter()
        .map(|t| read_mlp(&format!("{dir}/fishers/{t}.safetensors")))
        .collect();
    let base_fisher = read_mlp(&format!("{dir}/fishers/base.safetensors"));
    let examples = |c: &Checkpoint| -> f64 {
        c.metadata
            .iter()
            .find(|(k, _)| k == "fisher.examples")
            .expect("fisher.examples metadata")
            .1
            .parse()
            .unwrap()
    };
    let scales: Vec<f64> = fishers.iter().map(examples).collect();
    let s0 = examples(&base_fisher);
    assert_eq!(
        base.dtype,
        Dtype::BF16,
        "the bf16 folder holds bf16 tensors"
    );

    let alpha = 0.75;
    let alphas = [alpha; 4];
    for (precision, out_dtype) in [
        (Precision::F64, Dtype::F32),
        (Precision::F64, Dtype::BF16),
        (Precision::F32, Dtype::BF16),
    ] {
        let label = format!("{precision:?} to {out_dtype}");
        let ta = run_mlp(
            mlp_merge(MethodKind::TaskArithmetic, dir, alpha, false),
            Some(out_dtype),
            precision,
        );
        let gm = run_mlp(
            mlp_merge(MethodKind::GradMatch, dir, alpha, true),
            Some(out_dtype),
            precision,
        );
        for t in &base.tensors {
            let model_values: Vec<&[f64]> = models.iter().map(|m| m.get(&t.name)).collect();
            let fisher_values: Vec<&[f64]> = fishers.iter().map(|f| f.get(&t.name)).collect();
            let expected = r::task_arithmetic(&t.values, &model_values, &alphas, 1.0, false);
            assert_tensor_close(
                &ta,
                &t.name,
                &t.shape,
                &expected,
                1,
                0.0,
                &format!("ta {label}"),
            );
            let expected = r::GradMatch {
                alphas: &alphas,
                scales: &scales,
                base_fisher: Some((base_fisher.get(&t.name), s0)),
                delta: 1e-8,
            }
            .merge(&t.values, &model_values, &fisher_values);
            assert_tensor_close(
                &gm,
                &t.name,
                &t.shape,
                &expected,
                1,
                0.0,
                &format!("gradmatch {label}"),
            );
        }
    }
}

/// A test set: 64 inputs in [0, 1] per example, and the labels.
struct TestSet {
    inputs: Vec<f32>,
    labels: Vec<i64>,
}

fn read_test_set(domain: &str) -> TestSet {
    let bytes = std::fs::read(mlp_dir().join(format!("test/{domain}.safetensors"))).unwrap();
    let parsed = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let inputs = parsed.tensor("inputs").unwrap();
    let labels = parsed.tensor("labels").unwrap();
    assert_eq!(inputs.shape()[1], 64, "{domain}: inputs per example");
    TestSet {
        inputs: inputs
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        labels: labels
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect(),
    }
}

/// Counts the correct predictions of `W2 relu(W1 relu(W0 x + b0) + b1) + b2` (weights as
/// `nn.Linear` stores them, `[out, in]`), computed in f32 like the PyTorch evaluation.
fn correct_predictions(model: &Checkpoint, set: &TestSet) -> usize {
    let layers: Vec<(Vec<f32>, Vec<f32>)> = (0..3)
        .map(|i| {
            let w = model.get(&format!("layers.{i}.weight"));
            let b = model.get(&format!("layers.{i}.bias"));
            (
                w.iter().map(|&v| v as f32).collect(),
                b.iter().map(|&v| v as f32).collect(),
            )
        })
        .collect();
    let mut correct = 0;
    for (x, &label) in set.inputs.chunks_exact(64).zip(&set.labels) {
        let mut activation = x.to_vec();
        for (i, (w, b)) in layers.iter().enumerate() {
            let inputs = activation.len();
            let mut next: Vec<f32> = b
                .iter()
                .enumerate()
                .map(|(o, &bias)| {
                    let row = &w[o * inputs..(o + 1) * inputs];
                    bias + row.iter().zip(&activation).map(|(a, b)| a * b).sum::<f32>()
                })
                .collect();
            if i < 2 {
                next.iter_mut().for_each(|v| *v = v.max(0.0));
            }
            activation = next;
        }
        let predicted = (0..activation.len())
            .max_by(|&a, &b| activation[a].total_cmp(&activation[b]).then(b.cmp(&a)))
            .unwrap();
        correct += (predicted as i64 == label) as usize;
    }
    correct
}

/// Asserts that `model` reaches the accuracies of `results.json` on every domain, to
/// within one test example.
fn assert_accuracies(
    model: &Checkpoint,
    expected: &serde_json::Value,
    sets: &[TestSet],
    label: &str,
) {
    for (domain, set) in DOMAINS.iter().zip(sets) {
        let accuracy = expected[domain]
            .as_f64()
            .unwrap_or_else(|| panic!("{label}: results.json has no accuracy for {domain}"));
        let examples = set.labels.len();
        let want = (accuracy * examples as f64).round() as i64;
        let got = correct_predictions(model, set) as i64;
        assert!(
            (got - want).abs() <= 1,
            "{label} on {domain}: {got} of {examples} correct, results.json has {accuracy} ({want})"
        );
    }
}

#[test]
fn mlp_accuracies_match_results() {
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(mlp_dir().join("results.json")).unwrap()).unwrap();
    let sets: Vec<TestSet> = DOMAINS.iter().map(|d| read_test_set(d)).collect();

    // The forward pass itself, on the unmerged models.
    for (name, model) in ["base"]
        .iter()
        .chain(&TASKS)
        .map(|n| (*n, read_mlp(&format!("f32/models/{n}.safetensors"))))
    {
        assert_accuracies(&model, &results["single_models"][name], &sets, name);
    }

    let merges = results["merges"].as_array().unwrap();
    let mut checked = 0;
    for entry in merges {
        let method = entry["method"].as_str().unwrap();
        let alpha = entry["alpha"].as_f64();
        let config = match (method, alpha) {
            ("task_arithmetic", Some(a)) => mlp_merge(MethodKind::TaskArithmetic, "f32", a, false),
            ("ubgm", Some(a)) => mlp_merge(MethodKind::GradMatch, "f32", a, true),
            ("ubgm_no_base_fisher", Some(a)) => mlp_merge(MethodKind::GradMatch, "f32", a, false),
            ("average", None) => mlp_merge(MethodKind::Linear, "f32", 1.0, false),
            ("fisher_average", None) => {
                // This entry averages the stored (mean) Fishers, without s_t.
                let mut config = mlp_merge(MethodKind::Fisher, "f32", 1.0, false);
                for model in &mut config.params.models {
                    model.insert(
                        "fisher_scale".to_string(),
                        gradmerge::params::ParamValue::Scalar(1.0),
                    );
                }
                config
            }
            _ => continue,
        };
        let merged = run_mlp(config, None, Precision::F64);
        let label = format!("{method} alpha {alpha:?}");
        assert_accuracies(&merged, &entry["accuracy"], &sets, &label);
        checked += 1;
    }
    assert_eq!(checked, 16, "merges of results.json checked");
}

#[test]
fn ulp_distance_counts_units() {
    // The comparison helper itself: one f32 ulp above 1 is 2^-23.
    let one_up = 1.0 + f32::EPSILON as f64;
    assert_eq!(ulp_distance(one_up, 1.0, Dtype::F32), 1);
    assert_eq!(
        ulp_distance(1.0, 1.0 + 0.4 * f32::EPSILON as f64, Dtype::F32),
        0
    );
    assert_eq!(ulp_distance(-0.0, 0.0, Dtype::F32), 0);
    assert_eq!(ulp_distance(1.0 + 1.0 / 128.0, 1.0, Dtype::BF16), 1);
    assert_eq!(
        ulp_distance(
            f32::MIN_POSITIVE as f64,
            -(f32::MIN_POSITIVE as f64),
            Dtype::F32
        ),
        2 * (1 << 23)
    );
}

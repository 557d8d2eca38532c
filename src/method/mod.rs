//! Merge methods: their names, parameters, per-tensor preparation and elementwise kernels.
//!
//! A method turns the inputs of one output tensor into a [`TensorKernel`] in
//! [`Method::prepare`], which resolves the parameters for that tensor and runs any
//! whole-tensor reductions (thresholds, norms) over the mapped inputs. The kernel then
//! maps tiles of inputs to tiles of output, elementwise.
//!
//! Input order, fixed for every method: the base (for methods that use one), the models,
//! the models' Fisher files (for `fisher` and `gradmatch`), the base Fisher (optional, for
//! `gradmatch`). See [`Layout`].

mod arith;
pub mod fused;
mod geometric;
mod precision;
pub mod rng;
pub mod select;

use std::fmt;
use std::str::FromStr;

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::params::{LayerPosition, MergeParams};
use crate::view::TensorInputs;

/// A merge method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MethodKind {
    /// Weighted average of the models (and the base, if given).
    Linear,
    /// Base plus weighted task vectors.
    TaskArithmetic,
    /// TIES: magnitude trim, sign election, disjoint mean.
    Ties,
    /// DARE random drop and rescale, then task arithmetic.
    DareLinear,
    /// DARE random drop and rescale, then TIES sign election.
    DareTies,
    /// Model Breadcrumbs: drop the largest and smallest magnitudes, then task arithmetic.
    Breadcrumbs,
    /// Model Breadcrumbs with TIES sign election.
    BreadcrumbsTies,
    /// Spherical interpolation between the base and one model.
    Slerp,
    /// Model Stock: interpolation towards the base by the task vectors' angles.
    ModelStock,
    /// Fisher-weighted averaging.
    Fisher,
    /// Uncertainty-based gradient matching.
    GradMatch,
}

impl MethodKind {
    /// Every method, in documentation order.
    pub const ALL: [MethodKind; 11] = [
        MethodKind::Linear,
        MethodKind::TaskArithmetic,
        MethodKind::Ties,
        MethodKind::DareLinear,
        MethodKind::DareTies,
        MethodKind::Breadcrumbs,
        MethodKind::BreadcrumbsTies,
        MethodKind::Slerp,
        MethodKind::ModelStock,
        MethodKind::Fisher,
        MethodKind::GradMatch,
    ];

    /// Returns the configuration name (`task_arithmetic`).
    pub fn name(self) -> &'static str {
        match self {
            MethodKind::Linear => "linear",
            MethodKind::TaskArithmetic => "task_arithmetic",
            MethodKind::Ties => "ties",
            MethodKind::DareLinear => "dare_linear",
            MethodKind::DareTies => "dare_ties",
            MethodKind::Breadcrumbs => "breadcrumbs",
            MethodKind::BreadcrumbsTies => "breadcrumbs_ties",
            MethodKind::Slerp => "slerp",
            MethodKind::ModelStock => "model_stock",
            MethodKind::Fisher => "fisher",
            MethodKind::GradMatch => "gradmatch",
        }
    }

    /// True when the method reads a base model.
    pub fn uses_base(self) -> bool {
        !matches!(self, MethodKind::Linear | MethodKind::Fisher)
    }

    /// True when the method requires a base model.
    pub fn requires_base(self) -> bool {
        self.uses_base()
    }

    /// True when the method reads one Fisher file per model.
    pub fn uses_fishers(self) -> bool {
        matches!(self, MethodKind::Fisher | MethodKind::GradMatch)
    }

    /// Numeric parameters a model's `parameters:` block may set.
    pub fn model_parameters(self) -> &'static [&'static str] {
        match self {
            MethodKind::Linear | MethodKind::TaskArithmetic => &["weight"],
            MethodKind::Ties | MethodKind::DareLinear | MethodKind::DareTies => {
                &["weight", "density"]
            }
            MethodKind::Breadcrumbs | MethodKind::BreadcrumbsTies => {
                &["weight", "density", "gamma"]
            }
            MethodKind::Slerp | MethodKind::ModelStock => &[],
            MethodKind::Fisher | MethodKind::GradMatch => &["weight", "fisher_scale"],
        }
    }

    /// Numeric parameters the global `parameters:` block may set (model parameters too,
    /// as defaults for every model).
    pub fn global_parameters(self) -> &'static [&'static str] {
        match self {
            MethodKind::Linear => &["normalize"],
            MethodKind::TaskArithmetic => &["lambda", "normalize"],
            MethodKind::Ties => &["lambda", "normalize"],
            MethodKind::DareLinear | MethodKind::DareTies => &["lambda", "normalize", "seed"],
            MethodKind::Breadcrumbs | MethodKind::BreadcrumbsTies => &["lambda", "normalize"],
            MethodKind::Slerp => &["t"],
            MethodKind::ModelStock => &["filter_wise"],
            MethodKind::Fisher => &["epsilon", "fisher_floor"],
            MethodKind::GradMatch => &["delta", "base_fisher_scale"],
        }
    }
}

impl fmt::Display for MethodKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for MethodKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<MethodKind> {
        if let Some(kind) = MethodKind::ALL.into_iter().find(|k| k.name() == s) {
            return Ok(kind);
        }
        let names: Vec<&str> = MethodKind::ALL.iter().map(|k| k.name()).collect();
        let hint = crate::suggest::nearest(s, &names)
            .map(|n| format!("; did you mean `{n}`?"))
            .unwrap_or_default();
        Err(Error::InvalidParameter(format!(
            "unknown merge method `{s}`{hint} (known: {})",
            names.join(", ")
        )))
    }
}

/// The rescaling rule DARE applies to the kept values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Rescale {
    /// Scale so the tensor's L1 norm is unchanged (mergekit's rule, the default).
    #[default]
    L1,
    /// Divide by the density (the DARE paper's rule).
    Density,
    /// Keep the values as they are.
    None,
}

/// Normalisation of Fisher estimates before `fisher` averaging.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FisherNormalize {
    /// Use the Fishers as stored (the default).
    #[default]
    None,
    /// Divide each model's Fisher by its L2 norm over all tensors.
    L2,
}

/// The position of each input in a kernel's input list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// True when input 0 is the base model.
    pub has_base: bool,
    /// Number of models (excluding the base).
    pub models: usize,
    /// True when one Fisher per model follows the models.
    pub has_fishers: bool,
    /// True when the base Fisher is the last input.
    pub has_base_fisher: bool,
}

impl Layout {
    /// Index of the base model.
    pub fn base(&self) -> usize {
        debug_assert!(self.has_base);
        0
    }
    /// Index of model `m`.
    pub fn model(&self, m: usize) -> usize {
        self.has_base as usize + m
    }
    /// Index of model `m`'s Fisher.
    pub fn fisher(&self, m: usize) -> usize {
        debug_assert!(self.has_fishers);
        self.has_base as usize + self.models + m
    }
    /// Index of the base Fisher.
    pub fn base_fisher(&self) -> usize {
        debug_assert!(self.has_base_fisher);
        self.has_base as usize + self.models * (1 + self.has_fishers as usize)
    }
    /// Number of inputs.
    pub fn len(&self) -> usize {
        self.has_base as usize
            + self.models * (1 + self.has_fishers as usize)
            + self.has_base_fisher as usize
    }
    /// True when there are no inputs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Counters a kernel updates while it runs, summed per tensor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelStats {
    /// Task-vector elements kept by TIES, DARE or breadcrumbs (over all models).
    pub kept: u64,
    /// Task-vector elements considered by the sparsifier (over all models).
    pub considered: u64,
    /// Fisher elements that are negative, NaN or infinite.
    pub invalid_fisher: u64,
    /// gradmatch elements where the merged precision is <= 0.
    pub nonpositive_precision: u64,
    /// Task-vector elements that are NaN or infinite where a sparsifying method (TIES,
    /// DARE, breadcrumbs) would drop them instead of carrying them into the output.
    pub non_finite_inputs: u64,
}

impl KernelStats {
    /// Adds another chunk's counters.
    pub fn add(&mut self, other: &KernelStats) {
        self.kept += other.kept;
        self.considered += other.considered;
        self.invalid_fisher += other.invalid_fisher;
        self.nonpositive_precision += other.nonpositive_precision;
        self.non_finite_inputs += other.non_finite_inputs;
    }
}

/// The elementwise part of a method for one tensor, with its parameters resolved.
///
/// `start` is the index of the tile's first element in the tensor, and `inputs` contains one
/// slice per input in [`Layout`] order, all as long as `out`.
pub trait TensorKernel: Send + Sync {
    /// Computes one tile in f32.
    fn apply_f32(&self, start: u64, inputs: &[&[f32]], out: &mut [f32], stats: &mut KernelStats);
    /// Computes one tile in f64.
    fn apply_f64(&self, start: u64, inputs: &[&[f64]], out: &mut [f64], stats: &mut KernelStats);

    /// True when [`apply_stored`](Self::apply_stored) handles `inputs` inputs stored as
    /// `in_dtype` and written as `out_dtype`, given aligned data. The default is false.
    fn has_stored_path(&self, inputs: usize, in_dtype: Dtype, out_dtype: Dtype) -> bool {
        let _ = (inputs, in_dtype, out_dtype);
        false
    }

    /// Computes a whole range in f32 straight from the stored bytes of every input (all of
    /// `in_dtype`) and appends the encoded output to `out` (see [`fused`]). Returns
    /// `None`, with `out` untouched, when the kernel has no such path for these inputs. The
    /// engine then uses the tiles of [`apply_f32`](Self::apply_f32), which give the same
    /// bits.
    fn apply_stored(
        &self,
        inputs: &[&[u8]],
        in_dtype: Dtype,
        out_dtype: Dtype,
        out: &mut Vec<u8>,
    ) -> Option<fused::FusedCounts> {
        let _ = (inputs, in_dtype, out_dtype, out);
        None
    }
}

/// Implements [`TensorKernel`] for a type with a generic `apply<A: Real>` method; with
/// `fused`, also the stored-bytes path of a type that implements [`fused::Pointwise`].
macro_rules! impl_kernel {
    ($t:ty) => {
        $crate::method::impl_kernel!(@impl $t;);
    };
    ($t:ty, fused) => {
        $crate::method::impl_kernel!(@impl $t;
            fn has_stored_path(
                &self,
                inputs: usize,
                in_dtype: $crate::dtype::Dtype,
                out_dtype: $crate::dtype::Dtype,
            ) -> bool {
                $crate::method::fused::supports(self, inputs, in_dtype, out_dtype)
            }
            fn apply_stored(
                &self,
                inputs: &[&[u8]],
                in_dtype: $crate::dtype::Dtype,
                out_dtype: $crate::dtype::Dtype,
                out: &mut Vec<u8>,
            ) -> Option<$crate::method::fused::FusedCounts> {
                $crate::method::fused::run(self, inputs, in_dtype, out_dtype, out)
            }
        );
    };
    (@impl $t:ty; $($extra:item)*) => {
        impl $crate::method::TensorKernel for $t {
            fn apply_f32(
                &self,
                start: u64,
                inputs: &[&[f32]],
                out: &mut [f32],
                stats: &mut $crate::method::KernelStats,
            ) {
                // The f32 kernels are compiled twice, and the AVX2 copy runs where the CPU
                // has it (see `convert::dispatch_avx2`); f64 is the slow path anyway.
                #[inline(always)]
                fn portable(
                    kernel: &$t,
                    start: u64,
                    inputs: &[&[f32]],
                    out: &mut [f32],
                    stats: &mut $crate::method::KernelStats,
                ) {
                    kernel.apply::<f32>(start, inputs, out, stats)
                }
                let kernel = self;
                $crate::convert::dispatch_avx2!(portable(
                    kernel: &$t,
                    start: u64,
                    inputs: &[&[f32]],
                    out: &mut [f32],
                    stats: &mut $crate::method::KernelStats
                ))
            }
            fn apply_f64(
                &self,
                start: u64,
                inputs: &[&[f64]],
                out: &mut [f64],
                stats: &mut $crate::method::KernelStats,
            ) {
                self.apply::<f64>(start, inputs, out, stats)
            }
            $($extra)*
        }
    };
}
pub(crate) use impl_kernel;

/// A configured merge method.
#[derive(Clone, Debug)]
pub struct Method {
    /// Which method.
    pub kind: MethodKind,
    /// Numeric parameters, per tensor.
    pub params: MergeParams,
    /// DARE rescaling rule.
    pub rescale: Rescale,
    /// Fisher normalisation for `fisher`.
    pub fisher_normalize: FisherNormalize,
    /// Default Fisher scale per model (from `fisher.examples`, else 1), used when the
    /// parameters do not set `fisher_scale`.
    pub default_fisher_scales: Vec<f64>,
    /// Default base Fisher scale (from the base Fisher's `fisher.examples`, else 1).
    pub default_base_fisher_scale: f64,
    /// Global L2 norm of each model's Fisher, when `fisher_normalize` is L2. Filled by
    /// the engine before the merge.
    pub fisher_norms: Vec<f64>,
}

impl Method {
    /// Creates a method with default options and no parameters.
    pub fn new(kind: MethodKind, params: MergeParams) -> Method {
        Method {
            kind,
            params,
            rescale: Rescale::L1,
            fisher_normalize: FisherNormalize::None,
            default_fisher_scales: Vec::new(),
            default_base_fisher_scale: 1.0,
            fisher_norms: Vec::new(),
        }
    }

    /// Resolves the parameters for one tensor, runs its reductions and returns its kernel.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a parameter out of range or missing, naming the
    /// tensor; I/O errors from the reduction passes.
    pub fn prepare(
        &self,
        layout: Layout,
        inputs: &TensorInputs<'_>,
        position: LayerPosition,
    ) -> Result<Box<dyn TensorKernel>> {
        let ctx = Resolver {
            method: self,
            tensor: inputs.name,
            position,
        };
        match self.kind {
            MethodKind::Linear => arith::linear(&ctx, layout),
            MethodKind::TaskArithmetic => arith::task_arithmetic(&ctx, layout),
            MethodKind::Ties
            | MethodKind::DareLinear
            | MethodKind::DareTies
            | MethodKind::Breadcrumbs
            | MethodKind::BreadcrumbsTies => arith::sparse(&ctx, layout, inputs),
            MethodKind::Slerp => geometric::slerp(&ctx, layout, inputs),
            MethodKind::ModelStock => geometric::model_stock(&ctx, layout, inputs),
            MethodKind::Fisher => precision::fisher(&ctx, layout),
            MethodKind::GradMatch => precision::gradmatch(&ctx, layout),
        }
    }
}

/// Parameter lookup for one tensor, with range checks that name the tensor.
pub(crate) struct Resolver<'a> {
    method: &'a Method,
    tensor: &'a str,
    position: LayerPosition,
}

impl Resolver<'_> {
    fn global(&self, key: &str) -> Option<f64> {
        self.method.params.global(key, self.tensor, self.position)
    }

    fn global_or(&self, key: &str, default: f64) -> f64 {
        self.global(key).unwrap_or(default)
    }

    fn global_required(&self, key: &str) -> Result<f64> {
        self.global(key).ok_or_else(|| {
            Error::InvalidParameter(format!(
                "{}: parameter `{key}` is required for tensor `{}`; set it under `parameters:`",
                self.method.kind, self.tensor
            ))
        })
    }

    fn model(&self, m: usize, key: &str) -> Option<f64> {
        self.method.params.model(m, key, self.tensor, self.position)
    }

    fn model_or(&self, m: usize, key: &str, default: f64) -> f64 {
        self.model(m, key).unwrap_or(default)
    }

    fn model_required(&self, m: usize, key: &str) -> Result<f64> {
        self.model(m, key).ok_or_else(|| {
            Error::InvalidParameter(format!(
                "{}: parameter `{key}` of model {} is required for tensor `{}`; set it under the model's or the global `parameters:`",
                self.method.kind,
                m + 1,
                self.tensor
            ))
        })
    }

    fn base_or(&self, key: &str, default: f64) -> f64 {
        self.method
            .params
            .base(key, self.tensor, self.position)
            .unwrap_or(default)
    }

    fn flag(&self, key: &str, default: bool) -> bool {
        self.global(key).map_or(default, |v| v != 0.0)
    }

    fn invalid(&self, detail: String) -> Error {
        Error::InvalidParameter(format!(
            "{}: {detail} (tensor `{}`)",
            self.method.kind, self.tensor
        ))
    }

    fn check_range(&self, name: &str, value: f64, ok: bool, range: &str) -> Result<f64> {
        if ok && value.is_finite() {
            Ok(value)
        } else {
            Err(self.invalid(format!("{name} = {value} is outside {range}")))
        }
    }
}

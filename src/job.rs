//! A merge from configuration to finished output folder: opens the inputs, builds the
//! method and the plan, runs the engine and writes the side files.

use std::path::{Path, PathBuf};

use crate::checkpoint::Checkpoint;
use crate::config::{MergeConfig, TokenizerSource};
use crate::error::{Error, Result};
use crate::method::{FisherNormalize, Method, MethodKind};
use crate::params::{layer_index, LayerPosition};
use crate::pipeline::{self, EngineOptions, Output, Progress, Summary};
use crate::plan::{lookup, Action, MergeInputs, Plan, PlanOptions};
use crate::source::IoMode;
use crate::view::TensorInputs;
use crate::writer::OutputDir;

/// An opened, validated merge, ready to run.
#[derive(Debug)]
pub struct MergeJob {
    /// The configuration.
    pub config: MergeConfig,
    /// The opened checkpoints.
    pub inputs: MergeInputs,
    /// The method with its defaults filled in.
    pub method: Method,
    /// The validated plan.
    pub plan: Plan,
}

impl MergeJob {
    /// Opens every input (headers only), fills in defaults and builds the plan.
    ///
    /// `out_dtype` from the configuration takes precedence over `plan_options.out_dtype`
    /// only when the latter is `None`.
    ///
    /// # Errors
    /// Every read, format, plan and parameter error, before any tensor data is read.
    pub fn open(
        config: MergeConfig,
        io: IoMode,
        mut plan_options: PlanOptions,
    ) -> Result<MergeJob> {
        let kind = config.method;
        check_finite(&config.params)?;
        let open = |p: &Path| Checkpoint::open(p, io);
        let base = config.base_model.as_deref().map(open).transpose()?;
        let models = config
            .models
            .iter()
            .map(|m| open(&m.path))
            .collect::<Result<Vec<_>>>()?;
        let mut fishers = Vec::new();
        if kind.uses_fishers() {
            let missing: Vec<String> = config
                .models
                .iter()
                .filter(|m| m.fisher.is_none())
                .map(|m| m.path.display().to_string())
                .collect();
            if !missing.is_empty() {
                return Err(Error::InvalidParameter(format!(
                    "{kind} needs a Fisher file for every model; missing for {} (set `fisher:` on the model or pass --fisher after its --model)",
                    missing.join(", ")
                )));
            }
            for m in &config.models {
                fishers.push(open(m.fisher.as_deref().expect("checked above"))?);
            }
        } else if config.models.iter().any(|m| m.fisher.is_some()) {
            log::warn!("{kind} does not use Fisher files; the `fisher` entries are ignored");
        }
        let base_fisher = match (&config.base_fisher, kind) {
            (Some(p), MethodKind::GradMatch) => Some(open(p)?),
            (Some(_), _) => {
                log::warn!("{kind} does not use a base Fisher; `base_fisher` is ignored");
                None
            }
            _ => None,
        };
        let inputs = MergeInputs {
            base,
            models,
            fishers,
            base_fisher,
        };

        if plan_options.out_dtype.is_none() {
            plan_options.out_dtype = config.output_dtype();
        }
        let plan = Plan::build(&inputs, kind, &plan_options)?;
        if let Some(range) = config.layer_range {
            check_layer_range(range, &plan, inputs.reference().path())?;
        }

        let mut method = Method::new(kind, config.params.clone());
        method.rescale = config.rescale;
        method.fisher_normalize = config.fisher_normalize;
        method.default_fisher_scales = inputs
            .fishers
            .iter()
            .map(fisher_examples)
            .collect::<Result<_>>()?;
        method.default_base_fisher_scale = inputs
            .base_fisher
            .as_ref()
            .map(fisher_examples)
            .transpose()?
            .unwrap_or(1.0);
        warn_mixed_fisher_scales(&inputs, &config);
        validate_parameters(&plan, &inputs, &method)?;
        Ok(MergeJob {
            config,
            inputs,
            method,
            plan,
        })
    }

    /// Returns every input path, the tokenizer source included, for the destination check.
    pub fn input_paths(&self) -> Vec<PathBuf> {
        let mut paths = self.inputs.paths();
        if let TokenizerSource::Path(p) = &self.config.tokenizer_source {
            paths.push(p.clone());
        }
        paths
    }

    /// Runs the merge into `out` (or into nothing, with `out = None`), then writes the side
    /// files and renames the folder into place.
    ///
    /// # Errors
    /// Every engine and output error. On error the temporary folder is removed and `out`
    /// is left as it was.
    pub fn run(
        &mut self,
        out: Option<(&Path, bool)>,
        engine: &EngineOptions,
        progress: Option<Progress<'_>>,
        extra_files: &[(&str, Vec<u8>)],
    ) -> Result<Summary> {
        if self.method.fisher_normalize == FisherNormalize::L2
            && self.method.kind == MethodKind::Fisher
        {
            self.method.fisher_norms = self.fisher_norms()?;
        }
        let Some((dest, force)) = out else {
            return pipeline::run(
                &self.plan,
                &self.inputs,
                &self.method,
                engine,
                Output::Sink,
                progress,
            );
        };
        let dir = OutputDir::create(dest, force, &self.input_paths(), self.plan.output_bytes())?;
        let summary = pipeline::run(
            &self.plan,
            &self.inputs,
            &self.method,
            engine,
            Output::Folder(&dir),
            progress,
        )?;
        self.write_side_files(dir.temp_path())?;
        for (name, bytes) in extra_files {
            let path = dir.temp_path().join(name);
            std::fs::write(&path, bytes).map_err(|e| Error::io("write", &path, e))?;
        }
        if crate::interrupt::is_requested() {
            return Err(Error::Interrupted);
        }
        dir.commit()?;
        Ok(summary)
    }

    fn write_side_files(&self, folder: &Path) -> Result<()> {
        let reference = self.inputs.reference();
        let tokenizer = match &self.config.tokenizer_source {
            TokenizerSource::Base => reference.folder().map(Path::to_path_buf),
            TokenizerSource::Path(p) => Some(p.clone()),
        };
        let config_from = reference.folder().filter(|_| reference.config().is_some());
        let untie = reference.ties_embeddings()
            && self.plan.tensors.iter().any(|t| t.name == "lm_head.weight")
            && reference.get("lm_head.weight").is_none();
        let from_folder = reference.path().is_dir();
        let copied = crate::sidefiles::copy_side_files(
            config_from.filter(|_| from_folder),
            tokenizer.as_deref().filter(|_| {
                from_folder || matches!(self.config.tokenizer_source, TokenizerSource::Path(_))
            }),
            folder,
            self.plan.out_dtype,
            untie,
            self.plan.vocab_size,
        )?;
        if let TokenizerSource::Path(p) = &self.config.tokenizer_source {
            if !copied
                .iter()
                .any(|f| f.starts_with("tokenizer") || f == "vocab.json" || f == "vocab.txt")
            {
                log::warn!(
                    "tokenizer source {} contains no tokenizer files; none were copied",
                    p.display()
                );
            }
        }
        Ok(())
    }

    /// L2 norm of each model's Fisher over all merged tensors, in f64 with fixed blocking.
    fn fisher_norms(&self) -> Result<Vec<f64>> {
        let mut norms = Vec::with_capacity(self.inputs.fishers.len());
        for fisher in &self.inputs.fishers {
            let mut sum = 0.0f64;
            for t in self
                .plan
                .tensors
                .iter()
                .filter(|t| t.action == Action::Merge)
            {
                let view = lookup(fisher, &t.name).expect("validated by Plan::build");
                let inputs = TensorInputs {
                    name: &t.name,
                    elems: t.elems(),
                    shape: &t.shape,
                    views: vec![view],
                };
                let blocks = inputs.map_blocks::<f64, f64>(
                    || 0.0,
                    |acc, _, tiles| {
                        for &f in tiles[0] {
                            *acc += f * f;
                        }
                    },
                )?;
                sum += blocks.iter().sum::<f64>();
            }
            norms.push(sum.sqrt());
        }
        Ok(norms)
    }
}

/// Stops on a NaN or infinite parameter value, which would turn the whole merge into NaN.
fn check_finite(params: &crate::params::MergeParams) -> Result<()> {
    fn first_bad(value: &crate::params::ParamValue) -> Option<f64> {
        use crate::params::ParamValue;
        match value {
            ParamValue::Scalar(x) => (!x.is_finite()).then_some(*x),
            ParamValue::Gradient(values) => values.iter().copied().find(|x| !x.is_finite()),
            ParamValue::Filtered(entries) => entries.iter().find_map(|(_, v)| first_bad(v)),
        }
    }
    let blocks = std::iter::once(("the global parameters".to_string(), &params.global))
        .chain(std::iter::once((
            "the base model's parameters".to_string(),
            &params.base,
        )))
        .chain(
            params
                .models
                .iter()
                .enumerate()
                .map(|(m, map)| (format!("model {}'s parameters", m + 1), map)),
        );
    for (owner, map) in blocks {
        for (key, value) in map {
            if let Some(bad) = first_bad(value) {
                return Err(Error::InvalidParameter(format!(
                    "`{key}` in {owner} is {bad}; every parameter must be a finite number"
                )));
            }
        }
    }
    Ok(())
}

/// Checks that a `slices:` layer range covers every layer, because gradmerge merges whole
/// models.
fn check_layer_range(range: [u64; 2], plan: &Plan, reference: &Path) -> Result<()> {
    let layers = plan.num_layers();
    if range == [0, layers] {
        return Ok(());
    }
    Err(Error::InvalidParameter(format!(
        "the slice's layer_range [{}, {}] does not cover the {layers} layers of {}; gradmerge merges whole models, so set layer_range: [0, {layers}]",
        range[0],
        range[1],
        reference.display()
    )))
}

/// Warns when some Fisher files carry `fisher.examples` and others do not, unless the
/// configuration sets `fisher_scale`: the ones without it are scaled by 1, which is
/// rarely what a user with counts on the other files wants.
fn warn_mixed_fisher_scales(inputs: &MergeInputs, config: &MergeConfig) {
    let has = |c: &Checkpoint| c.metadata_value("fisher.examples").is_some();
    let all: Vec<&Checkpoint> = inputs.fishers.iter().chain(&inputs.base_fisher).collect();
    if !all.iter().any(|c| has(c)) {
        return;
    }
    let set = |map: &crate::params::ParamMap, key: &str| map.contains_key(key);
    for (m, fisher) in inputs.fishers.iter().enumerate() {
        let scaled = set(&config.params.global, "fisher_scale")
            || config
                .params
                .models
                .get(m)
                .is_some_and(|p| set(p, "fisher_scale"));
        if !has(fisher) && !scaled {
            log::warn!(
                "{} has no fisher.examples metadata, so model {}'s Fisher is scaled by 1 while other Fisher files are scaled by their example counts; set fisher_scale for that model if its Fisher was averaged over another number of examples",
                fisher.path().display(),
                m + 1
            );
        }
    }
    if let Some(base) = &inputs.base_fisher {
        if !has(base) && !set(&config.params.global, "base_fisher_scale") {
            log::warn!(
                "{} has no fisher.examples metadata, so the base Fisher is scaled by 1 while other Fisher files are scaled by their example counts; set base_fisher_scale if that is not intended",
                base.path().display()
            );
        }
    }
}

/// Returns a Fisher file's `fisher.examples` metadata as a scale, or 1 when absent.
fn fisher_examples(ckpt: &Checkpoint) -> Result<f64> {
    match ckpt.metadata_value("fisher.examples") {
        None => Ok(1.0),
        Some(s) => match s.trim().parse::<f64>() {
            Ok(n) if n > 0.0 && n.is_finite() => Ok(n),
            _ => Err(Error::InvalidParameter(format!(
                "{}: metadata fisher.examples = `{s}` is not a positive number; fix the metadata or set fisher_scale",
                ckpt.path().display()
            ))),
        },
    }
}

/// Resolves and range-checks every parameter for every merged tensor without reading data,
/// so that a dry run reports a bad density or weight as the real merge would.
///
/// Each tensor is prepared over zero elements: the reductions then read nothing, and only
/// the checks that need data (such as gradmatch's precision) are left for the merge.
fn validate_parameters(plan: &Plan, inputs: &MergeInputs, method: &Method) -> Result<()> {
    let layout = inputs.layout(method.kind);
    let num_layers = plan.num_layers();
    for (i, t) in plan.tensors.iter().enumerate() {
        if t.action != Action::Merge {
            continue;
        }
        let mut empty = plan.tensor_inputs(inputs, i);
        empty.elems = 0;
        let position = LayerPosition {
            layer: layer_index(&t.name),
            num_layers,
        };
        method.prepare(layout, &empty, position)?;
    }
    Ok(())
}

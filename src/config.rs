//! Merge configurations: mergekit-style YAML files, and the same merge given by flags.
//!
//! Accepted keys follow mergekit (`merge_method`, `base_model`, `models`, `slices`,
//! `parameters`, `dtype`, `out_dtype`, `tokenizer_source`) plus gradmerge's Fisher keys
//! (`fisher` per model, `base_fisher`, and the parameters `fisher_scale`,
//! `base_fisher_scale`, `delta`). Unknown keys are errors that name the line and the
//! nearest valid key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_norway::Value;

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::method::{FisherNormalize, MethodKind, Rescale};
use crate::params::{MergeParams, ParamMap, ParamValue};
use crate::suggest::nearest;

/// The source of the tokenizer and other side files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenizerSource {
    /// The base model (the default), else the first model.
    Base,
    /// This folder.
    Path(PathBuf),
}

/// One model of a merge.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelEntry {
    /// Checkpoint path.
    pub path: PathBuf,
    /// Its Fisher file, for `fisher` and `gradmatch`.
    pub fisher: Option<PathBuf>,
}

/// A resolved merge configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct MergeConfig {
    /// The method.
    pub method: MethodKind,
    /// The base model.
    pub base_model: Option<PathBuf>,
    /// The base model's Fisher.
    pub base_fisher: Option<PathBuf>,
    /// The models, base excluded.
    pub models: Vec<ModelEntry>,
    /// Parameters (global, base and per model).
    pub params: MergeParams,
    /// mergekit's `dtype`: the output dtype when `out_dtype` is absent; `float64` also
    /// selects f64 arithmetic.
    pub dtype: Option<Dtype>,
    /// Output dtype.
    pub out_dtype: Option<Dtype>,
    /// Source of the tokenizer files.
    pub tokenizer_source: TokenizerSource,
    /// DARE rescaling rule.
    pub rescale: Rescale,
    /// Fisher normalisation.
    pub fisher_normalize: FisherNormalize,
    /// The `layer_range` of the one slice, when the configuration used `slices:`.
    /// [`crate::job::MergeJob::open`] checks that it covers every layer of the models.
    pub layer_range: Option<[u64; 2]>,
}

impl MergeConfig {
    /// Returns the output dtype of merged tensors, if the configuration fixes one.
    pub fn output_dtype(&self) -> Option<Dtype> {
        self.out_dtype.or(self.dtype)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    merge_method: String,
    #[serde(default)]
    base_model: Option<String>,
    #[serde(default)]
    base_fisher: Option<String>,
    #[serde(default)]
    models: Vec<RawModel>,
    #[serde(default)]
    slices: Vec<RawSlice>,
    #[serde(default)]
    parameters: BTreeMap<String, Value>,
    #[serde(default)]
    dtype: Option<String>,
    #[serde(default)]
    out_dtype: Option<String>,
    #[serde(default)]
    tokenizer_source: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    modules: Option<Value>,
    #[serde(default)]
    tokenizer: Option<Value>,
    #[serde(default)]
    chat_template: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    model: String,
    #[serde(default)]
    fisher: Option<String>,
    #[serde(default)]
    parameters: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSlice {
    sources: Vec<RawSliceSource>,
    #[serde(default)]
    parameters: BTreeMap<String, Value>,
    #[serde(default)]
    base_model: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSliceSource {
    model: String,
    #[serde(default)]
    layer_range: Option<[u64; 2]>,
    #[serde(default)]
    fisher: Option<String>,
    #[serde(default)]
    parameters: BTreeMap<String, Value>,
}

const TOP_KEYS: &[&str] = &[
    "merge_method",
    "base_model",
    "base_fisher",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "name",
    "modules",
    "tokenizer",
    "chat_template",
];
const MODEL_KEYS: &[&str] = &["model", "fisher", "parameters", "layer_range", "sources"];

/// Options that are words rather than numbers, allowed in the global `parameters:`.
const WORD_PARAMETERS: &[&str] = &["rescale", "fisher_normalize"];

/// mergekit parameters that only tune its own memory use; accepted and ignored, so that
/// mergekit files run unchanged.
const IGNORED_PARAMETERS: &[&str] = &["int8_mask"];

/// Parses a YAML configuration. Relative paths are resolved against the working directory,
/// falling back to `base_dir` (the configuration's folder) for paths found only there.
///
/// # Errors
/// [`Error::InvalidParameter`] naming `origin` and the line for YAML errors, unknown keys
/// (with the nearest valid key), unknown methods, wrong value types and parameters the
/// method does not take.
pub fn parse_yaml(text: &str, origin: &Path, base_dir: &Path) -> Result<MergeConfig> {
    let raw: RawConfig = serde_norway::from_str(text).map_err(|e| yaml_error(origin, &e))?;
    let fail = |msg: String| Error::InvalidParameter(format!("{}: {msg}", origin.display()));
    let method: MethodKind = raw
        .merge_method
        .parse()
        .map_err(|e: Error| fail(e.to_string()))?;
    for (key, present) in [
        ("modules", raw.modules.is_some()),
        ("tokenizer", raw.tokenizer.is_some()),
        ("chat_template", raw.chat_template.is_some()),
    ] {
        if present {
            return Err(fail(format!(
                "`{key}` is a mergekit key that gradmerge does not support yet; remove it (gradmerge copies the tokenizer and chat template from tokenizer_source)"
            )));
        }
    }
    let mut raw_parameters = raw.parameters;
    let mut raw_base_model = raw.base_model;
    let resolve = |p: &str| resolve_path(p, base_dir);

    // Models from `models:` or from a single full-range slice.
    let mut entries: Vec<RawModel> = raw.models;
    let mut layer_range = None;
    if !raw.slices.is_empty() {
        if !entries.is_empty() {
            return Err(fail("give either `models` or `slices`, not both".into()));
        }
        if raw.slices.len() > 1 {
            return Err(fail(format!(
                "{} slices were given, but gradmerge merges whole models only; use one slice whose sources cover every layer, or `models:`",
                raw.slices.len()
            )));
        }
        let slice = raw.slices.into_iter().next().expect("one slice");
        for (k, v) in slice.parameters {
            raw_parameters.entry(k).or_insert(v);
        }
        if raw_base_model.is_none() {
            raw_base_model = slice.base_model;
        }
        let ranges: Vec<Option<[u64; 2]>> = slice.sources.iter().map(|s| s.layer_range).collect();
        layer_range = ranges.first().copied().flatten();
        if ranges.windows(2).any(|w| w[0] != w[1])
            || ranges.iter().any(|r| r.is_some_and(|[a, _]| a != 0))
        {
            let listed: Vec<String> = ranges
                .iter()
                .map(|r| r.map_or("none".into(), |[a, b]| format!("[{a}, {b}]")))
                .collect();
            return Err(fail(format!(
                "slice layer ranges {} differ or do not start at 0; gradmerge merges whole models, so every source must cover the same full layer range",
                listed.join(", ")
            )));
        }
        entries = slice
            .sources
            .into_iter()
            .map(|s| RawModel {
                model: s.model,
                fisher: s.fisher,
                parameters: s.parameters,
            })
            .collect();
    }

    // The base may also be listed among the models; its entry then contains its parameters.
    let base_model = raw_base_model.as_deref().map(resolve);
    let mut params = MergeParams {
        global: parse_params(&raw_parameters, method, true, "parameters", origin)?,
        ..MergeParams::default()
    };
    let mut models = Vec::new();
    let mut base_fisher = raw.base_fisher.as_deref().map(resolve);
    for (i, entry) in entries.into_iter().enumerate() {
        let path = resolve(&entry.model);
        let context = format!("models[{i}] ({})", entry.model);
        let parsed = parse_params(&entry.parameters, method, false, &context, origin)?;
        if Some(&path) == base_model.as_ref() {
            params.base = parsed;
            if let Some(f) = entry.fisher {
                base_fisher.get_or_insert(resolve(&f));
            }
            continue;
        }
        params.models.push(parsed);
        models.push(ModelEntry {
            path,
            fisher: entry.fisher.as_deref().map(resolve),
        });
    }

    let dtype = raw
        .dtype
        .as_deref()
        .map(|d| parse_dtype(d, "dtype"))
        .transpose()
        .map_err(|e| fail(e.to_string()))?;
    let out_dtype = raw
        .out_dtype
        .as_deref()
        .map(|d| parse_dtype(d, "out_dtype"))
        .transpose()
        .map_err(|e| fail(e.to_string()))?;
    let tokenizer_source = match raw.tokenizer_source.as_deref() {
        None | Some("base") => TokenizerSource::Base,
        Some("union") => return Err(fail("tokenizer_source: union is not supported: gradmerge never builds a new vocabulary; use `base` or a folder path".into())),
        Some(p) => TokenizerSource::Path(resolve(p)),
    };
    let _ = raw.name;
    let rescale = match raw_parameters.get("rescale") {
        None => Rescale::L1,
        Some(Value::Bool(true)) => Rescale::L1,
        Some(Value::Bool(false)) => Rescale::None,
        Some(Value::String(s)) if s == "l1" => Rescale::L1,
        Some(Value::String(s)) if s == "density" => Rescale::Density,
        Some(other) => {
            return Err(fail(format!(
                "parameters.rescale must be true, false, `l1` or `density`, found {}",
                show(other)
            )))
        }
    };
    let fisher_normalize = match raw_parameters.get("fisher_normalize") {
        None | Some(Value::Null) => FisherNormalize::None,
        Some(Value::String(s)) if s == "none" => FisherNormalize::None,
        Some(Value::String(s)) if s == "l2" => FisherNormalize::L2,
        Some(other) => {
            return Err(fail(format!(
                "parameters.fisher_normalize must be `none` or `l2`, found {}",
                show(other)
            )))
        }
    };
    Ok(MergeConfig {
        method,
        base_model,
        base_fisher,
        models,
        params,
        dtype,
        out_dtype,
        tokenizer_source,
        rescale,
        fisher_normalize,
        layer_range,
    })
}

/// Resolves a model path against the working directory, as mergekit does. A relative path
/// that exists only beside the configuration file is taken from there.
fn resolve_path(p: &str, config_dir: &Path) -> PathBuf {
    let path = Path::new(p);
    let beside_config = config_dir.join(path);
    if path.is_relative() && !path.exists() && beside_config.exists() {
        beside_config
    } else {
        path.to_path_buf()
    }
}

fn parse_dtype(name: &str, key: &str) -> Result<Dtype> {
    Dtype::parse_float_name(name).ok_or_else(|| {
        Error::InvalidParameter(format!(
            "{key}: unknown dtype `{name}` (expected float32, bfloat16, float16 or float64)"
        ))
    })
}

fn show(v: &Value) -> String {
    serde_norway::to_string(v)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| format!("{v:?}"))
}

fn yaml_error(origin: &Path, e: &serde_norway::Error) -> Error {
    let message = e.to_string();
    // serde_norway's message usually ends with the position already.
    let line = e
        .location()
        .filter(|_| !message.contains(" at line "))
        .map(|l| format!(" (line {})", l.line()))
        .unwrap_or_default();
    let mut hint = String::new();
    if let Some(rest) = message
        .strip_prefix("unknown field `")
        .or_else(|| message.split("unknown field `").nth(1))
    {
        let key = rest.split('`').next().unwrap_or("");
        let mut candidates: Vec<&str> = TOP_KEYS.to_vec();
        candidates.extend_from_slice(MODEL_KEYS);
        if let Some(n) = nearest(key, &candidates) {
            hint = format!("; did you mean `{n}`?");
        }
    }
    Error::InvalidParameter(format!("{}{line}: {message}{hint}", origin.display()))
}

/// Converts a `parameters:` block, checking every key against the method.
fn parse_params(
    raw: &BTreeMap<String, Value>,
    method: MethodKind,
    global: bool,
    context: &str,
    origin: &Path,
) -> Result<ParamMap> {
    let mut allowed: Vec<&str> = method.model_parameters().to_vec();
    if global {
        allowed.extend_from_slice(method.global_parameters());
    }
    let mut out = ParamMap::new();
    for (key, value) in raw {
        if global && WORD_PARAMETERS.contains(&key.as_str()) {
            continue;
        }
        if IGNORED_PARAMETERS.contains(&key.as_str()) {
            log::info!(
                "{}: {context}: `{key}` tunes mergekit's memory use and is ignored",
                origin.display()
            );
            continue;
        }
        if !allowed.contains(&key.as_str()) {
            let hint = nearest(key, &allowed)
                .map(|n| format!("; did you mean `{n}`?"))
                .unwrap_or_default();
            return Err(Error::InvalidParameter(format!(
                "{}: {context}: `{method}` takes no parameter `{key}`{hint} (valid here: {})",
                origin.display(),
                allowed.join(", ")
            )));
        }
        let parsed = parse_value(value).map_err(|detail| {
            Error::InvalidParameter(format!(
                "{}: {context}: parameter `{key}`: {detail}",
                origin.display()
            ))
        })?;
        out.insert(key.clone(), parsed);
    }
    Ok(out)
}

/// Converts one parameter value: a number or boolean, a list of numbers (a gradient), or a
/// list of `{filter, value}` maps.
pub fn parse_value(value: &Value) -> std::result::Result<ParamValue, String> {
    match value {
        Value::Number(n) => n.as_f64().map(ParamValue::Scalar).ok_or_else(|| format!("{n} is not a number")),
        Value::Bool(b) => Ok(ParamValue::Scalar(if *b { 1.0 } else { 0.0 })),
        Value::Sequence(items) if items.is_empty() => Err("an empty list has no value".into()),
        Value::Sequence(items) if items.iter().all(|v| matches!(v, Value::Number(_))) => {
            Ok(ParamValue::Gradient(items.iter().filter_map(|v| v.as_f64()).collect()))
        }
        Value::Sequence(items) if items.iter().any(|v| matches!(v, Value::Number(_))) => {
            let bad = items
                .iter()
                .find(|v| !matches!(v, Value::Number(_)))
                .expect("not every item is a number");
            Err(format!(
                "a gradient must list numbers only, found {}",
                show(bad)
            ))
        }
        Value::Sequence(items) => {
            let mut entries = Vec::with_capacity(items.len());
            for item in items {
                let Value::Mapping(map) = item else {
                    return Err(format!("list items must all be numbers (a gradient) or all be {{filter, value}} maps, found {}", show(item)));
                };
                let mut filter = None;
                let mut inner = None;
                for (k, v) in map {
                    match k.as_str() {
                        Some("filter") => filter = Some(v.as_str().ok_or_else(|| format!("filter must be a string, found {}", show(v)))?.to_string()),
                        Some("value") => inner = Some(parse_value(v)?),
                        _ => {
                            let key = k.as_str().unwrap_or("?");
                            let hint = nearest(key, &["filter", "value"]).map(|n| format!("; did you mean `{n}`?")).unwrap_or_default();
                            return Err(format!("unknown key `{key}` in a filter entry{hint} (valid: filter, value)"));
                        }
                    }
                }
                let inner = inner.ok_or("a filter entry needs a `value`")?;
                entries.push((filter, inner));
            }
            Ok(ParamValue::Filtered(entries))
        }
        other => Err(format!("expected a number, a boolean, a list of numbers or a list of {{filter, value}} maps, found {}", show(other))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<MergeConfig> {
        parse_yaml(text, Path::new("merge.yml"), Path::new("/m"))
    }

    #[test]
    fn ties_config_with_base_listed() {
        let c = parse(
            "models:\n  - model: base\n  - model: a\n    parameters:\n      density: 0.5\n      weight: 0.5\nmerge_method: ties\nbase_model: base\nparameters:\n  normalize: true\ndtype: float16\n",
        )
        .unwrap();
        assert_eq!(c.method, MethodKind::Ties);
        assert_eq!(c.base_model, Some(PathBuf::from("base")));
        assert_eq!(c.models.len(), 1);
        assert_eq!(c.params.models[0]["density"], ParamValue::Scalar(0.5));
        assert_eq!(c.params.global["normalize"], ParamValue::Scalar(1.0));
        assert_eq!(c.output_dtype(), Some(Dtype::F16));
    }

    #[test]
    fn unknown_key_suggests_nearest() {
        let e = parse("merge_method: linear\nmodels:\n  - model: a\nbase_modle: b\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("base_modle"), "{e}");
        assert!(e.contains("did you mean `base_model`"), "{e}");
        assert!(e.contains("line 4"), "{e}");
    }

    #[test]
    fn unknown_method_suggests_nearest() {
        let e = parse("merge_method: dare-ties\nmodels:\n  - model: a\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean `dare_ties`"), "{e}");
    }

    #[test]
    fn unknown_parameter_rejected() {
        let e = parse(
            "merge_method: ties\nmodels:\n  - model: a\n    parameters:\n      densty: 0.5\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("did you mean `density`"), "{e}");
    }

    #[test]
    fn wrong_type_rejected() {
        let e = parse(
            "merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: heavy\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("weight"), "{e}");
        assert!(e.contains("heavy"), "{e}");
    }

    #[test]
    fn slerp_slices_with_filters() {
        let c = parse(
            "slices:\n  - sources:\n      - model: a\n        layer_range: [0, 32]\n      - model: b\n        layer_range: [0, 32]\nmerge_method: slerp\nbase_model: a\nparameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5\ndtype: bfloat16\n",
        )
        .unwrap();
        assert_eq!(c.models.len(), 1);
        assert_eq!(c.models[0].path, PathBuf::from("b"));
        let ParamValue::Filtered(entries) = &c.params.global["t"] else {
            panic!("filtered")
        };
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[2], (None, ParamValue::Scalar(0.5)));
    }
}

//! The plan: every output tensor with its inputs, dtype and shard, validated across all
//! inputs before any tensor data is read.

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;

use crate::checkpoint::{Checkpoint, SINGLE_FILE};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::format::{encode_header, encode_index};
use crate::method::{Layout, MethodKind};
use crate::view::{Tail, TensorInputs, TensorView};
use crate::writer::ShardSpec;

/// Default output shard size: 5 GB, as `transformers` uses.
pub const DEFAULT_SHARD_SIZE_BYTES: u64 = 5_000_000_000;

/// Pairs of (output embedding, input embedding) names that tied models share.
const TIED_NAMES: &[(&str, &str)] = &[
    ("lm_head.weight", "model.embed_tokens.weight"),
    ("lm_head.weight", "transformer.wte.weight"),
    ("lm_head.weight", "model.decoder.embed_tokens.weight"),
    ("embed_out.weight", "gpt_neox.embed_in.weight"),
];

/// The checkpoints a merge reads.
#[derive(Debug, Default)]
pub struct MergeInputs {
    /// The base model θ0, if any.
    pub base: Option<Checkpoint>,
    /// The models θ1..θT.
    pub models: Vec<Checkpoint>,
    /// One Fisher per model, for `fisher` and `gradmatch`; empty otherwise.
    pub fishers: Vec<Checkpoint>,
    /// The base model's Fisher, for `gradmatch`.
    pub base_fisher: Option<Checkpoint>,
}

impl MergeInputs {
    /// Returns every input checkpoint's path.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.all().map(|c| c.path().to_path_buf()).collect()
    }

    /// Returns every input checkpoint.
    pub fn all(&self) -> impl Iterator<Item = &Checkpoint> {
        self.base
            .iter()
            .chain(&self.models)
            .chain(&self.fishers)
            .chain(&self.base_fisher)
    }

    /// Returns the model whose tensor order and side files the output follows: the base,
    /// else the first model.
    pub fn reference(&self) -> &Checkpoint {
        self.base.as_ref().unwrap_or_else(|| &self.models[0])
    }

    /// Data bytes of every input.
    pub fn data_bytes(&self) -> u64 {
        self.all().map(Checkpoint::data_bytes).sum()
    }

    /// Returns the kernel input layout for `kind`.
    pub fn layout(&self, kind: MethodKind) -> Layout {
        Layout {
            has_base: self.base.is_some() && (kind.uses_base() || kind == MethodKind::Linear),
            models: self.models.len(),
            has_fishers: kind.uses_fishers(),
            has_base_fisher: kind == MethodKind::GradMatch && self.base_fisher.is_some(),
        }
    }

    /// Returns the checkpoints in kernel input order for `kind`.
    fn ordered(&self, kind: MethodKind) -> Vec<&Checkpoint> {
        let layout = self.layout(kind);
        let mut out = Vec::with_capacity(layout.len());
        if layout.has_base {
            out.extend(self.base.as_ref());
        }
        out.extend(&self.models);
        if layout.has_fishers {
            out.extend(&self.fishers);
        }
        if layout.has_base_fisher {
            out.extend(self.base_fisher.as_ref());
        }
        out
    }
}

/// Looks up `name`, reading a tied output embedding through its input embedding.
pub fn lookup<'a>(ckpt: &'a Checkpoint, name: &str) -> Option<TensorView<'a>> {
    let found = ckpt.get(name).or_else(|| {
        TIED_NAMES
            .iter()
            .find(|(out, _)| *out == name)
            .and_then(|(_, input)| ckpt.get(input))
            .filter(|_| ckpt.ties_embeddings() || ckpt.config().is_none())
    });
    found.map(|(source, info)| TensorView::new(source, info))
}

/// The engine's action for one output tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Run the method's kernel.
    Merge,
    /// Copy the reference model's bytes, after checking every model holds the same bytes.
    Copy,
}

/// One output tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedTensor {
    /// Name.
    pub name: String,
    /// Shape (every input has it).
    pub shape: Vec<u64>,
    /// Output dtype.
    pub dtype: Dtype,
    /// Merge or copy.
    pub action: Action,
    /// Output shard index.
    pub shard: usize,
}

impl PlannedTensor {
    /// Number of elements.
    pub fn elems(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Output size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.elems() * self.dtype.size_bytes() as u64
    }
}

/// Options that shape the plan.
#[derive(Clone, Debug)]
pub struct PlanOptions {
    /// Output dtype of merged tensors; `None` keeps the inputs' common dtype (F32 when
    /// they differ).
    pub out_dtype: Option<Dtype>,
    /// Largest data size of one output shard, in bytes.
    pub shard_size_bytes: u64,
    /// The handling of embedding matrices with different numbers of rows.
    pub vocab_policy: VocabPolicy,
}

/// The handling of embedding matrices with different numbers of rows (different
/// vocabulary sizes). Rows are never dropped or invented silently.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VocabPolicy {
    /// Stop with an error that shows both shapes (the default).
    #[default]
    Error,
    /// Keep the base model's rows: larger models contribute their first rows only, and a
    /// smaller model's missing rows are taken from a model that has them.
    Base,
    /// Keep the most rows any model has: a model's missing rows (the base's too) are taken
    /// from a model that has them, so rows that only one model has are copied from it.
    Fill,
}

impl Default for PlanOptions {
    fn default() -> PlanOptions {
        PlanOptions {
            out_dtype: None,
            shard_size_bytes: DEFAULT_SHARD_SIZE_BYTES,
            vocab_policy: VocabPolicy::Error,
        }
    }
}

/// The validated output: tensors in order, and the shards they go to.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The method.
    pub kind: MethodKind,
    /// Output tensors, in writing order.
    pub tensors: Vec<PlannedTensor>,
    /// Output shards, in writing order.
    pub shards: Vec<ShardSpec>,
    /// The index file's contents when there is more than one shard.
    pub index: Option<Vec<u8>>,
    /// Notes for the user, such as inputs narrowed to a smaller dtype.
    pub notes: Vec<String>,
    /// The output dtype of the merged float tensors (the most common one).
    pub out_dtype: Option<Dtype>,
    /// Rows of the output embedding when a vocabulary policy changed them, for
    /// `config.json`'s `vocab_size`.
    pub vocab_size: Option<u64>,
}

impl Plan {
    /// Number of layers: one more than the largest layer index in a tensor name, or 0.
    pub fn num_layers(&self) -> u64 {
        self.tensors
            .iter()
            .filter_map(|t| crate::params::layer_index(&t.name))
            .max()
            .map_or(0, |m| m + 1)
    }

    /// Builds and validates the plan, reporting every problem found at once.
    ///
    /// # Errors
    /// [`Error::Mismatch`] listing missing tensors, shape and dtype mismatches, embedding
    /// row mismatches and Fisher name differences; [`Error::Unsupported`] for quantized
    /// tensors; [`Error::InvalidParameter`] for a method that lacks its inputs.
    pub fn build(inputs: &MergeInputs, kind: MethodKind, options: &PlanOptions) -> Result<Plan> {
        check_inputs_for_method(inputs, kind)?;
        let reference = inputs.reference();
        let mut problems = Vec::new();
        let mut notes = Vec::new();

        // Output names: the reference's, plus a distinct lm_head some model has.
        let mut names: Vec<String> = reference.names().to_vec();
        let reference_names: HashSet<&str> = names.iter().map(String::as_str).collect();
        let mut extra = BTreeSet::new();
        for model in &inputs.models {
            for name in model.names() {
                if !reference_names.contains(name.as_str()) && lookup(reference, name).is_none() {
                    extra.insert((name.clone(), model.path().display().to_string()));
                }
            }
        }
        let (role, fix) = if inputs.base.is_some() {
            ("the base", "use a base with the same architecture")
        } else {
            ("the first model", "list models of one architecture")
        };
        for (name, path) in &extra {
            problems.push(format!(
                "`{name}` is in {path} but not in {role} {}; drop that model or {fix}",
                reference.path().display()
            ));
        }
        let tied_extra: Vec<String> = inputs
            .models
            .iter()
            .flat_map(|m| m.names())
            .filter(|n| !reference_names.contains(n.as_str()) && lookup(reference, n).is_some())
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        names.extend(tied_extra);

        let ordered = inputs.ordered(kind);
        let mut tensors = Vec::with_capacity(names.len());
        let mut dtypes_seen = BTreeSet::new();
        let mut vocab_size = None;
        for name in &names {
            let Some(r) = lookup(reference, name) else {
                continue;
            };
            let mut shape = r.info.shape.clone();
            let is_float = r.dtype().is_mergeable_float();
            check_quantized(reference, name, r.dtype())?;

            // Embeddings whose rows differ get the row count the vocabulary policy sets.
            let models_and_base = || {
                std::iter::once(reference)
                    .chain(&inputs.models)
                    .chain(inputs.base.iter())
            };
            let rows: Vec<u64> = models_and_base()
                .filter_map(|c| lookup(c, name))
                .filter(|v| same_but_rows(&v.info.shape, &shape))
                .map(|v| v.info.shape[0])
                .collect();
            let rows_differ = rows.iter().any(|&n| n != shape[0]);
            let mut resized = false;
            if rows_differ && is_embedding(name) && options.vocab_policy != VocabPolicy::Error {
                let out_rows = match options.vocab_policy {
                    VocabPolicy::Fill => rows.iter().copied().max().unwrap_or(shape[0]),
                    _ => shape[0],
                };
                // `rows` starts with the reference, which is also the base when there is
                // one: name each checkpoint once.
                let per_input: Vec<String> = std::iter::once(reference)
                    .chain(&inputs.models)
                    .filter_map(|c| lookup(c, name).map(|v| (c, v)))
                    .map(|(c, v)| format!("{} in {}", v.info.shape[0], c.path().display()))
                    .collect();
                let policy = match options.vocab_policy {
                    VocabPolicy::Fill => "fill",
                    _ => "base",
                };
                notes.push(format!(
                    "`{name}` has {} rows; {out_rows} rows are written (--vocab-policy {policy})",
                    per_input.join(", ")
                ));
                shape[0] = out_rows;
                resized = true;
                if vocab_size.is_none() || name.contains("embed") || name.contains("wte") {
                    vocab_size = Some(out_rows);
                }
            }
            let fits = |v: &TensorView<'_>, group: &[TensorView<'_>]| {
                v.info.shape == shape
                    || (resized
                        && same_but_rows(&v.info.shape, &shape)
                        && (v.info.shape[0] >= shape[0]
                            || group
                                .iter()
                                .any(|d| d.info.shape[0] >= shape[0] && d.dtype() == v.dtype())))
            };
            let model_views: Vec<TensorView<'_>> =
                models_and_base().filter_map(|c| lookup(c, name)).collect();
            let fisher_views: Vec<TensorView<'_>> = inputs
                .fishers
                .iter()
                .chain(inputs.base_fisher.iter())
                .filter_map(|c| lookup(c, name))
                .collect();

            // Every model has the tensor with the same shape and kind of dtype.
            let mut dtypes = BTreeSet::new();
            for ckpt in std::iter::once(reference)
                .chain(&inputs.models)
                .chain(inputs.base.iter())
            {
                match lookup(ckpt, name) {
                    None => problems.push(format!(
                        "`{name}` is missing from {}",
                        ckpt.path().display()
                    )),
                    Some(v) if !fits(&v, &model_views) => problems.push(shape_problem(name, ckpt, &v.info.shape, reference, &shape)),
                    Some(v) if v.dtype().is_mergeable_float() != is_float => problems.push(format!(
                        "`{name}` is {} in {} but {} in {}; the models must store it in the same kind of dtype",
                        v.dtype(), ckpt.path().display(), r.dtype(), reference.path().display()
                    )),
                    Some(v) => {
                        dtypes.insert(v.dtype());
                    }
                }
            }

            // Fisher files cover every float tensor with the same shape.
            if is_float {
                for fisher in inputs
                    .fishers
                    .iter()
                    .chain(if kind == MethodKind::GradMatch {
                        inputs.base_fisher.as_ref()
                    } else {
                        None
                    })
                {
                    match lookup(fisher, name) {
                        None => problems.push(format!(
                            "Fisher {} has no tensor `{name}`",
                            fisher.path().display()
                        )),
                        Some(v) if !fits(&v, &fisher_views) => problems.push(format!(
                            "Fisher {} has `{name}` with shape {:?}, the model has {:?}",
                            fisher.path().display(), v.info.shape, shape
                        )),
                        Some(v) if !v.dtype().is_mergeable_float() => problems.push(format!(
                            "Fisher {} stores `{name}` as {}; Fisher values must be F16, BF16, F32 or F64",
                            fisher.path().display(), v.dtype()
                        )),
                        Some(_) => {}
                    }
                }
            }

            let dtype = if !is_float {
                r.dtype()
            } else if let Some(d) = options.out_dtype {
                d
            } else if dtypes.len() > 1 {
                notes.push(format!(
                    "`{name}` has dtypes {}; it is merged and written as F32",
                    dtypes
                        .iter()
                        .map(|d| d.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                Dtype::F32
            } else {
                r.dtype()
            };
            if is_float {
                dtypes_seen.insert(dtype);
                if let Some(widest) = dtypes.iter().max_by_key(|d| d.size_bytes()) {
                    if widest.size_bytes() > dtype.size_bytes() {
                        let reason = if options.out_dtype.is_some() {
                            "as requested by the output dtype"
                        } else {
                            "the inputs' common dtype"
                        };
                        notes.push(format!(
                            "`{name}` is narrowed from {widest} to {dtype} ({reason})"
                        ));
                    }
                }
            }
            let action = if is_float {
                Action::Merge
            } else {
                Action::Copy
            };
            tensors.push(PlannedTensor {
                name: name.clone(),
                shape,
                dtype,
                action,
                shard: 0,
            });
        }

        // Fisher files may not hold tensors the model lacks.
        let float_names: HashSet<&str> = tensors
            .iter()
            .filter(|t| t.action == Action::Merge)
            .map(|t| t.name.as_str())
            .collect();
        for fisher in inputs.fishers.iter().chain(inputs.base_fisher.iter()) {
            let extra: Vec<&str> = fisher
                .names()
                .iter()
                .map(String::as_str)
                .filter(|n| !float_names.contains(n))
                .collect();
            if !extra.is_empty() {
                problems.push(format!(
                    "Fisher {} has tensors the model lacks: {}",
                    fisher.path().display(),
                    list_names(&extra)
                ));
            }
        }
        let _ = &ordered;

        if !problems.is_empty() {
            problems.dedup();
            let count = match problems.len() {
                1 => "1 problem".to_string(),
                n => format!("{n} problems"),
            };
            return Err(Error::Mismatch(format!(
                "the inputs do not match ({count}):\n  {}",
                problems.join("\n  ")
            )));
        }
        if tensors.is_empty() {
            return Err(Error::Mismatch(format!(
                "{} contains no tensors, so there is nothing to merge",
                reference.path().display()
            )));
        }

        let (shards, index) = assign_shards(&mut tensors, options.shard_size_bytes);
        let out_dtype = dtypes_seen.into_iter().next_back();
        Ok(Plan {
            kind,
            tensors,
            shards,
            index,
            notes,
            out_dtype,
            vocab_size,
        })
    }

    /// Total bytes of the output: headers, data and index.
    pub fn output_bytes(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.header.len() as u64 + s.data_bytes)
            .sum::<u64>()
            + self.index.as_ref().map_or(0, |i| i.len() as u64)
    }

    /// Returns the inputs of output tensor `i` in kernel order.
    ///
    /// A view with fewer rows than the output (under a vocabulary policy) reads its missing
    /// rows from the first input of its group (models, or Fishers) that has them.
    pub fn tensor_inputs<'a>(&'a self, inputs: &'a MergeInputs, i: usize) -> TensorInputs<'a> {
        let t = &self.tensors[i];
        let layout = inputs.layout(self.kind);
        let mut views: Vec<TensorView<'a>> = inputs
            .ordered(self.kind)
            .into_iter()
            .map(|c| lookup(c, &t.name).expect("validated by Plan::build"))
            .collect();
        let models_end = layout.has_base as usize + layout.models;
        let elems = t.elems();
        for group in [0..models_end, models_end..views.len()] {
            let donors: Vec<TensorView<'a>> = views[group.clone()].to_vec();
            for v in &mut views[group] {
                if v.info.elems() < elems {
                    let donor = donors
                        .iter()
                        .find(|d| d.info.elems() >= elems && d.dtype() == v.dtype())
                        .expect("validated by Plan::build");
                    v.tail = Some(Tail {
                        start_elems: v.info.elems(),
                        source: donor.source,
                        info: donor.info,
                    });
                }
            }
        }
        TensorInputs {
            name: &t.name,
            elems,
            shape: &t.shape,
            views,
        }
    }
}

/// True when two shapes differ at most in their first dimension.
fn same_but_rows(a: &[u64], b: &[u64]) -> bool {
    a.len() == b.len() && !a.is_empty() && a[1..] == b[1..]
}

/// True for tensors whose rows are vocabulary entries.
fn is_embedding(name: &str) -> bool {
    ["embed", "wte", "lm_head", "word_embeddings", "embed_out"]
        .iter()
        .any(|k| name.contains(k))
}

fn check_inputs_for_method(inputs: &MergeInputs, kind: MethodKind) -> Result<()> {
    if inputs.models.is_empty() {
        return Err(Error::InvalidParameter(format!(
            "{kind}: no models to merge; give at least one model"
        )));
    }
    if kind.requires_base() && inputs.base.is_none() {
        return Err(Error::InvalidParameter(format!(
            "{kind} needs a base model; set base_model or --base"
        )));
    }
    if kind.uses_fishers() && inputs.fishers.len() != inputs.models.len() {
        return Err(Error::InvalidParameter(format!(
            "{kind} needs one Fisher file per model: {} models but {} Fisher files",
            inputs.models.len(),
            inputs.fishers.len()
        )));
    }
    Ok(())
}

fn check_quantized(ckpt: &Checkpoint, name: &str, dtype: crate::dtype::Dtype) -> Result<()> {
    let packed = [
        "qweight",
        "qzeros",
        "scales",
        "g_idx",
        "weight_scale",
        "absmax",
        "quant_map",
    ];
    let last = name.rsplit('.').next().unwrap_or(name);
    let is_packed = packed.contains(&last) || matches!(dtype, Dtype::F8E4M3 | Dtype::F8E5M2);
    if is_packed {
        return Err(Error::Unsupported(format!(
            "{}: tensor `{name}` ({dtype}) is part of a quantized checkpoint; gradmerge merges float weights only, so merge the unquantized model and quantize the result",
            ckpt.path().display()
        )));
    }
    Ok(())
}

fn shape_problem(
    name: &str,
    ckpt: &Checkpoint,
    shape: &[u64],
    reference: &Checkpoint,
    ref_shape: &[u64],
) -> String {
    let rows_only =
        shape.len() == ref_shape.len() && !shape.is_empty() && shape[1..] == ref_shape[1..];
    let is_embedding = name.contains("embed") || name.contains("wte") || name.contains("lm_head");
    if rows_only && is_embedding {
        format!(
            "`{name}` has shape {shape:?} in {} but {ref_shape:?} in {} (different vocabulary sizes, {} and {} rows); rows are never dropped silently: choose --vocab-policy base (keep the base's rows) or --vocab-policy fill (take missing rows from the model that has them), or drop that model",
            ckpt.path().display(), reference.path().display(), shape[0], ref_shape[0]
        )
    } else {
        format!(
            "`{name}` has shape {shape:?} in {} but {ref_shape:?} in {}",
            ckpt.path().display(),
            reference.path().display()
        )
    }
}

fn list_names(names: &[&str]) -> String {
    const SHOWN: usize = 8;
    let mut out = names
        .iter()
        .take(SHOWN)
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        out.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    out
}

/// Splits tensors into shards of at most `shard_size_bytes` data (a larger tensor gets a
/// shard of its own) and encodes every header and the index.
fn assign_shards(
    tensors: &mut [PlannedTensor],
    shard_size_bytes: u64,
) -> (Vec<ShardSpec>, Option<Vec<u8>>) {
    let mut groups: Vec<Vec<usize>> = vec![Vec::new()];
    let mut current = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let size = t.size_bytes();
        if current > 0 && current + size > shard_size_bytes {
            groups.push(Vec::new());
            current = 0;
        }
        groups.last_mut().expect("one group").push(i);
        current += size;
    }
    let count = groups.len();
    let metadata = vec![("format".to_string(), "pt".to_string())];
    let mut shards = Vec::with_capacity(count);
    let mut weight_map = Vec::new();
    let mut total = 0u64;
    for (s, group) in groups.iter().enumerate() {
        let file_name = if count == 1 {
            SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", s + 1, count)
        };
        let entries: Vec<(&str, Dtype, &[u64])> = group
            .iter()
            .map(|&i| {
                (
                    tensors[i].name.as_str(),
                    tensors[i].dtype,
                    tensors[i].shape.as_slice(),
                )
            })
            .collect();
        let (header, offsets) = encode_header(&entries, &metadata);
        let data_bytes = offsets.last().map_or(0, |o| o.1);
        for &i in group {
            weight_map.push((tensors[i].name.clone(), file_name.clone()));
        }
        total += data_bytes;
        shards.push(ShardSpec {
            file_name,
            header,
            data_bytes,
        });
        for &i in group {
            tensors[i].shard = s;
        }
    }
    let index = (count > 1).then(|| encode_index(total, &weight_map));
    (shards, index)
}

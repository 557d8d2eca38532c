//! A checkpoint: the set of sources that form one model (or one Fisher estimate), found
//! from a path the way Hugging Face lays them out.
//!
//! Accepted layouts, checked in this order for a folder:
//! 1. `model.safetensors.index.json` and exactly the shards it names; other
//!    `.safetensors` files beside them are ignored. A `model.safetensors` beside the index
//!    is ambiguous and an error.
//! 2. `model.safetensors`.
//! 3. Every `*.safetensors` file, when no tensor name repeats.
//!
//! A path to a file is read as a single-file checkpoint.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::format::{self, TensorInfo};
use crate::source::{IoMode, Source};

/// File name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// File name of a shard index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One model's tensors across its shards.
///
/// Invariant: each tensor name maps to exactly one `(source, tensor)` pair, and every
/// source's header has been validated.
#[derive(Debug)]
pub struct Checkpoint {
    path: PathBuf,
    folder: Option<PathBuf>,
    sources: Vec<Source>,
    locations: HashMap<String, (usize, usize)>,
    order: Vec<String>,
    config: Option<Value>,
}

impl Checkpoint {
    /// Finds and opens the checkpoint at `path`, validating every header and the index.
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::NoCheckpoint`], [`Error::AmbiguousCheckpoint`],
    /// [`Error::DuplicateTensor`], [`Error::InvalidIndex`], [`Error::Unsupported`] for a
    /// quantized model, and every header error of [`Source::open`].
    pub fn open(path: &Path, mode: IoMode) -> Result<Checkpoint> {
        let meta = fs::metadata(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::NotFound {
                    path: path.to_path_buf(),
                }
            } else {
                Error::io("stat", path, e)
            }
        })?;
        let is_index = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().ends_with(".index.json"));
        let (folder, sources) = if meta.is_dir() {
            (Some(path.to_path_buf()), open_folder(path, mode)?)
        } else if is_index {
            return Err(Error::Unsupported(format!(
                "{} is a shard index, not a checkpoint file; pass the folder that contains it ({})",
                path.display(),
                path.parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."))
                    .display()
            )));
        } else {
            let folder = path.parent().map(Path::to_path_buf);
            (folder, vec![Source::open(path, mode)?])
        };

        let config = match &folder {
            Some(f) if meta.is_dir() => read_config(&f.join("config.json"))?,
            _ => None,
        };
        if let Some(q) = config.as_ref().and_then(|c| c.get("quantization_config")) {
            let method = q
                .get("quant_method")
                .and_then(Value::as_str)
                .unwrap_or("unknown");
            return Err(Error::Unsupported(format!(
                "{}: quantized checkpoint (quantization_config, quant_method `{method}`); \
                 gradmerge merges float weights only, so merge the unquantized model and quantize the result",
                path.join("config.json").display()
            )));
        }

        let mut locations = HashMap::new();
        let mut order = Vec::new();
        for (si, source) in sources.iter().enumerate() {
            for (ti, t) in source.header().tensors.iter().enumerate() {
                if let Some((other, _)) = locations.insert(t.name.clone(), (si, ti)) {
                    return Err(Error::DuplicateTensor {
                        tensor: t.name.clone(),
                        first: sources[other].path().to_path_buf(),
                        second: source.path().to_path_buf(),
                    });
                }
                order.push(t.name.clone());
            }
        }
        Ok(Checkpoint {
            path: path.to_path_buf(),
            folder,
            sources,
            locations,
            order,
            config,
        })
    }

    /// Returns the path this checkpoint was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Returns the folder that contains the checkpoint and its side files, if any.
    pub fn folder(&self) -> Option<&Path> {
        self.folder.as_deref()
    }

    /// Returns the opened files, in shard order.
    pub fn sources(&self) -> &[Source] {
        &self.sources
    }

    /// Tensor names in file order (shards in name order, tensors by offset).
    pub fn names(&self) -> &[String] {
        &self.order
    }

    /// Looks up a tensor by name.
    pub fn get(&self, name: &str) -> Option<(&Source, &TensorInfo)> {
        let &(si, ti) = self.locations.get(name)?;
        let source = &self.sources[si];
        Some((source, &source.header().tensors[ti]))
    }

    /// Returns the parsed `config.json` of the folder, if present.
    pub fn config(&self) -> Option<&Value> {
        self.config.as_ref()
    }

    /// Returns the first source's `__metadata__` value for `key`.
    pub fn metadata_value(&self, key: &str) -> Option<&str> {
        self.sources
            .iter()
            .find_map(|s| s.header().metadata_value(key))
    }

    /// Total data bytes over all shards.
    pub fn data_bytes(&self) -> u64 {
        self.sources.iter().map(|s| s.header().data_len_bytes).sum()
    }

    /// Returns true when `config.json` ties the input and output embeddings. Hugging
    /// Face's default for a config without the key is true.
    pub fn ties_embeddings(&self) -> bool {
        self.config
            .as_ref()
            .map(|c| {
                c.get("tie_word_embeddings")
                    .and_then(Value::as_bool)
                    .unwrap_or(true)
            })
            .unwrap_or(false)
    }
}

fn read_config(path: &Path) -> Result<Option<Value>> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read", path, e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| Error::Mismatch(format!("{}: invalid JSON: {e}", path.display())))
}

fn open_folder(folder: &Path, mode: IoMode) -> Result<Vec<Source>> {
    let index = folder.join(INDEX_FILE);
    let single = folder.join(SINGLE_FILE);
    let has_index = index.is_file();
    if has_index && single.is_file() {
        return Err(Error::AmbiguousCheckpoint { single, index });
    }
    if has_index {
        return open_indexed(folder, &index, mode);
    }
    if single.is_file() {
        return Ok(vec![Source::open(&single, mode)?]);
    }

    // Shards without an index: every .safetensors file, in name order.
    let mut shards = Vec::new();
    let mut has_bin = false;
    let entries = fs::read_dir(folder).map_err(|e| Error::io("list", folder, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list", folder, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') {
            continue;
        }
        if name.ends_with(".safetensors") {
            shards.push(entry.path());
        } else if name.ends_with(".bin") || name.ends_with(".pt") || name.ends_with(".pth") {
            has_bin = true;
        }
    }
    if shards.is_empty() {
        if has_bin {
            return Err(Error::Unsupported(format!(
                "{}: contains PyTorch pickle weights (.bin/.pt) but no .safetensors files; convert them to safetensors first",
                folder.display()
            )));
        }
        return Err(Error::NoCheckpoint {
            path: folder.to_path_buf(),
        });
    }
    shards.sort();
    shards.iter().map(|p| Source::open(p, mode)).collect()
}

fn open_indexed(folder: &Path, index_path: &Path, mode: IoMode) -> Result<Vec<Source>> {
    let bytes = fs::read(index_path).map_err(|e| Error::io("read", index_path, e))?;
    let index = format::parse_index(index_path, &bytes)?;
    let shard_names = index.shard_names();
    if shard_names.is_empty() {
        return Err(Error::index(index_path, "weight_map names no tensors"));
    }

    // Every named shard must exist and be valid.
    let mut sources = Vec::with_capacity(shard_names.len());
    for name in &shard_names {
        let path = folder.join(name);
        if !path.is_file() {
            let tensor = index
                .weight_map
                .iter()
                .find(|(_, s)| s == name)
                .map(|(t, _)| t.as_str())
                .unwrap_or("");
            return Err(Error::index(
                index_path,
                format!(
                    "names shard `{name}` (for tensor `{tensor}` and others), which does not exist in {}; download the missing shard",
                    folder.display()
                ),
            ));
        }
        sources.push(Source::open(&path, mode)?);
    }

    // The index and the shards must agree tensor by tensor.
    let by_name: HashMap<&str, usize> = shard_names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    let mut mapped: HashMap<&str, &str> = HashMap::new();
    for (tensor, shard) in &index.weight_map {
        mapped.insert(tensor, shard);
        let source = &sources[by_name[shard.as_str()]];
        if !source.header().tensors.iter().any(|t| &t.name == tensor) {
            return Err(Error::index(
                index_path,
                format!(
                    "maps tensor `{tensor}` to `{shard}`, but that shard does not contain it; the index and shards disagree (re-download them together)"
                ),
            ));
        }
    }
    for source in &sources {
        let shard = source
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for t in &source.header().tensors {
            match mapped.get(t.name.as_str()) {
                Some(s) if *s == shard => {}
                Some(s) => {
                    return Err(Error::DuplicateTensor {
                        tensor: t.name.clone(),
                        first: folder.join(s),
                        second: source.path().to_path_buf(),
                    })
                }
                None => {
                    return Err(Error::index(
                        index_path,
                        format!(
                            "does not list tensor `{}`, which shard `{shard}` contains; the index and shards disagree (re-download them together)",
                            t.name
                        ),
                    ))
                }
            }
        }
    }

    // A wrong total_size is common in hand-edited indexes and does not affect reading.
    let actual: u64 = sources.iter().map(|s| s.header().data_len_bytes).sum();
    if let Some(total) = index.total_size {
        if total != actual {
            log::warn!(
                "{}: metadata.total_size is {total} but the shards hold {actual} data bytes",
                index_path.display()
            );
        }
    }
    Ok(sources)
}

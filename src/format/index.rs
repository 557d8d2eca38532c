//! `model.safetensors.index.json`: the map from tensor name to shard file.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// A parsed shard index.
///
/// Invariant: every shard name is a plain file name (no separator, not `.` or `..`), so
/// joining it to the index's folder cannot leave that folder.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardIndex {
    /// `metadata.total_size`, when present: the data bytes of all shards.
    pub total_size: Option<u64>,
    /// `(tensor, shard file name)` in file order.
    pub weight_map: Vec<(String, String)>,
}

impl ShardIndex {
    /// Returns the distinct shard file names, sorted.
    pub fn shard_names(&self) -> Vec<String> {
        let set: BTreeSet<&String> = self.weight_map.iter().map(|(_, s)| s).collect();
        set.into_iter().cloned().collect()
    }
}

/// Parses an index file's bytes.
///
/// # Errors
/// [`Error::InvalidIndex`] naming `path` for bytes that are not a JSON object, a missing or
/// malformed `weight_map`, a non-string or unsafe shard name, or a non-integer `total_size`.
pub fn parse_index(path: &Path, bytes: &[u8]) -> Result<ShardIndex> {
    if bytes.is_empty() {
        return Err(Error::index(path, "index file is empty"));
    }
    if bytes.starts_with(b"version https://git-lfs") {
        return Err(Error::LfsPointer {
            path: path.to_path_buf(),
            size_bytes: bytes.len() as u64,
        });
    }
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| Error::index(path, format!("index is not valid JSON: {e}")))?;
    let Value::Object(mut object) = value else {
        return Err(Error::index(path, "index is not a JSON object"));
    };

    let total_size = match object.get("metadata") {
        None | Some(Value::Null) => None,
        Some(Value::Object(meta)) => match meta.get("total_size") {
            None | Some(Value::Null) => None,
            Some(v) => Some(parse_total_size(path, v)?),
        },
        Some(other) => {
            return Err(Error::index(
                path,
                format!("`metadata` must be an object, found {other}"),
            ))
        }
    };

    let weight_map = match object.remove("weight_map") {
        Some(Value::Object(map)) => parse_weight_map(path, map)?,
        Some(other) => {
            return Err(Error::index(
                path,
                format!(
                    "`weight_map` must be an object of tensor name to file name, found {other}"
                ),
            ))
        }
        None => return Err(Error::index(path, "`weight_map` is missing")),
    };
    Ok(ShardIndex {
        total_size,
        weight_map,
    })
}

fn parse_total_size(path: &Path, v: &Value) -> Result<u64> {
    // Some writers store the size as a float such as 1234.0.
    if let Some(n) = v.as_u64() {
        return Ok(n);
    }
    match v.as_f64() {
        Some(f) if f >= 0.0 && f.fract() == 0.0 && f < 2f64.powi(63) => Ok(f as u64),
        _ => Err(Error::index(
            path,
            format!("`metadata.total_size` must be a non-negative integer, found {v}"),
        )),
    }
}

fn parse_weight_map(path: &Path, map: Map<String, Value>) -> Result<Vec<(String, String)>> {
    let mut out = Vec::with_capacity(map.len());
    for (tensor, file) in map {
        let Value::String(file) = file else {
            return Err(Error::index(
                path,
                format!("weight_map entry `{tensor}` must be a file name, found {file}"),
            ));
        };
        let unsafe_name = file.is_empty()
            || file == "."
            || file == ".."
            || file.contains('/')
            || file.contains('\\')
            || file.contains('\0');
        if unsafe_name {
            return Err(Error::index(
                path,
                format!(
                    "weight_map entry `{tensor}` names `{file}`, which is not a plain file name in the index's folder"
                ),
            ));
        }
        out.push((tensor, file));
    }
    Ok(out)
}

/// Encodes an index with `metadata.total_size` and the weight map in the given order.
pub fn encode_index(total_size: u64, weight_map: &[(String, String)]) -> Vec<u8> {
    let map: Map<String, Value> = weight_map
        .iter()
        .map(|(t, f)| (t.clone(), Value::String(f.clone())))
        .collect();
    let mut meta = Map::new();
    meta.insert("total_size".into(), Value::from(total_size));
    let mut object = Map::new();
    object.insert("metadata".into(), Value::Object(meta));
    object.insert("weight_map".into(), Value::Object(map));
    let mut bytes = serde_json::to_vec_pretty(&Value::Object(object)).expect("JSON of strings");
    bytes.push(b'\n');
    bytes
}

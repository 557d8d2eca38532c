//! Parsing and encoding of safetensors headers.
//!
//! Parsing trusts nothing in the file: every size is checked against the file length with
//! checked arithmetic before it is used, and the tensor spans must tile the data section
//! exactly (contiguous from 0, no gap, no overlap, no trailing bytes).

use std::path::Path;

use serde_json::{Map, Value};

use crate::dtype::Dtype;
use crate::error::{Error, Result};

/// Largest header accepted, in bytes. The `safetensors` crate uses the same limit.
pub const HEADER_LIMIT_BYTES: u64 = 100_000_000;

/// First bytes of a Git LFS pointer file.
const LFS_MAGIC: &[u8] = b"version https://git-lfs";

/// One tensor entry of a header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions; empty for a 0-d tensor.
    pub shape: Vec<u64>,
    /// Byte range `[begin, end)` relative to the start of the data section.
    pub data_offsets: (u64, u64),
}

impl TensorInfo {
    /// Number of elements (1 for a 0-d tensor). Cannot overflow once the header validated.
    pub fn elems(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Size of the data in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.data_offsets.1 - self.data_offsets.0
    }
}

/// A validated header.
///
/// Invariant: `tensors` is sorted by `data_offsets.0`, the spans are contiguous from 0 and
/// end at `data_len_bytes`, and `data_start + data_len_bytes` equals the file length.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Tensors in file order.
    pub tensors: Vec<TensorInfo>,
    /// The `__metadata__` map, in file order.
    pub metadata: Vec<(String, String)>,
    /// Absolute offset of the data section: 8 + header length.
    pub data_start: u64,
    /// Length of the data section in bytes.
    pub data_len_bytes: u64,
}

impl Header {
    /// Looks up a metadata value.
    pub fn metadata_value(&self, key: &str) -> Option<&str> {
        self.metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads the 8-byte length prefix and checks it against the file length.
///
/// `prefix` contains the first `min(file_len, 64)` bytes or more. Returns the JSON length `N`.
///
/// # Errors
/// [`Error::EmptyFile`], [`Error::LfsPointer`], [`Error::Truncated`] or
/// [`Error::InvalidHeader`], each naming `path`.
pub fn parse_length_prefix(path: &Path, prefix: &[u8], file_len: u64) -> Result<u64> {
    if file_len == 0 {
        return Err(Error::EmptyFile {
            path: path.to_path_buf(),
        });
    }
    if prefix.starts_with(LFS_MAGIC) {
        return Err(Error::LfsPointer {
            path: path.to_path_buf(),
            size_bytes: file_len,
        });
    }
    let Some(len_bytes) = prefix.get(..8) else {
        return Err(Error::Truncated {
            path: path.to_path_buf(),
            needed_bytes: 8,
            actual_bytes: file_len,
        });
    };
    let header_len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
    if header_len > HEADER_LIMIT_BYTES {
        return Err(Error::header(
            path,
            format!(
                "header length {header_len} exceeds the {HEADER_LIMIT_BYTES}-byte limit; \
                 this is probably not a safetensors file"
            ),
        ));
    }
    if header_len < 2 {
        return Err(Error::header(
            path,
            format!("header length {header_len} is too small for a JSON object"),
        ));
    }
    let needed = 8 + header_len;
    if needed > file_len {
        return Err(Error::Truncated {
            path: path.to_path_buf(),
            needed_bytes: needed,
            actual_bytes: file_len,
        });
    }
    Ok(header_len)
}

/// Parses and validates a header.
///
/// `json` is the `N` header bytes that follow the length prefix, and `file_len` the length of
/// the whole file.
///
/// # Errors
/// [`Error::InvalidHeader`] for JSON that is not UTF-8, not JSON or not an object, and for a
/// bad or repeated `__metadata__`; [`Error::InvalidTensor`] for a repeated name or field, a
/// bad entry, an unknown dtype, a shape whose size overflows, a span that does not match the
/// shape, a gap or an overlap; [`Error::Truncated`] when the spans run past the end of the
/// file.
pub fn parse_header(path: &Path, json: &[u8], file_len: u64) -> Result<Header> {
    let data_start = 8 + json.len() as u64;
    let data_len_bytes = file_len.checked_sub(data_start).ok_or(Error::Truncated {
        path: path.to_path_buf(),
        needed_bytes: data_start,
        actual_bytes: file_len,
    })?;

    // Decode the JSON object.
    let text = std::str::from_utf8(json).map_err(|e| {
        Error::header(
            path,
            format!("header is not UTF-8 (invalid byte at {})", e.valid_up_to()),
        )
    })?;
    let value: Value = serde_json::from_str(text.trim_end_matches(' '))
        .map_err(|e| Error::header(path, format!("header is not valid JSON: {e}")))?;
    let Value::Object(object) = value else {
        return Err(Error::header(
            path,
            "header is JSON but not an object of tensors",
        ));
    };
    if let Some(keys) = find_repeated_key(text) {
        return Err(repeated_key_error(path, &keys));
    }

    // Read the entries.
    let mut metadata = Vec::new();
    let mut tensors = Vec::with_capacity(object.len());
    for (name, entry) in object {
        if name == "__metadata__" {
            metadata = parse_metadata(path, entry)?;
        } else {
            tensors.push(parse_tensor(path, name, entry)?);
        }
    }

    check_layout(path, &mut tensors, data_start, data_len_bytes, file_len)?;
    Ok(Header {
        tensors,
        metadata,
        data_start,
        data_len_bytes,
    })
}

fn parse_metadata(path: &Path, entry: Value) -> Result<Vec<(String, String)>> {
    match entry {
        Value::Null => Ok(Vec::new()),
        Value::Object(map) => map
            .into_iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k, s)),
                other => Err(Error::header(
                    path,
                    format!("__metadata__ value of `{k}` must be a string, found {other}"),
                )),
            })
            .collect(),
        other => Err(Error::header(
            path,
            format!("__metadata__ must be an object of strings, found {other}"),
        )),
    }
}

fn parse_tensor(path: &Path, name: String, entry: Value) -> Result<TensorInfo> {
    let Value::Object(map) = entry else {
        return Err(Error::tensor(
            path,
            name,
            "entry is not an object with dtype, shape and data_offsets",
        ));
    };
    let dtype = parse_dtype(path, &name, &map)?;
    let shape = parse_u64_array(path, &name, &map, "shape")?;
    let offsets = parse_u64_array(path, &name, &map, "data_offsets")?;
    let [begin, end] = offsets[..] else {
        return Err(Error::tensor(
            path,
            name,
            format!(
                "data_offsets must hold two numbers, found {}",
                offsets.len()
            ),
        ));
    };
    if begin > end {
        return Err(Error::tensor(
            path,
            name,
            format!("data_offsets [{begin}, {end}] end before they begin"),
        ));
    }

    // The span must be exactly shape x element size, computed without overflow.
    let elems = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
    let bytes = elems.and_then(|n| n.checked_mul(dtype.size_bytes() as u64));
    let Some(bytes) = bytes else {
        return Err(Error::tensor(
            path,
            name,
            format!("shape {shape:?} of {dtype} overflows a 64-bit byte size"),
        ));
    };
    if bytes != end - begin {
        return Err(Error::tensor(
            path,
            name,
            format!(
                "shape {shape:?} of {dtype} needs {bytes} bytes but data_offsets [{begin}, {end}] span {}",
                end - begin
            ),
        ));
    }
    Ok(TensorInfo {
        name,
        dtype,
        shape,
        data_offsets: (begin, end),
    })
}

fn parse_dtype(path: &Path, name: &str, map: &Map<String, Value>) -> Result<Dtype> {
    match map.get("dtype") {
        Some(Value::String(s)) => Dtype::from_header_name(s).ok_or_else(|| {
            Error::tensor(
                path,
                name,
                format!("unknown dtype `{s}` (known: F64, F32, F16, BF16, F8_E4M3, F8_E5M2, I64, I32, I16, I8, U64, U32, U16, U8, BOOL)"),
            )
        }),
        Some(other) => Err(Error::tensor(
            path,
            name,
            format!("dtype must be a string, found {other}"),
        )),
        None => Err(Error::tensor(path, name, "dtype is missing")),
    }
}

fn parse_u64_array(
    path: &Path,
    name: &str,
    map: &Map<String, Value>,
    key: &str,
) -> Result<Vec<u64>> {
    let Some(value) = map.get(key) else {
        return Err(Error::tensor(path, name, format!("{key} is missing")));
    };
    let Value::Array(items) = value else {
        return Err(Error::tensor(
            path,
            name,
            format!("{key} must be an array of non-negative integers, found {value}"),
        ));
    };
    items
        .iter()
        .map(|item| {
            item.as_u64().ok_or_else(|| {
                Error::tensor(
                    path,
                    name,
                    format!("{key} must hold non-negative integers, found {item}"),
                )
            })
        })
        .collect()
}

/// Checks that the spans tile the data section: sorted, contiguous from 0, in bounds.
fn check_layout(
    path: &Path,
    tensors: &mut [TensorInfo],
    data_start: u64,
    data_len_bytes: u64,
    file_len: u64,
) -> Result<()> {
    tensors.sort_by_key(|t| t.data_offsets);

    // A span past the end is a truncated file when the spans are otherwise contiguous,
    // and a bad offset when they are not.
    let spans_total = tensors
        .iter()
        .try_fold(0u64, |acc, t| acc.checked_add(t.size_bytes()));
    let max_end = tensors.iter().map(|t| t.data_offsets.1).max().unwrap_or(0);
    if max_end > data_len_bytes {
        if spans_total == Some(max_end) && is_contiguous(tensors) {
            return Err(Error::Truncated {
                path: path.to_path_buf(),
                needed_bytes: data_start.saturating_add(max_end),
                actual_bytes: file_len,
            });
        }
        let t = tensors
            .iter()
            .find(|t| t.data_offsets.1 > data_len_bytes)
            .expect("max_end exceeds the data length");
        return Err(Error::tensor(
            path,
            &t.name,
            format!(
                "data_offsets [{}, {}] are out of bounds: the data section holds {data_len_bytes} bytes",
                t.data_offsets.0, t.data_offsets.1
            ),
        ));
    }

    // Contiguous, in order.
    let mut expected_begin = 0u64;
    let mut previous: Option<&TensorInfo> = None;
    for t in tensors.iter() {
        let (begin, end) = t.data_offsets;
        if begin != expected_begin {
            let detail = match previous {
                Some(p) if begin < expected_begin => format!(
                    "data_offsets [{begin}, {end}] overlap tensor `{}` at [{}, {}]",
                    p.name, p.data_offsets.0, p.data_offsets.1
                ),
                Some(p) => format!(
                    "data_offsets [{begin}, {end}] leave a gap of {} bytes after tensor `{}`",
                    begin - expected_begin,
                    p.name
                ),
                None => format!(
                    "data_offsets [{begin}, {end}] leave a gap of {begin} bytes at the start of the data section"
                ),
            };
            return Err(Error::tensor(path, &t.name, detail));
        }
        expected_begin = end;
        previous = Some(t);
    }
    if expected_begin != data_len_bytes {
        return Err(Error::header(
            path,
            format!(
                "{} bytes after the last tensor are not covered by any tensor; the file is corrupt or was appended to",
                data_len_bytes - expected_begin
            ),
        ));
    }
    Ok(())
}

/// Returns the path of keys to the first key that appears twice in one JSON object of
/// `text`, at any depth: `["a"]` for a repeated tensor name, `["a", "shape"]` for a
/// repeated field of tensor `a`.
///
/// `serde_json` keeps only the last value of a repeated key, which would hide the earlier
/// entry, however malformed.
fn find_repeated_key(text: &str) -> Option<Vec<String>> {
    use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

    struct RepeatedKey;

    impl<'de> DeserializeSeed<'de> for RepeatedKey {
        type Value = Option<Vec<String>>;

        fn deserialize<D: serde::Deserializer<'de>>(
            self,
            deserializer: D,
        ) -> Result<Self::Value, D::Error> {
            deserializer.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for RepeatedKey {
        type Value = Option<Vec<String>>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("any JSON value")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut seen = std::collections::HashSet::new();
            let mut found = None;
            // The whole object is consumed even after a find, so the parser stays valid.
            while let Some(key) = map.next_key::<String>()? {
                if found.is_some() {
                    map.next_value::<IgnoredAny>()?;
                } else if let Some(mut path) = map.next_value_seed(RepeatedKey)? {
                    path.insert(0, key);
                    found = Some(path);
                } else if !seen.insert(key.clone()) {
                    found = Some(vec![key]);
                }
            }
            Ok(found)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut found = None;
            while let Some(inner) = seq.next_element_seed(RepeatedKey)? {
                found = found.or(inner);
            }
            Ok(found)
        }

        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }

    let mut deserializer = serde_json::Deserializer::from_str(text);
    RepeatedKey.deserialize(&mut deserializer).ok().flatten()
}

/// Builds the error for a key that appears twice, given its path from
/// [`find_repeated_key`].
fn repeated_key_error(path: &Path, keys: &[String]) -> Error {
    let ambiguous = "appears more than once, so the header is ambiguous; each key must be unique";
    match keys {
        [name] if name == "__metadata__" => {
            Error::header(path, format!("`__metadata__` {ambiguous}"))
        }
        [name] => Error::tensor(path, name, format!("the tensor name {ambiguous}")),
        [outer, inner @ ..] if outer == "__metadata__" => Error::header(
            path,
            format!("`__metadata__` key `{}` {ambiguous}", inner.join(".")),
        ),
        [outer, inner @ ..] => Error::tensor(
            path,
            outer,
            format!("key `{}` {ambiguous}", inner.join(".")),
        ),
        [] => Error::header(path, format!("a key {ambiguous}")),
    }
}

fn is_contiguous(tensors: &[TensorInfo]) -> bool {
    let mut expected = 0;
    for t in tensors {
        if t.data_offsets.0 != expected {
            return false;
        }
        expected = t.data_offsets.1;
    }
    true
}

/// Encodes a header for tensors laid out in the given order, with `__metadata__` first.
///
/// Returns the complete prefix (length, JSON padded with spaces so that the data section
/// starts at a multiple of 8) and the byte offset of each tensor in the data section.
///
/// # Panics
/// If a tensor's byte size overflows `u64`; callers validate shapes first.
pub fn encode_header(
    tensors: &[(&str, Dtype, &[u64])],
    metadata: &[(String, String)],
) -> (Vec<u8>, Vec<(u64, u64)>) {
    let mut object = Map::new();
    if !metadata.is_empty() {
        let meta: Map<String, Value> = metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        object.insert("__metadata__".into(), Value::Object(meta));
    }
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut cursor = 0u64;
    for &(name, dtype, shape) in tensors {
        let bytes = shape
            .iter()
            .try_fold(dtype.size_bytes() as u64, |acc, &d| acc.checked_mul(d))
            .expect("tensor byte size overflows u64");
        let end = cursor + bytes;
        let mut entry = Map::new();
        entry.insert("dtype".into(), Value::from(dtype.header_name()));
        entry.insert("shape".into(), Value::from(shape.to_vec()));
        entry.insert("data_offsets".into(), Value::from(vec![cursor, end]));
        object.insert(name.to_string(), Value::Object(entry));
        offsets.push((cursor, end));
        cursor = end;
    }
    let mut json = serde_json::to_vec(&Value::Object(object)).expect("JSON of strings and numbers");
    while (json.len() + 8) % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    (out, offsets)
}

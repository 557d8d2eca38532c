//! The safetensors file format: header parsing and encoding, and shard index files.
//!
//! A safetensors file is `N` (u64, little-endian), `N` bytes of UTF-8 JSON, then the data
//! section. The JSON object maps each tensor name to `{dtype, shape, data_offsets}` where
//! offsets are relative to the data section; the optional `__metadata__` entry maps strings
//! to strings.

pub mod header;
pub mod index;

pub use header::{encode_header, parse_header, Header, TensorInfo, HEADER_LIMIT_BYTES};
pub use index::{encode_index, parse_index, ShardIndex};

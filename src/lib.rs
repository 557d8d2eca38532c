//! gradmerge merges safetensors checkpoints out-of-core: inputs are memory-mapped,
//! every output tensor is computed in bounded chunks on a thread pool, and one writer
//! thread streams the shards to disk, so peak memory is set by a budget and not by the
//! model size.
//!
//! The pipeline, one module per stage:
//! - [`format`]: safetensors headers and shard indexes, parsed with checked arithmetic.
//! - [`source`] and [`checkpoint`]: mapped (or positioned-read) input files, and the set
//!   of shards that forms one model.
//! - [`plan`]: the validated list of output tensors, their inputs, dtypes and shards.
//! - [`method`]: merge methods, each a per-tensor preparation and an elementwise kernel.
//! - [`convert`]: dtype conversion to and from the working precision.
//! - [`pipeline`]: the engine that runs a plan; [`writer`]: the output folder and writer.

#![warn(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod checkpoint;
pub mod config;
pub mod convert;
pub mod dtype;
pub mod error;
pub mod format;
pub mod interrupt;
pub mod job;
pub mod method;
pub mod params;
pub mod pipeline;
pub mod plan;
pub mod sidefiles;
pub mod source;
pub mod suggest;
pub mod synth;
pub mod units;
pub mod view;
pub mod writer;

pub use error::{Error, Result};

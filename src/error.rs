//! The library's error type.
//!
//! Every variant names the file and, where one is involved, the tensor, so the binary can
//! print it as it is. Messages end with the fix when one is known.

use std::io;
use std::path::PathBuf;

use crate::dtype::Dtype;

/// Shorthand for results whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can stop a read, a plan or a merge.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system call on `path` failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// The failed operation (`"open"`, `"read"`, `"write"`, ...).
        op: &'static str,
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// The input path does not exist.
    #[error("{path}: not found")]
    NotFound {
        /// The missing path.
        path: PathBuf,
    },

    /// A folder contains no safetensors checkpoint.
    #[error(
        "{path}: no checkpoint found (expected model.safetensors, \
         model.safetensors.index.json or *.safetensors shards)"
    )]
    NoCheckpoint {
        /// The folder.
        path: PathBuf,
    },

    /// A folder contains both a complete single file and an index.
    #[error(
        "{single} and {index} are both present, so the checkpoint is ambiguous \
         (transformers loads the single file, an index reader the shards); \
         remove or move one of them"
    )]
    AmbiguousCheckpoint {
        /// The `model.safetensors` file.
        single: PathBuf,
        /// The `model.safetensors.index.json` file.
        index: PathBuf,
    },

    /// A zero-length file.
    #[error("{path}: file is empty (0 bytes); the download or copy was probably interrupted")]
    EmptyFile {
        /// The file.
        path: PathBuf,
    },

    /// A Git LFS pointer file in place of the weights.
    #[error(
        "{path}: this is a Git LFS pointer ({size_bytes} bytes), not the weights; \
         run `git lfs pull` in the repository or download the file itself"
    )]
    LfsPointer {
        /// The pointer file.
        path: PathBuf,
        /// Size of the pointer file.
        size_bytes: u64,
    },

    /// A file shorter than its own header requires.
    #[error(
        "{path}: file is truncated: {needed_bytes} bytes expected, {actual_bytes} present; \
         download the file again"
    )]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes the header implies.
        needed_bytes: u64,
        /// Bytes on disk.
        actual_bytes: u64,
    },

    /// A malformed header, described by `detail`.
    #[error("{path}: invalid safetensors header: {detail}")]
    InvalidHeader {
        /// The file.
        path: PathBuf,
        /// The problem.
        detail: String,
    },

    /// One tensor entry of a header is malformed.
    #[error("{path}: tensor `{tensor}`: {detail}")]
    InvalidTensor {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The problem.
        detail: String,
    },

    /// The same tensor name appears in two shards.
    #[error(
        "tensor `{tensor}` appears in both {first} and {second}; \
         a checkpoint must name each tensor once (if one of the files belongs to another \
         checkpoint, move it to its own folder)"
    )]
    DuplicateTensor {
        /// The tensor name.
        tensor: String,
        /// The first file.
        first: PathBuf,
        /// The second file.
        second: PathBuf,
    },

    /// An index file is malformed or disagrees with its shards.
    #[error("{path}: {detail}")]
    InvalidIndex {
        /// The index file.
        path: PathBuf,
        /// The problem.
        detail: String,
    },

    /// A checkpoint or Fisher set does not match the others.
    #[error("{0}")]
    Mismatch(String),

    /// A merge parameter or configuration value is invalid.
    #[error("{0}")]
    InvalidParameter(String),

    /// The inputs use a form gradmerge cannot merge, such as quantized weights.
    #[error("{0}")]
    Unsupported(String),

    /// Merged values are NaN or overflow the output dtype.
    #[error(
        "tensor `{tensor}`: {count} merged {} NaN or overflow {dtype}; \
         check the weights and inputs, use a wider --out-dtype, or pass --allow-non-finite",
        crate::units::plural(*.count, "value is", "values are")
    )]
    NonFinite {
        /// The tensor name.
        tensor: String,
        /// Number of affected elements.
        count: u64,
        /// The output dtype.
        dtype: Dtype,
    },

    /// gradmatch with negative weights made the precision non-positive.
    #[error(
        "tensor `{tensor}`: the merged precision H0 + sum(alpha*s*F) is <= 0 at {count} \
         elements, so gradmatch is undefined there; use smaller negative weights or a larger delta"
    )]
    NonPositivePrecision {
        /// The tensor name.
        tensor: String,
        /// Number of affected elements.
        count: u64,
    },

    /// The output destination cannot be used.
    #[error("{path}: {detail}")]
    Destination {
        /// The destination folder.
        path: PathBuf,
        /// The problem and the fix.
        detail: String,
    },

    /// Not enough free space for the output.
    #[error(
        "{path}: not enough free disk space: the output needs {needed_bytes} bytes, \
         {available_bytes} are available ({missing_bytes} missing); free space or use --shard-size on another disk"
    )]
    DiskSpace {
        /// The folder where the output goes.
        path: PathBuf,
        /// Planned output size.
        needed_bytes: u64,
        /// Free bytes on that filesystem.
        available_bytes: u64,
        /// `needed_bytes - available_bytes`.
        missing_bytes: u64,
    },

    /// The merge was interrupted by a signal.
    #[error("interrupted; the partial output was removed")]
    Interrupted,
}

impl Error {
    /// Wraps an I/O error with the operation and path.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// Builds an [`Error::InvalidHeader`].
    pub fn header(path: impl Into<PathBuf>, detail: impl Into<String>) -> Error {
        Error::InvalidHeader {
            path: path.into(),
            detail: detail.into(),
        }
    }

    /// Builds an [`Error::InvalidTensor`].
    pub fn tensor(
        path: impl Into<PathBuf>,
        tensor: impl Into<String>,
        detail: impl Into<String>,
    ) -> Error {
        Error::InvalidTensor {
            path: path.into(),
            tensor: tensor.into(),
            detail: detail.into(),
        }
    }

    /// Builds an [`Error::InvalidIndex`].
    pub fn index(path: impl Into<PathBuf>, detail: impl Into<String>) -> Error {
        Error::InvalidIndex {
            path: path.into(),
            detail: detail.into(),
        }
    }
}

//! Element types of safetensors tensors.

use std::fmt;

/// A safetensors element type, spelled as in the header (`"BF16"`, `"F32"`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dtype {
    /// Boolean, one byte per element.
    Bool,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 8-bit integer.
    I8,
    /// 8-bit float, 4 exponent bits and 3 mantissa bits.
    F8E4M3,
    /// 8-bit float, 5 exponent bits and 2 mantissa bits.
    F8E5M2,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 16-bit integer.
    U16,
    /// IEEE 754 half precision.
    F16,
    /// bfloat16: the upper half of an f32.
    BF16,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 32-bit integer.
    U32,
    /// IEEE 754 single precision.
    F32,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 64-bit integer.
    U64,
    /// IEEE 754 double precision.
    F64,
}

impl Dtype {
    /// Every dtype, in the order above.
    pub const ALL: [Dtype; 15] = [
        Dtype::Bool,
        Dtype::U8,
        Dtype::I8,
        Dtype::F8E4M3,
        Dtype::F8E5M2,
        Dtype::I16,
        Dtype::U16,
        Dtype::F16,
        Dtype::BF16,
        Dtype::I32,
        Dtype::U32,
        Dtype::F32,
        Dtype::I64,
        Dtype::U64,
        Dtype::F64,
    ];

    /// Parses the header spelling of a dtype; `None` for an unknown name.
    pub fn from_header_name(name: &str) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.header_name() == name)
    }

    /// Returns the spelling used in safetensors headers.
    pub fn header_name(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
            Dtype::F64 => "F64",
        }
    }

    /// Size of one element in bytes.
    pub fn size_bytes(self) -> usize {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 | Dtype::F8E4M3 | Dtype::F8E5M2 => 1,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::I64 | Dtype::U64 | Dtype::F64 => 8,
        }
    }

    /// True for the dtypes the merge kernels read and write: F16, BF16, F32 and F64.
    ///
    /// The 8-bit floats are storage formats of quantized checkpoints and are not merged.
    pub fn is_mergeable_float(self) -> bool {
        matches!(self, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
    }

    /// Parses a user-facing dtype name: `float32`, `bfloat16`, `float16`, `float64` and their
    /// short forms (`f32`, `bf16`, `fp16`, ...), case-insensitive. Only mergeable floats parse.
    pub fn parse_float_name(name: &str) -> Option<Dtype> {
        match name.to_ascii_lowercase().as_str() {
            "float32" | "f32" | "fp32" | "float" => Some(Dtype::F32),
            "bfloat16" | "bf16" => Some(Dtype::BF16),
            "float16" | "f16" | "fp16" | "half" => Some(Dtype::F16),
            "float64" | "f64" | "fp64" | "double" => Some(Dtype::F64),
            _ => None,
        }
    }

    /// Returns the name `transformers` writes in `config.json` (`"bfloat16"`), for floats.
    pub fn torch_name(self) -> Option<&'static str> {
        match self {
            Dtype::F32 => Some("float32"),
            Dtype::BF16 => Some("bfloat16"),
            Dtype::F16 => Some("float16"),
            Dtype::F64 => Some("float64"),
            _ => None,
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.header_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_round_trip() {
        for d in Dtype::ALL {
            assert_eq!(Dtype::from_header_name(d.header_name()), Some(d));
        }
        assert_eq!(Dtype::from_header_name("F4"), None);
    }

    #[test]
    fn float_names_parse() {
        assert_eq!(Dtype::parse_float_name("bfloat16"), Some(Dtype::BF16));
        assert_eq!(Dtype::parse_float_name("FP16"), Some(Dtype::F16));
        assert_eq!(Dtype::parse_float_name("int8"), None);
    }
}

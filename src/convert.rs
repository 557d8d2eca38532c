//! Conversion between stored element bytes and the f32 or f64 working precision.
//!
//! ```text
//! load:  bytes (F16 | BF16 | F32 | F64, little-endian) -> [A]      (A = f32 or f64)
//! store: [A] -> bytes of the output dtype, rounding to nearest, ties to even
//! ```
//!
//! Numeric rules:
//! - BF16 -> f32 is exact: the 16 bits become the upper half of the f32 (a signaling NaN
//!   becomes quiet, as in `half`).
//! - f32 -> BF16 rounds to nearest even by adding `0x7FFF + lsb` to the bits and keeping the
//!   upper half. A NaN keeps its sign and upper payload bits and is made quiet by setting
//!   bit 6, as `half::bf16::from_f32` does. Finite values that round past the largest
//!   bf16 become infinity.
//! - F16 conversions use `half`'s slice functions, which use F16C instructions when the
//!   CPU has them and give the same bits as the scalar path.
//! - f64 -> f32 (F64 inputs in f32 mode) is Rust's `as`, which rounds to nearest even.
//!
//! Loops work on fixed-size tiles with no branches in the body, so the compiler
//! vectorises them; `benches/kernels.rs` measures this.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::dtype::Dtype;

/// Elements per tile: the unit of conversion and of kernel calls. 1024 f64 values are
/// 8 KiB, so a tile of every input stays in L1 or L2 cache.
pub const TILE_ELEMS: usize = 1024;

/// The working precision of the kernels: `f32` (default) or `f64`.
pub trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::fmt::Debug
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + 'static
{
    /// Zero.
    const ZERO: Self;
    /// One.
    const ONE: Self;
    /// Converts from f64, rounding to nearest.
    fn from_f64(x: f64) -> Self;
    /// Converts to f64 exactly.
    fn to_f64(self) -> f64;
    /// Converts to f32, rounding to nearest.
    fn to_f32(self) -> f32;
    /// Absolute value.
    fn abs(self) -> Self;
    /// True for NaN.
    fn is_nan(self) -> bool;
    /// True unless NaN or infinite.
    fn is_finite(self) -> bool;
    /// Decodes `out.len()` elements of `dtype` from little-endian `bytes`.
    fn load(dtype: Dtype, bytes: &[u8], out: &mut [Self]);
    /// Encodes `values` as `dtype` and appends them to `out`. Returns how many encoded
    /// values are NaN or infinite.
    fn store(dtype: Dtype, values: &[Self], out: &mut Vec<u8>) -> u64;
}

/// Converts one f32 to bf16 bits, rounding to nearest even (see the module docs).
#[inline(always)]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16) as u16;
    let quiet_nan = ((bits >> 16) as u16) | 0x0040;
    if x.is_nan() {
        quiet_nan
    } else {
        rounded
    }
}

/// Converts bf16 bits to f32, exactly; a signaling NaN is made quiet (bit 22 set), as
/// `half::bf16::to_f32` does.
#[inline(always)]
pub fn bf16_bits_to_f32(b: u16) -> f32 {
    let bits = (b as u32) << 16;
    let is_nan = (b & 0x7FFF) > 0x7F80;
    f32::from_bits(if is_nan { bits | 0x0040_0000 } else { bits })
}

/// Calls `f` with little-endian `bytes` viewed as `T` values: without copying when they
/// are aligned, else from a copy on the stack (at most [`TILE_ELEMS`] values). Mapped
/// tensor data is aligned in practice, because safetensors data sections start at a
/// multiple of 8 and tensors at multiples of their element size, so the aligned path does
/// not even zero a buffer.
#[inline(always)]
fn with_values<T: bytemuck::Pod, R>(bytes: &[u8], f: impl FnOnce(&[T]) -> R) -> R {
    match bytemuck::try_cast_slice(bytes) {
        Ok(values) => f(values),
        Err(_) => {
            let mut tile = [T::zeroed(); TILE_ELEMS];
            let tile = &mut tile[..bytes.len() / std::mem::size_of::<T>()];
            bytemuck::cast_slice_mut(tile).copy_from_slice(bytes);
            f(tile)
        }
    }
}

/// Runs the `$portable` loop compiled for AVX2 when the CPU has it, else as built for the
/// target's baseline (SSE2 on x86-64). Both compile the same code, and integer and IEEE
/// operations give the same bits either way, so only the speed differs.
macro_rules! dispatch_avx2 {
    ($portable:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2")]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                $portable($($arg),*)
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2, checked on the line above.
                return unsafe { avx2($($arg),*) };
            }
        }
        $portable($($arg),*)
    }};
}
pub(crate) use dispatch_avx2;

fn load_f32(dtype: Dtype, bytes: &[u8], out: &mut [f32]) {
    dispatch_avx2!(load_f32_portable(dtype: Dtype, bytes: &[u8], out: &mut [f32]))
}

#[inline(always)]
fn load_f32_portable(dtype: Dtype, bytes: &[u8], out: &mut [f32]) {
    // Tiles of at most TILE_ELEMS, so the fallback copy fits the stack buffers. The loop
    // bodies are plain element maps with no branches, so they vectorise.
    let size = dtype.size_bytes();
    let n = out.len();
    for (out, bytes) in out
        .chunks_mut(TILE_ELEMS)
        .zip(bytes[..n * size].chunks(TILE_ELEMS * size))
    {
        match dtype {
            Dtype::F32 => with_values::<u32, _>(bytes, |values| {
                for (o, &b) in out.iter_mut().zip(values) {
                    *o = f32::from_bits(u32::from_le(b));
                }
            }),
            Dtype::BF16 => with_values::<u16, _>(bytes, |values| {
                for (o, &b) in out.iter_mut().zip(values) {
                    *o = bf16_bits_to_f32(u16::from_le(b));
                }
            }),
            Dtype::F16 => with_values::<u16, _>(bytes, |values| {
                if cfg!(target_endian = "little") {
                    let halves: &[f16] = bytemuck::cast_slice(values);
                    halves.convert_to_f32_slice(out);
                } else {
                    let mut bits = [0u16; TILE_ELEMS];
                    let bits = &mut bits[..out.len()];
                    for (o, &b) in bits.iter_mut().zip(values) {
                        *o = u16::from_le(b);
                    }
                    let halves: &[f16] = bytemuck::cast_slice(bits);
                    halves.convert_to_f32_slice(out);
                }
            }),
            Dtype::F64 => with_values::<u64, _>(bytes, |values| {
                for (o, &b) in out.iter_mut().zip(values) {
                    *o = f64::from_bits(u64::from_le(b)) as f32;
                }
            }),
            other => panic!("load of non-float dtype {other}"),
        }
    }
}

/// Appends the bytes of `values`, which the caller has already put in little-endian order
/// with `to_le`.
fn extend_le<T: bytemuck::Pod>(out: &mut Vec<u8>, values: &[T]) {
    out.extend_from_slice(bytemuck::cast_slice(values));
}

fn store_f32(dtype: Dtype, values: &[f32], out: &mut Vec<u8>) -> u64 {
    dispatch_avx2!(store_f32_portable(dtype: Dtype, values: &[f32], out: &mut Vec<u8>) -> u64)
}

#[inline(always)]
fn store_f32_portable(dtype: Dtype, values: &[f32], out: &mut Vec<u8>) -> u64 {
    // Each tile is encoded into a stack buffer by a branch-free loop (which vectorises) and
    // then appended with one copy. Counts are u32 per tile, which vectorises better than
    // u64.
    let mut non_finite = 0u64;
    for values in values.chunks(TILE_ELEMS) {
        let mut tile_non_finite = 0u32;
        match dtype {
            Dtype::F32 => {
                let mut bits = [0u32; TILE_ELEMS];
                let bits = &mut bits[..values.len()];
                for (o, &v) in bits.iter_mut().zip(values) {
                    tile_non_finite += (!v.is_finite()) as u32;
                    *o = v.to_bits().to_le();
                }
                extend_le(out, bits);
            }
            Dtype::BF16 => {
                let mut bits = [0u16; TILE_ELEMS];
                let bits = &mut bits[..values.len()];
                for (o, &v) in bits.iter_mut().zip(values) {
                    let b = f32_to_bf16_bits(v);
                    tile_non_finite += ((b & 0x7F80) == 0x7F80) as u32;
                    *o = b.to_le();
                }
                extend_le(out, bits);
            }
            Dtype::F16 => {
                let mut halves = [f16::ZERO; TILE_ELEMS];
                let halves = &mut halves[..values.len()];
                halves.convert_from_f32_slice(values);
                let mut bits = [0u16; TILE_ELEMS];
                let bits = &mut bits[..values.len()];
                for (o, h) in bits.iter_mut().zip(halves.iter()) {
                    let b = h.to_bits();
                    tile_non_finite += ((b & 0x7C00) == 0x7C00) as u32;
                    *o = b.to_le();
                }
                extend_le(out, bits);
            }
            Dtype::F64 => {
                let mut bits = [0u64; TILE_ELEMS];
                let bits = &mut bits[..values.len()];
                for (o, &v) in bits.iter_mut().zip(values) {
                    tile_non_finite += (!v.is_finite()) as u32;
                    *o = (v as f64).to_bits().to_le();
                }
                extend_le(out, bits);
            }
            other => panic!("store of non-float dtype {other}"),
        }
        non_finite += u64::from(tile_non_finite);
    }
    non_finite
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn abs(self) -> Self {
        f32::abs(self)
    }
    #[inline(always)]
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        f32::is_finite(self)
    }
    fn load(dtype: Dtype, bytes: &[u8], out: &mut [Self]) {
        load_f32(dtype, bytes, out)
    }
    fn store(dtype: Dtype, values: &[Self], out: &mut Vec<u8>) -> u64 {
        store_f32(dtype, values, out)
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
    #[inline(always)]
    fn abs(self) -> Self {
        f64::abs(self)
    }
    #[inline(always)]
    fn is_nan(self) -> bool {
        f64::is_nan(self)
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        f64::is_finite(self)
    }
    fn load(dtype: Dtype, bytes: &[u8], out: &mut [Self]) {
        if dtype == Dtype::F64 {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                *o = f64::from_le_bytes(b.try_into().expect("8 bytes"));
            }
            return;
        }
        // Every F16, BF16 and F32 value is exact in f32 and so in f64.
        let mut tmp = [0f32; TILE_ELEMS];
        let size = dtype.size_bytes();
        for (o, b) in out
            .chunks_mut(TILE_ELEMS)
            .zip(bytes.chunks(TILE_ELEMS * size))
        {
            let t = &mut tmp[..o.len()];
            load_f32(dtype, b, t);
            for (x, &y) in o.iter_mut().zip(t.iter()) {
                *x = y as f64;
            }
        }
    }
    fn store(dtype: Dtype, values: &[Self], out: &mut Vec<u8>) -> u64 {
        if dtype == Dtype::F64 {
            let mut non_finite = 0;
            for &v in values {
                non_finite += (!v.is_finite()) as u64;
                out.extend_from_slice(&v.to_le_bytes());
            }
            return non_finite;
        }
        // Narrow to f32 rounding to odd, then to the output type rounding to nearest even:
        // because f32 has at least two more significand bits than BF16 and F16, the two
        // steps give the same result as one rounding of the f64 value.
        let mut tmp = [0f32; TILE_ELEMS];
        let mut non_finite = 0;
        let narrow: fn(f64) -> f32 = if dtype == Dtype::F32 {
            |y| y as f32
        } else {
            f64_to_f32_round_odd
        };
        for chunk in values.chunks(TILE_ELEMS) {
            let t = &mut tmp[..chunk.len()];
            for (x, &y) in t.iter_mut().zip(chunk) {
                *x = narrow(y);
            }
            non_finite += store_f32(dtype, t, out);
        }
        non_finite
    }
}

/// Converts f64 to f32 rounding to odd: an inexact result gets its last significand bit set.
#[inline]
pub fn f64_to_f32_round_odd(x: f64) -> f32 {
    let nearest = x as f32;
    if !nearest.is_finite() || nearest as f64 == x {
        return nearest;
    }
    let bits = nearest.to_bits();
    if bits & 1 == 1 {
        return nearest;
    }
    // Step one unit towards x: the magnitude goes down if rounding went away from zero.
    let towards_zero = (nearest as f64).abs() > x.abs();
    f32::from_bits(if towards_zero { bits - 1 } else { bits + 1 })
}

/// Converts bf16 bits with `half`'s scalar path, the reference for tests.
pub fn reference_f32_to_bf16(x: f32) -> u16 {
    bf16::from_f32(x).to_bits()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_every_pattern_matches_half() {
        for b in 0..=u16::MAX {
            let x = bf16::from_bits(b).to_f32();
            assert_eq!(bf16_bits_to_f32(b).to_bits(), x.to_bits(), "load {b:#06x}");
            assert_eq!(
                f32_to_bf16_bits(x),
                reference_f32_to_bf16(x),
                "store {b:#06x}"
            );
            // The f32 patterns halfway between this value and the next, and one above.
            let bits = x.to_bits();
            for probe in [bits | 0x8000, bits | 0x8001, bits | 0x7FFF, bits | 0x0001] {
                let y = f32::from_bits(probe);
                assert_eq!(
                    f32_to_bf16_bits(y),
                    reference_f32_to_bf16(y),
                    "store {probe:#010x}"
                );
            }
        }
    }

    #[test]
    fn f16_every_pattern_matches_half() {
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let bytes: Vec<u8> = all.iter().flat_map(|b| b.to_le_bytes()).collect();
        let mut loaded = vec![0f32; all.len()];
        load_f32(Dtype::F16, &bytes, &mut loaded);
        for (&b, &x) in all.iter().zip(&loaded) {
            assert_eq!(
                x.to_bits(),
                f16::from_bits(b).to_f32().to_bits(),
                "load {b:#06x}"
            );
        }
        let mut stored = Vec::new();
        store_f32(Dtype::F16, &loaded, &mut stored);
        for (i, pair) in stored.chunks_exact(2).enumerate() {
            let got = u16::from_le_bytes([pair[0], pair[1]]);
            let want = f16::from_f32(loaded[i]).to_bits();
            assert_eq!(got, want, "store {:#06x}", all[i]);
        }
    }

    #[test]
    fn store_counts_overflow() {
        let mut out = Vec::new();
        assert_eq!(
            store_f32(Dtype::F16, &[1.0, 70000.0, f32::NAN], &mut out),
            2
        );
        out.clear();
        assert_eq!(store_f32(Dtype::BF16, &[1.0, f32::MAX], &mut out), 1);
        out.clear();
        assert_eq!(store_f32(Dtype::F32, &[1.0, 2.0], &mut out), 0);
    }

    #[test]
    fn f64_load_is_exact() {
        let bytes: Vec<u8> = [1.5f32, -0.0, 3.25e-20]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let mut out = [0f64; 3];
        <f64 as Real>::load(Dtype::F32, &bytes, &mut out);
        assert_eq!(out, [1.5, -0.0, 3.25e-20f32 as f64]);
    }
}

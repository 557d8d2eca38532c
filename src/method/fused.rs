//! Fused kernels: one pass from the stored input bytes to the encoded output bytes.
//!
//! ```text
//! tile path:  bytes -> f32 tile (per input) -> kernel -> f32 tile -> encode -> bytes
//! fused path: bytes of every input, element i -> point(x_0[i], ..., x_{N-1}[i]) -> bytes
//! ```
//!
//! The tile path converts each input into an f32 scratch tile and makes one pass per
//! model. On a merge that reads from the page cache, those passes stall on memory: each
//! one streams one or two inputs at a time. The fused path reads every input in the same
//! loop, so all of them are in flight together, and writes nothing in between. On this
//! project's 2-core machine it roughly halved the time of a bf16 task arithmetic merge
//! (docs/BENCHMARKS.md).
//!
//! Invariant: a kernel's [`Pointwise::point`] performs exactly the f32 operations of its
//! tile kernel for one element, in the same order, so both paths give the same bits for
//! every finite output. The only difference is NaN payloads: the tile path quiets a
//! signaling NaN when it loads it, the fused path when the arithmetic touches it.
//! Non-finite outputs stop a merge unless `--allow-non-finite` is given, and Rust does not
//! specify NaN payloads of arithmetic anyway.
//!
//! The path covers inputs that all have one dtype, BF16 or F32, an output of BF16 or F32,
//! f32 arithmetic, 1 to [`MAX_INPUTS`] inputs, and data aligned to its element size
//! (always true for mapped safetensors files). Anything else runs through tiles.

use crate::convert::{f32_to_bf16_bits, TILE_ELEMS};
use crate::dtype::Dtype;

/// Most inputs a fused kernel reads: for example a base, three models with their Fishers
/// and a base Fisher.
pub const MAX_INPUTS: usize = 8;

/// One output element and the counters it adds.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Point {
    /// The value, before encoding.
    pub value: f32,
    /// Fisher inputs of this element that are negative, NaN or infinite.
    pub invalid_fisher: u32,
    /// 1 when a gradmatch precision of this element is <= 0 or NaN.
    pub nonpositive_precision: u32,
}

impl Point {
    /// Wraps a plain value with no counters.
    #[inline(always)]
    pub fn value(value: f32) -> Point {
        Point {
            value,
            invalid_fisher: 0,
            nonpositive_precision: 0,
        }
    }
}

/// An elementwise kernel that can run fused.
pub(crate) trait Pointwise: Sync {
    /// True when the kernel accepts `inputs` inputs (its layout's length).
    fn accepts(&self, inputs: usize) -> bool;

    /// Computes one element from the same element of each of the `N` inputs, in the
    /// kernel's input order. `N` is always a count that [`accepts`](Self::accepts) allowed.
    fn point<const N: usize>(&self, x: &[f32; N]) -> Point;
}

/// Counters of a fused run over one range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FusedCounts {
    /// Output values encoded as NaN or infinity.
    pub non_finite: u64,
    /// Fisher inputs that are negative, NaN or infinite.
    pub invalid_fisher: u64,
    /// Elements whose gradmatch precision is <= 0 or NaN.
    pub nonpositive_precision: u64,
}

/// True when [`run`] handles `inputs` inputs of `in_dtype` written as `out_dtype` (data
/// alignment aside).
pub(crate) fn supports<K: Pointwise>(
    kernel: &K,
    inputs: usize,
    in_dtype: Dtype,
    out_dtype: Dtype,
) -> bool {
    (1..=MAX_INPUTS).contains(&inputs)
        && kernel.accepts(inputs)
        && matches!(in_dtype, Dtype::BF16 | Dtype::F32)
        && matches!(out_dtype, Dtype::BF16 | Dtype::F32)
}

/// Computes every element of `inputs` (stored bytes, all of `in_dtype`, all of one
/// length) and appends the encoded output to `out`.
///
/// Returns `None`, with `out` untouched, when the combination is not supported or an
/// input is not aligned to its element size. The caller then uses the tile path.
pub(crate) fn run<K: Pointwise>(
    kernel: &K,
    inputs: &[&[u8]],
    in_dtype: Dtype,
    out_dtype: Dtype,
    out: &mut Vec<u8>,
) -> Option<FusedCounts> {
    if !supports(kernel, inputs.len(), in_dtype, out_dtype) {
        return None;
    }
    match inputs.len() {
        1 => by_count::<K, 1>(kernel, inputs, in_dtype, out_dtype, out),
        2 => by_count::<K, 2>(kernel, inputs, in_dtype, out_dtype, out),
        3 => by_count::<K, 3>(kernel, inputs, in_dtype, out_dtype, out),
        4 => by_count::<K, 4>(kernel, inputs, in_dtype, out_dtype, out),
        5 => by_count::<K, 5>(kernel, inputs, in_dtype, out_dtype, out),
        6 => by_count::<K, 6>(kernel, inputs, in_dtype, out_dtype, out),
        7 => by_count::<K, 7>(kernel, inputs, in_dtype, out_dtype, out),
        8 => by_count::<K, 8>(kernel, inputs, in_dtype, out_dtype, out),
        _ => None,
    }
}

fn by_count<K: Pointwise, const N: usize>(
    kernel: &K,
    inputs: &[&[u8]],
    in_dtype: Dtype,
    out_dtype: Dtype,
    out: &mut Vec<u8>,
) -> Option<FusedCounts> {
    let bytes: [&[u8]; N] = inputs.try_into().ok()?;
    match (in_dtype, out_dtype) {
        (Dtype::BF16, Dtype::BF16) => typed::<K, N, Bf16, Bf16>(kernel, bytes, out),
        (Dtype::BF16, Dtype::F32) => typed::<K, N, Bf16, F32>(kernel, bytes, out),
        (Dtype::F32, Dtype::BF16) => typed::<K, N, F32, Bf16>(kernel, bytes, out),
        (Dtype::F32, Dtype::F32) => typed::<K, N, F32, F32>(kernel, bytes, out),
        _ => None,
    }
}

/// Views the inputs as their element type and runs the loop, compiled for AVX2 when the
/// CPU has it.
fn typed<K: Pointwise, const N: usize, I: Stored, O: Encoded>(
    kernel: &K,
    bytes: [&[u8]; N],
    out: &mut Vec<u8>,
) -> Option<FusedCounts> {
    let len = bytes[0].len() / std::mem::size_of::<I::Raw>();
    let mut values: [&[I::Raw]; N] = [&[]; N];
    for (v, b) in values.iter_mut().zip(bytes) {
        *v = bytemuck::try_cast_slice(b).ok()?;
        if v.len() != len {
            return None;
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked on the line above.
            return Some(unsafe { fused_avx2::<K, N, I, O>(kernel, values, out) });
        }
    }
    Some(fused_loop::<K, N, I, O>(kernel, values, out))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn fused_avx2<K: Pointwise, const N: usize, I: Stored, O: Encoded>(
    kernel: &K,
    inputs: [&[I::Raw]; N],
    out: &mut Vec<u8>,
) -> FusedCounts {
    fused_loop::<K, N, I, O>(kernel, inputs, out)
}

/// Computes a tile of output elements at a time into a stack buffer and appends it with
/// one copy. Counters are summed per tile in u32 lanes, which vectorise.
#[inline(always)]
fn fused_loop<K: Pointwise, const N: usize, I: Stored, O: Encoded>(
    kernel: &K,
    inputs: [&[I::Raw]; N],
    out: &mut Vec<u8>,
) -> FusedCounts {
    let len = inputs[0].len();
    let mut counts = FusedCounts::default();
    let size = std::mem::size_of::<O::Raw>();
    out.reserve(len * size);
    let mut start = 0;
    while start < len {
        let n = TILE_ELEMS.min(len - start);
        let xs: [&[I::Raw]; N] = std::array::from_fn(|j| &inputs[j][start..start + n]);
        let (mut non_finite, mut invalid, mut nonpositive) = (0u32, 0u32, 0u32);
        let dst = out.spare_capacity_mut()[..n * size]
            .as_mut_ptr()
            .cast::<O::Raw>();
        // `i` indexes every input and the output pointer at once.
        #[allow(clippy::needless_range_loop)]
        for i in 0..n {
            let x: [f32; N] = std::array::from_fn(|j| I::to_f32(xs[j][i]));
            let p = kernel.point::<N>(&x);
            let (raw, bad) = O::encode(p.value);
            // SAFETY: `dst` points at n * size bytes of spare capacity (sliced above), and
            // element i < n lies inside it. The write is unaligned because a Vec<u8>
            // promises no alignment.
            unsafe { dst.add(i).write_unaligned(raw) };
            non_finite += bad;
            invalid += p.invalid_fisher;
            nonpositive += p.nonpositive_precision;
        }
        // SAFETY: the loop above initialised all n * size bytes after the old length, and
        // they are within the capacity reserved before the loop.
        unsafe { out.set_len(out.len() + n * size) };
        counts.non_finite += u64::from(non_finite);
        counts.invalid_fisher += u64::from(invalid);
        counts.nonpositive_precision += u64::from(nonpositive);
        start += n;
    }
    counts
}

/// A stored input element type.
trait Stored {
    /// The little-endian storage unit.
    type Raw: bytemuck::Pod;
    /// Decodes one element exactly (a signaling NaN stays signaling).
    fn to_f32(raw: Self::Raw) -> f32;
}

/// An output element type.
trait Encoded {
    /// The little-endian storage unit.
    type Raw: bytemuck::Pod;
    /// Encodes one value as [`crate::convert`]'s store does, and returns 1 when the
    /// encoded value is NaN or infinite.
    fn encode(x: f32) -> (Self::Raw, u32);
}

struct Bf16;
struct F32;

impl Stored for Bf16 {
    type Raw = u16;
    #[inline(always)]
    fn to_f32(raw: u16) -> f32 {
        f32::from_bits(u32::from(u16::from_le(raw)) << 16)
    }
}

impl Stored for F32 {
    type Raw = u32;
    #[inline(always)]
    fn to_f32(raw: u32) -> f32 {
        f32::from_bits(u32::from_le(raw))
    }
}

impl Encoded for Bf16 {
    type Raw = u16;
    #[inline(always)]
    fn encode(x: f32) -> (u16, u32) {
        let b = f32_to_bf16_bits(x);
        (b.to_le(), ((b & 0x7F80) == 0x7F80) as u32)
    }
}

impl Encoded for F32 {
    type Raw = u32;
    #[inline(always)]
    fn encode(x: f32) -> (u32, u32) {
        (x.to_bits().to_le(), (!x.is_finite()) as u32)
    }
}

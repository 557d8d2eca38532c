//! Borrowed access to the input tensors of one output tensor, tile by tile.

use std::borrow::Cow;
use std::ops::Range;

use rayon::prelude::*;

use crate::convert::{Real, TILE_ELEMS};
use crate::dtype::Dtype;
use crate::error::Result;
use crate::format::TensorInfo;
use crate::source::Source;

/// Elements per block of a reduction pass. Fixed, so that sums are grouped the same way
/// whatever the chunk size and thread count.
pub const REDUCE_BLOCK_ELEMS: u64 = 1 << 16;

/// Blocks read by one task of a reduction pass before their pages are released: 4 Mi
/// elements. Releasing (`MADV_DONTNEED`) interrupts the other cores to flush their TLBs,
/// so releasing every block cost 15% of a TIES merge. The grouping does not change how
/// sums are blocked.
const RELEASE_GROUP_BLOCKS: u64 = 64;

/// One input tensor: a validated header entry and the file it lives in, optionally
/// followed by the rows of another tensor.
///
/// With a `tail`, elements from `tail.start_elems` on are read from the tail tensor at the
/// same element offsets. This fills the rows a model lacks (a smaller vocabulary) from a
/// model that has them.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    /// The file.
    pub source: &'a Source,
    /// The header entry.
    pub info: &'a TensorInfo,
    /// The source of the elements past the end of this tensor.
    pub tail: Option<Tail<'a>>,
}

/// The tensor that supplies the elements after the end of a shorter one.
///
/// Invariant: same dtype as the view it extends, and at least as many elements as the
/// output tensor.
#[derive(Clone, Copy, Debug)]
pub struct Tail<'a> {
    /// First element read from the tail.
    pub start_elems: u64,
    /// The tail tensor's file.
    pub source: &'a Source,
    /// The tail tensor's header entry.
    pub info: &'a TensorInfo,
}

impl<'a> TensorView<'a> {
    /// Returns a view of one whole tensor.
    pub fn new(source: &'a Source, info: &'a TensorInfo) -> TensorView<'a> {
        TensorView {
            source,
            info,
            tail: None,
        }
    }

    /// Element type.
    pub fn dtype(&self) -> Dtype {
        self.info.dtype
    }

    /// Reads elements `range` as raw bytes.
    pub fn bytes(&self, range: &Range<u64>) -> Result<Cow<'a, [u8]>> {
        let size = self.info.dtype.size_bytes() as u64;
        let bytes_of = |r: &Range<u64>| r.start * size..r.end * size;
        let Some(tail) = self.tail.filter(|t| range.end > t.start_elems) else {
            return self.source.bytes(self.info, bytes_of(range));
        };
        if range.start >= tail.start_elems {
            return tail.source.bytes(tail.info, bytes_of(range));
        }

        // The range spans the end of this tensor: join both parts.
        let head = self
            .source
            .bytes(self.info, bytes_of(&(range.start..tail.start_elems)))?;
        let rest = tail
            .source
            .bytes(tail.info, bytes_of(&(tail.start_elems..range.end)))?;
        let mut joined = Vec::with_capacity(head.len() + rest.len());
        joined.extend_from_slice(&head);
        joined.extend_from_slice(&rest);
        Ok(Cow::Owned(joined))
    }

    /// Releases the pages of elements `range` (see [`Source::release`]).
    pub fn release(&self, range: &Range<u64>) {
        let size = self.info.dtype.size_bytes() as u64;
        let own_end = self
            .tail
            .map_or(range.end, |t| range.end.min(t.start_elems));
        if range.start < own_end {
            self.source
                .release(self.info, range.start * size..own_end * size);
        }
        if let Some(t) = self.tail.filter(|t| range.end > t.start_elems) {
            let start = range.start.max(t.start_elems);
            t.source.release(t.info, start * size..range.end * size);
        }
    }
}

/// The inputs of one output tensor, all with `elems` elements.
///
/// Invariant: every view has exactly `elems` elements and a mergeable float dtype.
#[derive(Clone, Debug)]
pub struct TensorInputs<'a> {
    /// Output tensor name.
    pub name: &'a str,
    /// Elements per tensor.
    pub elems: u64,
    /// Shape of every input.
    pub shape: &'a [u64],
    /// The inputs in the method's order.
    pub views: Vec<TensorView<'a>>,
}

/// Converted values of a run of elements for every input, tile by tile.
pub struct TileReader<A: Real> {
    scratch: Vec<Vec<A>>,
}

impl<A: Real> TileReader<A> {
    /// Creates scratch buffers for `inputs` inputs: one tile each.
    pub fn new(inputs: usize) -> TileReader<A> {
        TileReader {
            scratch: (0..inputs).map(|_| vec![A::ZERO; TILE_ELEMS]).collect(),
        }
    }

    /// Reads elements `range` of every view and calls `f(tile_start, tiles)` once per tile
    /// of at most [`TILE_ELEMS`] elements, in order. Releases the pages afterwards.
    pub fn for_each_tile(
        &mut self,
        views: &[TensorView<'_>],
        range: Range<u64>,
        f: impl FnMut(u64, &[&[A]]),
    ) -> Result<()> {
        self.read_tiles(views, range.clone(), f)?;
        release_all(views, &range);
        Ok(())
    }

    /// Like [`for_each_tile`](Self::for_each_tile), but leaves the pages resident; the
    /// caller releases them, for example once per group of blocks.
    pub fn read_tiles(
        &mut self,
        views: &[TensorView<'_>],
        range: Range<u64>,
        f: impl FnMut(u64, &[&[A]]),
    ) -> Result<()> {
        let raw = read_all(views, &range)?;
        self.convert_tiles(views, &raw, range.start, f);
        Ok(())
    }

    /// Converts bytes that [`read_all`] returned for a range starting at element `start`
    /// and calls `f(tile_start, tiles)` once per tile, in order.
    pub fn convert_tiles(
        &mut self,
        views: &[TensorView<'_>],
        raw: &[Cow<'_, [u8]>],
        start: u64,
        mut f: impl FnMut(u64, &[&[A]]),
    ) {
        let total = raw
            .first()
            .zip(views.first())
            .map_or(0, |(bytes, view)| bytes.len() / view.dtype().size_bytes());
        let mut offset = 0usize;
        while offset < total {
            let len = TILE_ELEMS.min(total - offset);
            for ((buf, bytes), view) in self.scratch.iter_mut().zip(raw).zip(views) {
                let size = view.dtype().size_bytes();
                A::load(
                    view.dtype(),
                    &bytes[offset * size..(offset + len) * size],
                    &mut buf[..len],
                );
            }
            let refs: Vec<&[A]> = self.scratch.iter().map(|b| &b[..len]).collect();
            f(start + offset as u64, &refs);
            offset += len;
        }
    }
}

/// Reads elements `range` of every view as raw bytes (borrowed from the mapping in mmap
/// mode).
pub fn read_all<'a>(views: &[TensorView<'a>], range: &Range<u64>) -> Result<Vec<Cow<'a, [u8]>>> {
    views.iter().map(|v| v.bytes(range)).collect()
}

/// Releases the pages of elements `range` of every view (see [`Source::release`]).
pub fn release_all(views: &[TensorView<'_>], range: &Range<u64>) {
    for v in views {
        v.release(range);
    }
}

impl<'a> TensorInputs<'a> {
    /// Number of fixed reduction blocks.
    pub fn block_count(&self) -> u64 {
        self.elems.div_ceil(REDUCE_BLOCK_ELEMS)
    }

    fn block_range(&self, block: u64) -> Range<u64> {
        let start = block * REDUCE_BLOCK_ELEMS;
        start..(start + REDUCE_BLOCK_ELEMS).min(self.elems)
    }

    /// Runs `f` over every fixed block in parallel and returns the results in block order.
    ///
    /// `f(state, tile_start, tiles)` is called for each tile of a block, in order, with
    /// `init()` as the block's starting state. Results depend only on the data.
    pub fn map_blocks<A: Real, R: Send>(
        &self,
        init: impl Fn() -> R + Sync,
        f: impl Fn(&mut R, u64, &[&[A]]) + Sync,
    ) -> Result<Vec<R>> {
        let groups: Vec<Vec<R>> = (0..self.group_count())
            .into_par_iter()
            .map_init(
                || TileReader::<A>::new(self.views.len()),
                |reader, group| {
                    let mut states = Vec::with_capacity(RELEASE_GROUP_BLOCKS as usize);
                    for block in self.group_blocks(group) {
                        let mut state = init();
                        reader.read_tiles(
                            &self.views,
                            self.block_range(block),
                            |start, tiles| f(&mut state, start, tiles),
                        )?;
                        states.push(state);
                    }
                    release_all(&self.views, &self.group_range(group));
                    Ok(states)
                },
            )
            .collect::<Result<_>>()?;
        Ok(groups.into_iter().flatten().collect())
    }

    /// Like [`map_blocks`](Self::map_blocks) for states that combine in any order (integer
    /// counts): folds blocks per thread and merges the partial states with `merge`.
    pub fn fold_blocks<A: Real, R: Send>(
        &self,
        init: impl Fn() -> R + Sync + Send,
        f: impl Fn(&mut R, u64, &[&[A]]) + Sync + Send,
        merge: impl Fn(R, R) -> R + Sync + Send,
    ) -> Result<R> {
        (0..self.group_count())
            .into_par_iter()
            .fold(
                || (TileReader::<A>::new(self.views.len()), Ok(init())),
                |(mut reader, acc), group| {
                    let acc = acc.and_then(|mut state| {
                        for block in self.group_blocks(group) {
                            reader.read_tiles(
                                &self.views,
                                self.block_range(block),
                                |start, tiles| f(&mut state, start, tiles),
                            )?;
                        }
                        release_all(&self.views, &self.group_range(group));
                        Ok(state)
                    });
                    (reader, acc)
                },
            )
            .map(|(_, acc)| acc)
            .try_reduce(&init, |a, b| Ok(merge(a, b)))
    }

    /// Number of groups of blocks whose pages are released together.
    fn group_count(&self) -> u64 {
        self.block_count().div_ceil(RELEASE_GROUP_BLOCKS)
    }

    fn group_blocks(&self, group: u64) -> Range<u64> {
        let first = group * RELEASE_GROUP_BLOCKS;
        first..(first + RELEASE_GROUP_BLOCKS).min(self.block_count())
    }

    fn group_range(&self, group: u64) -> Range<u64> {
        let blocks = self.group_blocks(group);
        blocks.start * REDUCE_BLOCK_ELEMS..(blocks.end * REDUCE_BLOCK_ELEMS).min(self.elems)
    }
}

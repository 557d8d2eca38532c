//! The engine: runs a [`Plan`] tensor by tensor, computing chunks on a rayon pool and
//! streaming them to the writer thread.
//!
//! ```text
//! for each output tensor, in plan order:
//!     kernel = method.prepare(tensor)           reductions over the mapped inputs
//!     for each batch of `batch_chunks` chunks:
//!         compute the chunks in parallel          the kernel's fused loop, else tiles:
//!                                                 load -> kernel -> store
//!         send the buffers to the writer in order (bounded channel)
//!     check the tensor's counters (NaN, Fisher values, precision)
//! ```
//!
//! Memory: at most `batch_chunks + channel_depth` chunk buffers exist at once, plus the
//! mapped input pages of the chunks being computed, which are released after each chunk.
//! Chunk boundaries never change a result: kernels are elementwise and reductions use a
//! fixed blocking.

use std::borrow::Cow;
use std::ops::Range;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use rayon::prelude::*;

use crate::convert::{Real, TILE_ELEMS};
use crate::error::{Error, Result};
use crate::method::{KernelStats, Method, TensorKernel};
use crate::params::{layer_index, LayerPosition};
use crate::plan::{lookup, Action, MergeInputs, Plan};
use crate::view::{read_all, release_all, TensorInputs, TileReader};
use crate::writer::{spawn_writer, OutputDir};

/// Default memory budget for chunk buffers and mapped input pages: 256 MiB.
pub const DEFAULT_BUDGET_BYTES: u64 = 256 << 20;
/// Largest chunk, in elements, whatever the budget.
pub const MAX_CHUNK_ELEMS: u64 = 4 << 20;

/// Working precision of the kernels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// f32 arithmetic (the default).
    #[default]
    F32,
    /// f64 arithmetic, for users who want the last bit of an f32 output right.
    F64,
}

/// Tunables of the engine.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Worker threads; 0 uses one per core.
    pub threads: usize,
    /// Memory budget in bytes for chunk buffers and mapped pages in flight.
    pub budget_bytes: u64,
    /// Chunk size in elements; `None` derives it from the budget.
    pub chunk_elems: Option<u64>,
    /// Capacity of the writer channel in chunks; `None` derives it from the threads.
    pub channel_depth: Option<usize>,
    /// Working precision.
    pub precision: Precision,
    /// Write NaN and overflowed values instead of stopping.
    pub allow_non_finite: bool,
    /// Compute the L2 norm of every task vector for the report (one extra read pass).
    pub task_vector_norms: bool,
    /// Use a kernel's fused path (stored bytes straight to output bytes) where it has one.
    /// Off, every kernel runs on converted f32 tiles; the output bytes are the same.
    pub fused: bool,
}

impl Default for EngineOptions {
    fn default() -> EngineOptions {
        EngineOptions {
            threads: 0,
            budget_bytes: DEFAULT_BUDGET_BYTES,
            chunk_elems: None,
            channel_depth: None,
            precision: Precision::F32,
            allow_non_finite: false,
            task_vector_norms: false,
            fused: true,
        }
    }
}

/// Per-tensor figures for reports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TensorReport {
    /// Tensor name.
    pub name: String,
    /// Merge or copy.
    pub merged: bool,
    /// Kernel counters summed over the tensor.
    pub stats: KernelStats,
    /// Elements written as NaN or infinity (only with `allow_non_finite`).
    pub non_finite: u64,
    /// L2 norm of each model's task vector (θt − θ0), when requested and a base is used.
    pub task_vector_norms: Vec<f64>,
}

/// Totals of a finished merge.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// Output tensors written.
    pub tensors: usize,
    /// Input tensor bytes read by the elementwise passes and copies.
    pub bytes_read: u64,
    /// Output bytes, headers included.
    pub bytes_written: u64,
    /// Wall time of the data passes.
    pub elapsed: Duration,
    /// Chunk size used, in elements.
    pub chunk_elems: u64,
    /// Threads used.
    pub threads: usize,
    /// Per-tensor figures.
    pub per_tensor: Vec<TensorReport>,
}

/// Progress callback: (tensors done, output bytes done).
pub type Progress<'a> = &'a (dyn Fn(usize, u64) + Sync);

/// The destination of the merged shards.
pub enum Output<'a> {
    /// Into this prepared folder.
    Folder(&'a OutputDir),
    /// Nowhere: compute everything, write nothing (for benchmarks).
    Sink,
}

/// Runs the plan.
///
/// # Errors
/// Any read or write error; [`Error::NonFinite`], [`Error::NonPositivePrecision`] or
/// [`Error::Mismatch`] (invalid Fisher values, non-float tensors that differ) naming the
/// tensor; [`Error::Interrupted`] after [`crate::interrupt::request`].
pub fn run(
    plan: &Plan,
    inputs: &MergeInputs,
    method: &Method,
    options: &EngineOptions,
    output: Output<'_>,
    progress: Option<Progress<'_>>,
) -> Result<Summary> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(options.threads)
        .thread_name(|i| format!("gradmerge-worker-{i}"))
        .build()
        .map_err(|e| {
            Error::InvalidParameter(format!(
                "cannot start {} worker threads: {e}",
                options.threads
            ))
        })?;
    let threads = pool.current_num_threads();
    let mut engine = Engine::new(plan, inputs, method, options, threads);
    log::info!(
        "{threads} threads, chunks of {} elements, {} chunks per batch, writer channel of {}",
        engine.chunk_elems,
        engine.batch_chunks,
        engine.depth
    );

    let folder = match output {
        Output::Folder(dir) => Some(dir.temp_path().to_path_buf()),
        Output::Sink => None,
    };
    let (data_tx, data_rx) = bounded::<Vec<u8>>(engine.depth);
    let (recycle_tx, recycle_rx) = bounded::<Vec<u8>>(engine.depth + engine.batch_chunks);
    let writer = spawn_writer(folder.clone(), plan.shards.clone(), data_rx, recycle_tx);
    engine.recycle = Some(recycle_rx);

    let started = Instant::now();
    let result = pool.install(|| engine.run_all(&data_tx, progress));
    drop(data_tx);
    let written = writer.join().unwrap_or_else(|_| {
        Err(Error::Io {
            op: "write",
            path: folder.clone().unwrap_or_default(),
            source: std::io::Error::other("the writer thread panicked"),
        })
    });
    // A writer error explains a failed send, so it takes precedence.
    let written = written?;
    let mut summary = result?;
    if let (Some(folder), Some(index)) = (&folder, &plan.index) {
        let path = folder.join(crate::checkpoint::INDEX_FILE);
        write_synced(&path, index)?;
    }
    summary.bytes_written = written.bytes + plan.index.as_ref().map_or(0, |i| i.len() as u64);
    summary.elapsed = started.elapsed();
    summary.threads = threads;
    Ok(summary)
}

fn write_synced(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| Error::io("create", path, e))?;
    f.write_all(bytes)
        .map_err(|e| Error::io("write", path, e))?;
    f.sync_all().map_err(|e| Error::io("sync", path, e))
}

struct Engine<'a> {
    plan: &'a Plan,
    inputs: &'a MergeInputs,
    method: &'a Method,
    options: &'a EngineOptions,
    chunk_elems: u64,
    batch_chunks: usize,
    depth: usize,
    num_layers: u64,
    recycle: Option<Receiver<Vec<u8>>>,
}

impl<'a> Engine<'a> {
    fn new(
        plan: &'a Plan,
        inputs: &'a MergeInputs,
        method: &'a Method,
        options: &'a EngineOptions,
        threads: usize,
    ) -> Engine<'a> {
        let batch_chunks = (threads * 2).max(1);
        let depth = options.channel_depth.unwrap_or(threads * 2).max(1);

        // Bytes per element in flight: every input's bytes plus the output's.
        let per_elem = (0..plan.tensors.len())
            .filter(|&i| plan.tensors[i].action == Action::Merge)
            .map(|i| {
                let views = plan.tensor_inputs(inputs, i).views;
                let read: usize = views.iter().map(|v| v.dtype().size_bytes()).sum();
                (read + plan.tensors[i].dtype.size_bytes()) as u64
            })
            .max()
            .unwrap_or(8)
            .max(1);
        let in_flight = (batch_chunks + depth) as u64;
        let derived = (options.budget_bytes / (in_flight * per_elem))
            .clamp(TILE_ELEMS as u64, MAX_CHUNK_ELEMS);
        let chunk_elems = options.chunk_elems.unwrap_or(derived).max(1);
        let in_flight_bytes = chunk_elems.saturating_mul(in_flight * per_elem);
        if options.chunk_elems.is_some() && in_flight_bytes > options.budget_bytes {
            log::warn!(
                "chunks of {chunk_elems} elements can keep up to {} MiB in flight, more than the {} MiB budget; memory follows --chunk-elems",
                in_flight_bytes >> 20,
                options.budget_bytes >> 20
            );
        }
        let num_layers = plan.num_layers();
        Engine {
            plan,
            inputs,
            method,
            options,
            chunk_elems,
            batch_chunks,
            depth,
            num_layers,
            recycle: None,
        }
    }

    fn run_all(&self, data: &Sender<Vec<u8>>, progress: Option<Progress<'_>>) -> Result<Summary> {
        let mut summary = Summary {
            chunk_elems: self.chunk_elems,
            ..Summary::default()
        };
        let mut done_bytes = 0u64;
        for (i, t) in self.plan.tensors.iter().enumerate() {
            let report = match t.action {
                Action::Merge => self.merge_tensor(i, data, &mut summary)?,
                Action::Copy => self.copy_tensor(i, data, &mut summary)?,
            };
            summary.per_tensor.push(report);
            summary.tensors += 1;
            done_bytes += t.size_bytes();
            if let Some(p) = progress {
                p(i + 1, done_bytes);
            }
        }
        Ok(summary)
    }

    fn chunks(&self, elems: u64) -> Vec<Range<u64>> {
        let step = self.chunk_elems;
        (0..elems.div_ceil(step))
            .map(|c| c * step..((c + 1) * step).min(elems))
            .collect()
    }

    fn buffer(&self, capacity: usize) -> Vec<u8> {
        let mut buf = self
            .recycle
            .as_ref()
            .and_then(|r| r.try_recv().ok())
            .unwrap_or_default();
        buf.clear();
        buf.reserve(capacity);
        buf
    }

    fn send_all(&self, data: &Sender<Vec<u8>>, buffers: Vec<Vec<u8>>) -> Result<()> {
        for buf in buffers {
            if data.send(buf).is_err() {
                // The writer stopped; its own error is reported by `run`.
                return Err(Error::Io {
                    op: "write",
                    path: Default::default(),
                    source: std::io::Error::other("the writer stopped"),
                });
            }
        }
        Ok(())
    }

    fn check_interrupt(&self) -> Result<()> {
        if crate::interrupt::is_requested() {
            Err(Error::Interrupted)
        } else {
            Ok(())
        }
    }

    fn merge_tensor(
        &self,
        i: usize,
        data: &Sender<Vec<u8>>,
        summary: &mut Summary,
    ) -> Result<TensorReport> {
        let t = &self.plan.tensors[i];
        let inputs = self.plan.tensor_inputs(self.inputs, i);
        let position = LayerPosition {
            layer: layer_index(&t.name),
            num_layers: self.num_layers,
        };
        let layout = self.inputs.layout(self.method.kind);
        let kernel = self.method.prepare(layout, &inputs, position)?;
        log::debug!(
            "`{}`: {} elements, {} inputs, {} chunks",
            t.name,
            t.elems(),
            inputs.views.len(),
            t.elems().div_ceil(self.chunk_elems)
        );

        let mut report = TensorReport {
            name: t.name.clone(),
            merged: true,
            ..TensorReport::default()
        };
        if self.options.task_vector_norms && layout.has_base {
            report.task_vector_norms = task_vector_norms(&inputs, layout)?;
        }
        let chunks = self.chunks(t.elems());
        for batch in chunks.chunks(self.batch_chunks) {
            self.check_interrupt()?;
            let results: Vec<(Vec<u8>, KernelStats, u64)> = batch
                .par_iter()
                .map(|range| self.compute_chunk(&inputs, kernel.as_ref(), t.dtype, range.clone()))
                .collect::<Result<_>>()?;
            let mut buffers = Vec::with_capacity(results.len());
            for (buf, stats, non_finite) in results {
                report.stats.add(&stats);
                report.non_finite += non_finite;
                buffers.push(buf);
            }
            self.check_counters(&t.name, &report, &inputs)?;
            self.send_all(data, buffers)?;
        }
        summary.bytes_read += inputs
            .views
            .iter()
            .map(|v| v.info.size_bytes())
            .sum::<u64>();
        Ok(report)
    }

    /// Stops on invalid Fisher values, non-positive precision and non-finite output.
    fn check_counters(
        &self,
        name: &str,
        report: &TensorReport,
        inputs: &TensorInputs<'_>,
    ) -> Result<()> {
        let s = &report.stats;
        if s.invalid_fisher > 0 {
            let layout = self.inputs.layout(self.method.kind);
            let first = if layout.has_fishers {
                layout.fisher(0)
            } else {
                0
            };
            let fishers = &inputs.views[first..];
            let location = match first_invalid_fisher(fishers, inputs.elems)? {
                Some((view, index, value)) => format!(
                    "the first is {value} at element {index} of {}",
                    fishers[view].source.path().display()
                ),
                None => "they were not found again on a second read; is a file changing?".into(),
            };
            return Err(Error::Mismatch(format!(
                "tensor `{name}`: {} Fisher {} negative, NaN or infinite; {location}. Fisher estimates must be finite and >= 0: fix or regenerate that Fisher file",
                s.invalid_fisher,
                crate::units::plural(s.invalid_fisher, "value is", "values are"),
            )));
        }
        if s.non_finite_inputs > 0 && !self.options.allow_non_finite {
            let files: Vec<String> = inputs
                .views
                .iter()
                .map(|v| v.source.path().display().to_string())
                .collect();
            return Err(Error::Mismatch(format!(
                "tensor `{name}`: {} task-vector {} NaN or infinite, because the base or a model holds NaN or infinity there (inputs: {}); {} would drop such values without a trace. Fix the checkpoint, or pass --allow-non-finite to merge anyway",
                s.non_finite_inputs,
                crate::units::plural(s.non_finite_inputs, "value is", "values are"),
                files.join(", "),
                self.method.kind
            )));
        }
        if s.nonpositive_precision > 0 {
            return Err(Error::NonPositivePrecision {
                tensor: name.to_string(),
                count: s.nonpositive_precision,
            });
        }
        if report.non_finite > 0 && !self.options.allow_non_finite {
            // An input that contains NaN or infinity is the usual cause, so name it.
            if let Some((view, index, value)) =
                first_value(&inputs.views, inputs.elems, |x| !x.is_finite())?
            {
                return Err(Error::Mismatch(format!(
                    "tensor `{name}`: {} merged {} NaN or infinite, because {} contains {value} at element {index}; fix that checkpoint, or pass --allow-non-finite to write such values",
                    report.non_finite,
                    crate::units::plural(report.non_finite, "value is", "values are"),
                    inputs.views[view].source.path().display()
                )));
            }
            let dtype = self
                .plan
                .tensors
                .iter()
                .find(|t| t.name == name)
                .map(|t| t.dtype)
                .unwrap_or(crate::dtype::Dtype::F32);
            return Err(Error::NonFinite {
                tensor: name.to_string(),
                count: report.non_finite,
                dtype,
            });
        }
        Ok(())
    }

    fn compute_chunk(
        &self,
        inputs: &TensorInputs<'_>,
        kernel: &dyn TensorKernel,
        dtype: crate::dtype::Dtype,
        range: Range<u64>,
    ) -> Result<(Vec<u8>, KernelStats, u64)> {
        let mut out = self.buffer(((range.end - range.start) as usize) * dtype.size_bytes());
        let mut stats = KernelStats::default();
        let raw = read_all(&inputs.views, &range)?;
        let start = range.start;
        let non_finite = match self.options.precision {
            Precision::F32 => match self.fused(inputs, kernel, dtype, &raw, &mut out) {
                Some(counts) => {
                    stats.invalid_fisher += counts.invalid_fisher;
                    stats.nonpositive_precision += counts.nonpositive_precision;
                    counts.non_finite
                }
                None => run_tiles::<f32>(
                    inputs,
                    &raw,
                    start,
                    &mut out,
                    &mut stats,
                    dtype,
                    |s, i, o, st| kernel.apply_f32(s, i, o, st),
                ),
            },
            Precision::F64 => run_tiles::<f64>(
                inputs,
                &raw,
                start,
                &mut out,
                &mut stats,
                dtype,
                |s, i, o, st| kernel.apply_f64(s, i, o, st),
            ),
        };
        drop(raw);
        release_all(&inputs.views, &range);
        Ok((out, stats, non_finite))
    }

    /// Runs the kernel's fused path on the chunk when the options, the kernel and the
    /// inputs allow it, which needs one stored dtype for every input. Returns `None`
    /// otherwise.
    fn fused(
        &self,
        inputs: &TensorInputs<'_>,
        kernel: &dyn TensorKernel,
        dtype: crate::dtype::Dtype,
        raw: &[Cow<'_, [u8]>],
        out: &mut Vec<u8>,
    ) -> Option<crate::method::fused::FusedCounts> {
        let in_dtype = inputs.views.first()?.dtype();
        let uniform = inputs.views.iter().all(|v| v.dtype() == in_dtype);
        if !self.options.fused
            || !uniform
            || !kernel.has_stored_path(inputs.views.len(), in_dtype, dtype)
        {
            return None;
        }
        let slices: Vec<&[u8]> = raw.iter().map(|b| b.as_ref()).collect();
        kernel.apply_stored(&slices, in_dtype, dtype, out)
    }

    fn copy_tensor(
        &self,
        i: usize,
        data: &Sender<Vec<u8>>,
        summary: &mut Summary,
    ) -> Result<TensorReport> {
        let t = &self.plan.tensors[i];
        let reference = lookup(self.inputs.reference(), &t.name).expect("validated by Plan::build");
        let others: Vec<_> = self
            .inputs
            .models
            .iter()
            .chain(self.inputs.base.iter())
            .map(|c| (c, lookup(c, &t.name).expect("validated by Plan::build")))
            .collect();
        let size = t.dtype.size_bytes() as u64;
        for batch in self.chunks(t.elems()).chunks(self.batch_chunks) {
            self.check_interrupt()?;
            let mut buffers = Vec::with_capacity(batch.len());
            for range in batch {
                let bytes: Cow<'_, [u8]> = reference.bytes(range)?;
                for (ckpt, view) in &others {
                    if view.bytes(range)?.as_ref() != bytes.as_ref() {
                        return Err(Error::Mismatch(format!(
                            "non-float tensor `{}` ({}) differs between {} and {}; integer and bool tensors are copied, so every model must hold the same values",
                            t.name,
                            t.dtype,
                            self.inputs.reference().path().display(),
                            ckpt.path().display()
                        )));
                    }
                }
                let mut buf = self.buffer(((range.end - range.start) * size) as usize);
                buf.extend_from_slice(&bytes);
                buffers.push(buf);
            }
            self.send_all(data, buffers)?;
        }
        summary.bytes_read += t.size_bytes() * (1 + others.len() as u64);
        Ok(TensorReport {
            name: t.name.clone(),
            merged: false,
            ..TensorReport::default()
        })
    }
}

/// Converts the bytes `raw` of a range starting at element `start` tile by tile, runs the
/// kernel and appends the encoded output to `out`. Returns the number of non-finite output
/// values.
fn run_tiles<A: Real>(
    inputs: &TensorInputs<'_>,
    raw: &[Cow<'_, [u8]>],
    start: u64,
    out: &mut Vec<u8>,
    stats: &mut KernelStats,
    dtype: crate::dtype::Dtype,
    apply: impl Fn(u64, &[&[A]], &mut [A], &mut KernelStats),
) -> u64 {
    let mut reader = TileReader::<A>::new(inputs.views.len());
    let mut result = [A::ZERO; TILE_ELEMS];
    let mut non_finite = 0u64;
    reader.convert_tiles(&inputs.views, raw, start, |tile_start, tiles| {
        let len = tiles.first().map_or(0, |t| t.len());
        let r = &mut result[..len];
        apply(tile_start, tiles, r, stats);
        non_finite += A::store(dtype, r, out);
    });
    non_finite
}

/// Finds the first Fisher value that is negative, NaN or infinite: (position in `views`,
/// element index, value).
fn first_invalid_fisher(
    views: &[crate::view::TensorView<'_>],
    elems: u64,
) -> Result<Option<(usize, u64, f32)>> {
    first_value(views, elems, |f| !(f >= 0.0 && f.is_finite()))
}

/// Finds the first value for which `bad` holds: (position in `views`, element index,
/// value). Reads each view again in blocks, on the error path only.
fn first_value(
    views: &[crate::view::TensorView<'_>],
    elems: u64,
    bad: impl Fn(f32) -> bool,
) -> Result<Option<(usize, u64, f32)>> {
    const STEP: u64 = 1 << 20;
    for (i, view) in views.iter().enumerate() {
        let mut reader = TileReader::<f32>::new(1);
        let mut start = 0;
        while start < elems {
            let range = start..(start + STEP).min(elems);
            let mut found = None;
            reader.for_each_tile(std::slice::from_ref(view), range, |tile_start, tiles| {
                if found.is_none() {
                    found = tiles[0]
                        .iter()
                        .position(|&f| bad(f))
                        .map(|j| (tile_start + j as u64, tiles[0][j]));
                }
            })?;
            if let Some((index, value)) = found {
                return Ok(Some((i, index, value)));
            }
            start += STEP;
        }
    }
    Ok(None)
}

/// L2 norm of each model's task vector over one tensor, in f64 with fixed blocking.
fn task_vector_norms(inputs: &TensorInputs<'_>, layout: crate::method::Layout) -> Result<Vec<f64>> {
    let blocks = inputs.map_blocks::<f32, Vec<f64>>(
        || vec![0.0; layout.models],
        |sums, _, tiles| {
            let base = tiles[layout.base()];
            for (m, sum) in sums.iter_mut().enumerate() {
                for (&x, &b) in tiles[layout.model(m)].iter().zip(base) {
                    let tau = (x - b) as f64;
                    *sum += tau * tau;
                }
            }
        },
    )?;
    let mut totals = vec![0.0f64; layout.models];
    for block in blocks {
        for (t, b) in totals.iter_mut().zip(block) {
            *t += b;
        }
    }
    Ok(totals.into_iter().map(f64::sqrt).collect())
}

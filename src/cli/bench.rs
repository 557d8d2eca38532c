//! `gradmerge bench`: generates synthetic model families and times merges of them, or a
//! streaming-copy baseline over the same input bytes, reporting throughput and memory.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use crossbeam_channel::bounded;
use gradmerge::config::{MergeConfig, ModelEntry, TokenizerSource};
use gradmerge::dtype::Dtype;
use gradmerge::job::MergeJob;
use gradmerge::method::{FisherNormalize, MethodKind, Rescale};
use gradmerge::params::{MergeParams, ParamValue};
use gradmerge::pipeline::EngineOptions;
use gradmerge::plan::PlanOptions;
use gradmerge::source::{page_size, IoMode};
use gradmerge::synth::{self, Family, FamilyOptions, Preset};
use gradmerge::units::{format_size, parse_size};
use gradmerge::writer::{spawn_writer, ShardSpec};
use gradmerge::Error;
use memmap2::{Mmap, UncheckedAdvice};
use rayon::prelude::*;
use serde_json::json;

use super::report;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Write a synthetic family: base, fine-tuned variants and their Fisher files.
    Generate(GenerateArgs),
    /// Time a merge of a generated family (or the copy baseline) and report memory.
    Run(RunArgs),
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Folder to create; gets base/, model-N/ and fisher-N/.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Architecture: llama-tiny, llama-7b, llama-13b or llama-70b.
    #[arg(long, default_value = "llama-tiny")]
    preset: String,
    /// Divide the hidden, intermediate and key/value widths by this factor.
    #[arg(long, default_value_t = 1)]
    scale: u64,
    /// Number of decoder layers (default: the preset's).
    #[arg(long)]
    layers: Option<u64>,
    /// Element type: bf16, f16 or f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Fine-tuned variants besides the base.
    #[arg(long, default_value_t = 2)]
    models: usize,
    /// Skip the Fisher files.
    #[arg(long)]
    no_fishers: bool,
    /// Write headers only: the data is a file hole that reads as zeros and takes no disk.
    #[arg(long)]
    sparse: bool,
    /// Largest shard, in bytes, with K/M/G (powers of 1000) or KiB/MiB/GiB suffixes.
    #[arg(long, value_name = "SIZE", default_value = "5G")]
    shard_size: String,
    /// Seed of the value generator.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// A folder written by `gradmerge bench generate`.
    #[arg(long, value_name = "DIR")]
    family: PathBuf,
    /// Merge method, for example task_arithmetic, ties or gradmatch.
    #[arg(long, default_value = "task_arithmetic")]
    method: String,
    /// Instead of merging, run this baseline over the inputs the method would read.
    #[arg(long, value_enum)]
    baseline: Option<Baseline>,
    /// Variants to merge (default: every model-N folder of the family).
    #[arg(long)]
    models: Option<usize>,
    /// Another parameter as KEY=VALUE (weight, density, lambda, ...).
    #[arg(long = "param", short = 'p', value_name = "KEY=VALUE")]
    params: Vec<String>,
    /// Output folder; without it the output goes to a sink that discards it.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Replace an existing output folder.
    #[arg(long)]
    force: bool,
    /// Worker threads, at most 1024 (default: one per core).
    #[arg(long, short = 'j', default_value_t = 0, hide_default_value = true)]
    threads: usize,
    /// Memory budget for chunks in flight and mapped input pages: at least 1MiB, default
    /// 256MiB (K/M/G and KiB/MiB/GiB suffixes).
    #[arg(long, value_name = "SIZE")]
    budget: Option<String>,
    /// Chunk size in elements (default: derived from --budget).
    #[arg(long, value_name = "N")]
    chunk_elems: Option<u64>,
    /// Run linear, task_arithmetic and gradmatch on converted f32 tiles instead of their
    /// fused loop (the workload is then labelled "METHOD (tiles)"); other methods always
    /// use tiles.
    #[arg(long)]
    no_fused: bool,
    /// Merge only the first N tensors (sink output only), to sample a large family.
    #[arg(long, value_name = "N")]
    max_tensors: Option<usize>,
    /// Print one JSON object on standard output instead of a line on standard error.
    #[arg(long)]
    json: bool,
}

/// A reference workload that reads the same input bytes as a merge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Baseline {
    /// XOR every input's bytes into one output of the base's size, through mapped inputs,
    /// a rayon pool and one writer thread like the merge engine.
    Copy,
}

/// Runs a bench subcommand; `quiet` drops the summary line (`--json` output stays, as it
/// is the result).
pub fn run(args: &BenchArgs, quiet: bool) -> anyhow::Result<()> {
    match &args.command {
        BenchCommand::Generate(a) => generate(a, quiet),
        BenchCommand::Run(a) => run_bench(a, quiet),
    }
}

fn usage(msg: String) -> anyhow::Error {
    Error::InvalidParameter(msg).into()
}

fn generate(args: &GenerateArgs, quiet: bool) -> anyhow::Result<()> {
    let preset: Preset = args.preset.parse()?;
    let dtype = Dtype::parse_float_name(&args.dtype)
        .filter(|d| matches!(d, Dtype::BF16 | Dtype::F16 | Dtype::F32))
        .ok_or_else(|| usage(format!("--dtype {}: expected bf16, f16 or f32", args.dtype)))?;
    let architecture = preset.architecture().scaled(args.scale, args.layers)?;
    let mut options = FamilyOptions::new(architecture, dtype);
    options.models = args.models;
    options.fishers = !args.no_fishers;
    options.sparse = args.sparse;
    options.shard_size_bytes = parse_size(&args.shard_size)?;
    options.seed = args.seed;

    let started = Instant::now();
    synth::generate(&args.out, &options)?;
    let checkpoints = 1 + options.models * (1 + options.fishers as usize);
    if quiet {
        return Ok(());
    }
    eprintln!(
        "wrote {} checkpoints of {} ({} parameters, {}{}) to {} in {:.1} s",
        checkpoints,
        format_size(options.checkpoint_bytes()),
        architecture.params(),
        dtype,
        if args.sparse { ", sparse" } else { "" },
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The family's folders, checking that the ones the run needs exist.
fn open_family(args: &RunArgs, kind: MethodKind) -> anyhow::Result<Family> {
    let count = match args.models {
        Some(n) => n,
        None => (1..)
            .take_while(|m| args.family.join(format!("model-{m}")).is_dir())
            .count(),
    };
    if count == 0 {
        return Err(usage(format!(
            "{} has no model-1 folder; create a family with `gradmerge bench generate --out {}`",
            args.family.display(),
            args.family.display()
        )));
    }
    let family = Family::at(&args.family, count, kind.uses_fishers());
    for path in std::iter::once(&family.base)
        .chain(&family.models)
        .chain(&family.fishers)
    {
        if !path.is_dir() {
            return Err(usage(format!(
                "{} is missing; generate the family with Fisher files and at least {count} models",
                path.display()
            )));
        }
    }
    Ok(family)
}

fn merge_config(args: &RunArgs, kind: MethodKind, family: &Family) -> anyhow::Result<MergeConfig> {
    let mut params = MergeParams {
        models: vec![Default::default(); family.models.len()],
        ..MergeParams::default()
    };
    // Defaults that make every method do its full work: TIES and DARE keep half.
    if kind.model_parameters().contains(&"density") {
        params
            .global
            .insert("density".into(), ParamValue::Scalar(0.5));
    }
    for item in &args.params {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| usage(format!("--param `{item}` must be KEY=VALUE")))?;
        let number: f64 = value
            .trim()
            .parse()
            .map_err(|_| usage(format!("--param {item}: `{value}` is not a number")))?;
        params
            .global
            .insert(key.trim().to_string(), ParamValue::Scalar(number));
    }
    let uses_fishers = kind.uses_fishers();
    Ok(MergeConfig {
        method: kind,
        base_model: kind.uses_base().then(|| family.base.clone()),
        base_fisher: None,
        models: family
            .models
            .iter()
            .enumerate()
            .map(|(m, path)| ModelEntry {
                path: path.clone(),
                fisher: uses_fishers.then(|| family.fishers[m].clone()),
            })
            .collect(),
        params,
        dtype: None,
        out_dtype: None,
        tokenizer_source: TokenizerSource::Base,
        rescale: Rescale::L1,
        fisher_normalize: FisherNormalize::None,
        layer_range: None,
    })
}

/// Figures of one timed run.
struct Measured {
    bytes_read: u64,
    bytes_written: u64,
    elapsed: Duration,
    tensors: usize,
}

fn run_bench(args: &RunArgs, quiet: bool) -> anyhow::Result<()> {
    let kind: MethodKind = args.method.parse()?;
    let family = open_family(args, kind)?;
    if args.max_tensors.is_some() && args.out.is_some() {
        return Err(usage(
            "--max-tensors writes an incomplete model, so it needs the sink: drop --out".into(),
        ));
    }
    let budget_bytes = super::parse_budget(args.budget.as_deref())?;
    let engine = EngineOptions {
        threads: super::check_threads(args.threads)?,
        budget_bytes,
        chunk_elems: args.chunk_elems,
        fused: !args.no_fused,
        ..EngineOptions::default()
    };

    let sampler = AnonSampler::start();
    let measured = match args.baseline {
        Some(Baseline::Copy) => {
            let mut inputs = Vec::new();
            if kind.uses_base() {
                inputs.push(family.base.clone());
            }
            inputs.extend(family.models.iter().cloned());
            inputs.extend(family.fishers.iter().cloned());
            copy_baseline(&inputs, args.out.as_deref(), args.force, &engine)?
        }
        None => {
            let config = merge_config(args, kind, &family)?;
            let mut job = MergeJob::open(config, IoMode::Mmap, PlanOptions::default())?;
            if let Some(n) = args.max_tensors {
                job.plan.tensors.truncate(n);
            }
            let out = args.out.as_deref().map(|o| (o, args.force));
            let summary = job.run(out, &engine, None, &[])?;
            Measured {
                bytes_read: summary.bytes_read,
                bytes_written: summary.bytes_written,
                elapsed: summary.elapsed,
                tensors: summary.tensors,
            }
        }
    };
    let peak_anon = sampler.stop();
    let memory = report::peak_memory();
    let peak_rss = memory.map_or(0, |m| m.peak_rss_bytes);
    let peak_anon = peak_anon.max(memory.map_or(0, |m| m.anon_rss_bytes));

    let secs = measured.elapsed.as_secs_f64().max(1e-9);
    let name = match args.baseline {
        Some(Baseline::Copy) => "copy".to_string(),
        None if args.no_fused && has_fused_loop(kind) => format!("{} (tiles)", kind.name()),
        None => kind.name().to_string(),
    };
    if args.json {
        let line = json!({
            "workload": name,
            "family": args.family,
            "sink": args.out.is_none(),
            "tensors": measured.tensors,
            "bytes_read": measured.bytes_read,
            "bytes_written": measured.bytes_written,
            "seconds": secs,
            "read_gb_per_s": measured.bytes_read as f64 / secs / 1e9,
            "peak_rss_bytes": peak_rss,
            "peak_anon_rss_bytes": peak_anon,
        });
        println!("{line}");
    } else if !quiet {
        eprintln!(
            "{name}: {} tensors, read {}, wrote {} in {secs:.3} s ({:.2} GB/s read); peak RSS {}, peak anonymous RSS {}",
            measured.tensors,
            format_size(measured.bytes_read),
            format_size(measured.bytes_written),
            measured.bytes_read as f64 / secs / 1e9,
            format_size(peak_rss),
            format_size(peak_anon),
        );
    }
    Ok(())
}

/// True for the methods whose kernels have a fused loop (`method::fused`), so that
/// `--no-fused` changes how they run.
fn has_fused_loop(kind: MethodKind) -> bool {
    matches!(
        kind,
        MethodKind::Linear | MethodKind::TaskArithmetic | MethodKind::GradMatch
    )
}

/// Polls RssAnon every 10 ms, because /proc reports only its current value.
struct AnonSampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<u64>,
}

impl AnonSampler {
    fn start() -> AnonSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            let mut peak = 0u64;
            while !flag.load(Ordering::Relaxed) {
                if let Some(m) = report::peak_memory() {
                    peak = peak.max(m.anon_rss_bytes);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        });
        AnonSampler { stop, handle }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or(0)
    }
}

/// Output bytes per baseline chunk: the engine's chunk for a three-input bf16 merge with
/// the default budget (4 Mi elements of 2 bytes).
const COPY_CHUNK_BYTES: u64 = 8 << 20;

/// One shard file of every input, mapped, with the offset of each file's data section
/// (Fisher files have longer headers than models).
struct MappedShard {
    maps: Vec<Mmap>,
    data_starts: Vec<usize>,
    spec: ShardSpec,
}

fn map_shards(inputs: &[PathBuf]) -> anyhow::Result<Vec<MappedShard>> {
    let first = gradmerge::checkpoint::Checkpoint::open(&inputs[0], IoMode::Read)?;
    let mut shards = Vec::new();
    for source in first.sources() {
        let file_name = source
            .path()
            .file_name()
            .expect("a shard is a file")
            .to_owned();
        let data_bytes = source.len_bytes() - source.header().data_start;
        let mut maps = Vec::with_capacity(inputs.len());
        let mut data_starts = Vec::with_capacity(inputs.len());
        for input in inputs {
            let path = input.join(&file_name);
            let shard = gradmerge::source::Source::open(&path, IoMode::Read)?;
            let data_start = shard.header().data_start;
            if shard.len_bytes() - data_start != data_bytes {
                return Err(usage(format!(
                    "{} holds another number of data bytes than the same shard of {}; the copy baseline needs inputs of one family",
                    path.display(),
                    inputs[0].display()
                )));
            }
            let file = File::open(&path).map_err(|e| Error::io("open", &path, e))?;
            // SAFETY: a read-only mapping of a file the benchmark generated; a truncation
            // by another process during the run would raise SIGBUS, as for the merge.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io("mmap", &path, e))?;
            maps.push(map);
            data_starts.push(data_start as usize);
        }
        let header = maps[0][..data_starts[0]].to_vec();
        shards.push(MappedShard {
            maps,
            data_starts,
            spec: ShardSpec {
                file_name: file_name.to_string_lossy().into_owned(),
                header,
                data_bytes,
            },
        });
    }
    Ok(shards)
}

/// Reads every byte of `inputs` (same-layout checkpoints) and writes one output of the
/// first input's size: each output byte is the XOR of the inputs' bytes at that offset.
fn copy_baseline(
    inputs: &[PathBuf],
    out: Option<&Path>,
    force: bool,
    engine: &EngineOptions,
) -> anyhow::Result<Measured> {
    let shards = map_shards(inputs)?;
    let folder = match out {
        Some(dir) => {
            if dir.exists() {
                if !force {
                    return Err(usage(format!(
                        "{} exists; pass --force to replace it",
                        dir.display()
                    )));
                }
                std::fs::remove_dir_all(dir).map_err(|e| Error::io("remove", dir, e))?;
            }
            std::fs::create_dir_all(dir).map_err(|e| Error::io("create folder", dir, e))?;
            Some(dir.to_path_buf())
        }
        None => None,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(engine.threads)
        .build()?;
    let threads = pool.current_num_threads();
    let batch = threads * 2;
    let (data_tx, data_rx) = bounded::<Vec<u8>>(threads * 2);
    let (recycle_tx, recycle_rx) = bounded::<Vec<u8>>(threads * 4);
    let specs: Vec<ShardSpec> = shards.iter().map(|s| s.spec.clone()).collect();
    let writer = spawn_writer(folder, specs, data_rx, recycle_tx);

    let started = Instant::now();
    let mut bytes_read = 0u64;
    for shard in &shards {
        let len = shard.spec.data_bytes;
        let ranges: Vec<(u64, u64)> = (0..len.div_ceil(COPY_CHUNK_BYTES))
            .map(|c| {
                let begin = c * COPY_CHUNK_BYTES;
                (begin, (begin + COPY_CHUNK_BYTES).min(len))
            })
            .collect();
        for group in ranges.chunks(batch) {
            let buffers: Vec<Vec<u8>> = pool.install(|| {
                group
                    .par_iter()
                    .map(|&(begin, end)| {
                        let mut buf = recycle_rx.try_recv().unwrap_or_default();
                        xor_range(shard, begin as usize..end as usize, &mut buf);
                        buf
                    })
                    .collect()
            });
            for buf in buffers {
                if data_tx.send(buf).is_err() {
                    break;
                }
            }
        }
        bytes_read += len * inputs.len() as u64;
    }
    drop(data_tx);
    let written = writer
        .join()
        .map_err(|_| anyhow::anyhow!("the writer thread panicked"))??;
    Ok(Measured {
        bytes_read,
        bytes_written: written.bytes,
        elapsed: started.elapsed(),
        tensors: 0,
    })
}

/// Sets `out` to the XOR of data bytes `range` of every input of `shard`, then drops
/// those pages from the resident set as the engine does.
fn xor_range(shard: &MappedShard, range: std::ops::Range<usize>, out: &mut Vec<u8>) {
    let slice = |i: usize| {
        let start = shard.data_starts[i];
        &shard.maps[i][start + range.start..start + range.end]
    };
    out.clear();
    out.extend_from_slice(slice(0));
    for i in 1..shard.maps.len() {
        for (o, &b) in out.iter_mut().zip(slice(i)) {
            *o ^= b;
        }
    }
    let page = page_size() as usize;
    for (map, &start) in shard.maps.iter().zip(&shard.data_starts) {
        let begin = (start + range.start) / page * page;
        let end = (start + range.end)
            .div_ceil(page)
            .saturating_mul(page)
            .min(map.len());
        // SAFETY: DONTNEED on a read-only shared file mapping only drops page table
        // entries; later reads fault the same file contents back in. The range is page
        // aligned and inside the mapping.
        let _ =
            unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, begin, end - begin) };
    }
}

//! `gradmerge merge`: from a YAML file or flags to an output folder.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use gradmerge::config::{self, MergeConfig, ModelEntry, TokenizerSource};
use gradmerge::dtype::Dtype;
use gradmerge::job::MergeJob;
use gradmerge::method::{FisherNormalize, MethodKind, Rescale};
use gradmerge::params::{MergeParams, ParamValue};
use gradmerge::pipeline::{EngineOptions, Precision};
use gradmerge::plan::{PlanOptions, VocabPolicy};
use gradmerge::source::IoMode;
use gradmerge::units::{format_size, parse_size};
use gradmerge::Error;
use indicatif::{ProgressBar, ProgressStyle};

use super::report;

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// A mergekit-style YAML configuration. Without it, the merge comes from the flags.
    config: Option<PathBuf>,

    /// Output folder as a second argument after the configuration, as in
    /// `mergekit-yaml CONFIG OUT`; the same as --out.
    #[arg(value_name = "OUT", conflicts_with = "out", requires = "config")]
    out_path: Option<PathBuf>,

    /// Output folder (Hugging Face layout). Written atomically: a temporary folder beside
    /// it is renamed into place only when everything is written and synced.
    #[arg(short, long, required_unless_present_any = ["dry_run", "sink", "out_path"])]
    out: Option<PathBuf>,

    /// Replace an existing, non-empty output folder.
    #[arg(long)]
    force: bool,

    /// Validate every input and print the plan without reading tensor data.
    #[arg(long)]
    dry_run: bool,

    /// Compute everything but write nothing (for measuring throughput).
    #[arg(long, conflicts_with = "out")]
    sink: bool,

    /// Merge method (when no configuration file is given).
    #[arg(long, value_name = "METHOD")]
    method: Option<String>,

    /// Base model: a .safetensors file or a model folder.
    #[arg(long, value_name = "PATH")]
    base: Option<PathBuf>,

    /// A model to merge; repeat for each model.
    #[arg(long = "model", value_name = "PATH")]
    models: Vec<PathBuf>,

    /// Fisher file of the preceding models, in the same order; repeat once per model.
    #[arg(long = "fisher", value_name = "PATH")]
    fishers: Vec<PathBuf>,

    /// Fisher file of the base model (gradmatch).
    #[arg(long, value_name = "PATH")]
    base_fisher: Option<PathBuf>,

    /// Weight of each model: repeat the flag once per --model, in the same order
    /// (--weight 0.3 --weight 0.7), or give it once for every model.
    #[arg(
        long = "weight",
        visible_alias = "alpha",
        value_name = "W",
        allow_negative_numbers = true
    )]
    weights: Vec<f64>,

    /// Another parameter as KEY=VALUE, for example density=0.5, lambda=1, t=0.3, delta=1e-8.
    #[arg(long = "param", short = 'p', value_name = "KEY=VALUE")]
    params: Vec<String>,

    /// Output dtype of merged tensors (float32, bfloat16, float16, float64). Default: the
    /// inputs' dtype, or float32 when they differ.
    #[arg(long, value_name = "DTYPE")]
    out_dtype: Option<String>,

    /// Folder whose tokenizer files are copied (default: the base model's folder).
    #[arg(long, value_name = "PATH")]
    tokenizer_source: Option<PathBuf>,

    /// Largest output shard, in bytes, with K/M/G (powers of 1000) or KiB/MiB/GiB suffixes.
    #[arg(long, value_name = "SIZE", default_value = "5G")]
    shard_size: String,

    /// Input access: mmap (the fastest) or read (positioned reads, for network filesystems
    /// and inputs that may change while merging). A mapped file that another process
    /// truncates kills gradmerge with SIGBUS.
    #[arg(long, value_enum, default_value_t = IoArg::Mmap)]
    io: IoArg,

    /// Worker threads, at most 1024 (default: one per core).
    #[arg(long, short = 'j', value_name = "N")]
    threads: Option<usize>,

    /// Memory budget for chunks in flight and mapped input pages: at least 1MiB, default
    /// 256MiB (K/M/G and KiB/MiB/GiB suffixes).
    #[arg(long, value_name = "SIZE")]
    budget: Option<String>,

    /// Chunk size in elements (default: derived from --budget).
    #[arg(long, value_name = "N", hide_short_help = true)]
    chunk_elems: Option<u64>,

    /// Capacity of the writer channel in chunks (default: twice the threads).
    #[arg(long, value_name = "N", hide_short_help = true)]
    channel_depth: Option<usize>,

    /// Run every kernel on converted f32 tiles instead of the fused path of linear,
    /// task_arithmetic and gradmatch. Same output bytes, slower; for benchmarks and bug
    /// reports.
    #[arg(long, hide_short_help = true)]
    no_fused: bool,

    /// Working precision of the kernels: f32 (fast, the default) or f64.
    #[arg(long, value_enum, default_value_t = PrecisionArg::F32)]
    precision: PrecisionArg,

    /// Write NaN and values that overflow the output dtype instead of stopping.
    #[arg(long)]
    allow_non_finite: bool,

    /// Handling of embeddings with different numbers of rows (vocabulary sizes): error
    /// (the default), base (keep the base model's rows) or fill (keep the most rows, and
    /// take each model's missing rows from a model that has them).
    #[arg(long, value_enum, default_value_t = VocabArg::Error)]
    vocab_policy: VocabArg,

    /// Write a JSON report: summary and per-tensor statistics.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum IoArg {
    Mmap,
    Read,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum VocabArg {
    Error,
    Base,
    Fill,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum PrecisionArg {
    F32,
    F64,
}

/// Returns a YAML comment holding this process's command line, so that the saved
/// configuration shows every flag the merge ran with.
fn command_line_comment() -> String {
    let words: Vec<String> = std::env::args()
        .skip(1)
        .map(|a| {
            let plain = !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
            if plain {
                a
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect();
    format!(
        "\n# Written by gradmerge {} with the command line:\n#   gradmerge {}\n",
        env!("CARGO_PKG_VERSION"),
        words.join(" ").replace('\n', " ")
    )
}

/// Checks `--report` before any work: not a folder, and in an existing folder or in the
/// output folder (written after the merge).
fn check_report_path(report: &Path, out: Option<&Path>) -> anyhow::Result<()> {
    if report.is_dir() {
        return Err(usage(format!(
            "--report {} is a folder; give a file name such as {}",
            report.display(),
            report.join("report.json").display()
        )));
    }
    let parent = report
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let same = |a: &Path, b: &Path| std::path::absolute(a).ok() == std::path::absolute(b).ok();
    if out.is_some_and(|o| same(o, report)) {
        return Err(usage(format!(
            "--report {} is the output folder; give a file name such as {}",
            report.display(),
            report.join("report.json").display()
        )));
    }
    let in_output = out.is_some_and(|o| same(o, parent));
    if !parent.is_dir() && !in_output {
        return Err(usage(format!(
            "--report {}: the folder {} does not exist",
            report.display(),
            parent.display()
        )));
    }
    Ok(())
}

/// Rejects a report inside the output folder whose name a merged file takes: the shards,
/// the index, the side files and the files gradmerge adds.
///
/// NOTE: the side-file names are the usual Hugging Face ones, not the tokenizer source's
/// actual list. A report that still collides is caught after the merge and not written.
fn check_report_name(report: &Path, out: Option<&Path>, job: &MergeJob) -> anyhow::Result<()> {
    let Some(out) = out else { return Ok(()) };
    let parent = report
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if std::path::absolute(parent).ok() != std::path::absolute(out).ok() {
        return Ok(());
    }
    let name = report
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name_in_use = job.plan.shards.iter().any(|s| s.file_name == name)
        || name.ends_with(".safetensors")
        || name.ends_with(".index.json")
        || name.starts_with("tokenizer")
        || [
            "config.json",
            "generation_config.json",
            "special_tokens_map.json",
            "README.md",
            "gradmerge_config.yml",
        ]
        .contains(&name.as_str());
    if name_in_use {
        return Err(usage(format!(
            "--report {}: the merge writes a file of that name into {}; choose another name, such as report.json",
            report.display(),
            out.display()
        )));
    }
    Ok(())
}

impl MergeArgs {
    /// Returns the output folder, from --out or the positional OUT.
    fn output(&self) -> Option<&Path> {
        self.out.as_deref().or(self.out_path.as_deref())
    }
}

fn usage(msg: String) -> anyhow::Error {
    Error::InvalidParameter(msg).into()
}

/// Builds the configuration from the YAML file or the flags.
fn load_config(args: &MergeArgs) -> anyhow::Result<(MergeConfig, Option<String>)> {
    if let Some(path) = &args.config {
        let flag_inputs = args.method.is_some()
            || args.base.is_some()
            || !args.models.is_empty()
            || !args.fishers.is_empty()
            || args.base_fisher.is_some();
        if flag_inputs {
            return Err(usage(format!(
                "{}: give the merge either as a configuration file or as --method/--base/--model/--fisher flags, not both",
                path.display()
            )));
        }
        if !args.weights.is_empty() {
            return Err(usage(format!(
                "{}: --weight applies to --model flags; with a configuration file set `weight` in it, or pass -p weight=W for every model",
                path.display()
            )));
        }
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(usage(format!(
                    "configuration file {} not found",
                    path.display()
                )))
            }
            Err(e) => return Err(Error::io("read", path, e).into()),
        };
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut config = config::parse_yaml(&text, path, &dir)?;
        apply_overrides(args, &mut config)?;
        return Ok((config, Some(text)));
    }

    let method: MethodKind = args
        .method
        .as_deref()
        .ok_or_else(|| usage("no merge given: pass a configuration file, or --method with --base and --model flags".into()))?
        .parse()?;
    if args.models.is_empty() {
        return Err(usage(
            "no models given: pass --model PATH once per model".into(),
        ));
    }
    if !args.fishers.is_empty() && args.fishers.len() != args.models.len() {
        return Err(usage(format!(
            "{} --fisher flags for {} --model flags; give one Fisher per model, in the same order",
            args.fishers.len(),
            args.models.len()
        )));
    }
    let mut params = MergeParams {
        models: vec![Default::default(); args.models.len()],
        ..MergeParams::default()
    };
    match args.weights.len() {
        0 => {}
        1 => {
            params
                .global
                .insert("weight".into(), ParamValue::Scalar(args.weights[0]));
        }
        n if n == args.models.len() => {
            for (m, w) in params.models.iter_mut().zip(&args.weights) {
                m.insert("weight".into(), ParamValue::Scalar(*w));
            }
        }
        n => {
            return Err(usage(format!(
                "{n} --weight values for {} models; give one value, or one per model",
                args.models.len()
            )))
        }
    }
    let models = args
        .models
        .iter()
        .enumerate()
        .map(|(i, p)| ModelEntry {
            path: p.clone(),
            fisher: args.fishers.get(i).cloned(),
        })
        .collect();
    let mut config = MergeConfig {
        method,
        base_model: args.base.clone(),
        base_fisher: args.base_fisher.clone(),
        models,
        params,
        dtype: None,
        out_dtype: None,
        tokenizer_source: TokenizerSource::Base,
        rescale: Rescale::L1,
        fisher_normalize: FisherNormalize::None,
        layer_range: None,
    };
    apply_overrides(args, &mut config)?;
    Ok((config, None))
}

/// Applies --param, --out-dtype and --tokenizer-source on top of a configuration.
fn apply_overrides(args: &MergeArgs, config: &mut MergeConfig) -> anyhow::Result<()> {
    for item in &args.params {
        let (key, value) = item.split_once('=').ok_or_else(|| {
            usage(format!(
                "--param `{item}` must be KEY=VALUE, for example density=0.5"
            ))
        })?;
        let (key, value) = (key.trim(), value.trim());
        match key {
            "rescale" => {
                config.rescale = match value {
                    "l1" | "true" => Rescale::L1,
                    "density" => Rescale::Density,
                    "false" | "none" => Rescale::None,
                    _ => {
                        return Err(usage(format!(
                            "--param rescale={value}: expected l1, density or false"
                        )))
                    }
                }
            }
            "fisher_normalize" => {
                config.fisher_normalize = match value {
                    "l2" => FisherNormalize::L2,
                    "none" => FisherNormalize::None,
                    _ => {
                        return Err(usage(format!(
                            "--param fisher_normalize={value}: expected l2 or none"
                        )))
                    }
                }
            }
            _ => {
                let mut allowed: Vec<&str> = config.method.model_parameters().to_vec();
                allowed.extend_from_slice(config.method.global_parameters());
                if !allowed.contains(&key) {
                    let hint = gradmerge::suggest::nearest(key, &allowed)
                        .map(|n| format!("; did you mean `{n}`?"))
                        .unwrap_or_default();
                    return Err(usage(format!(
                        "--param {key}: `{}` takes no parameter `{key}`{hint} (valid: {})",
                        config.method,
                        allowed.join(", ")
                    )));
                }
                let number = match value {
                    "true" => 1.0,
                    "false" => 0.0,
                    v => v.parse::<f64>().map_err(|_| {
                        usage(format!("--param {key}={value}: `{value}` is not a number"))
                    })?,
                };
                config
                    .params
                    .global
                    .insert(key.to_string(), ParamValue::Scalar(number));
            }
        }
    }
    if let Some(d) = &args.out_dtype {
        config.out_dtype = Some(Dtype::parse_float_name(d).ok_or_else(|| {
            usage(format!(
                "--out-dtype {d}: expected float32, bfloat16, float16 or float64"
            ))
        })?);
    }
    if let Some(p) = &args.tokenizer_source {
        config.tokenizer_source = TokenizerSource::Path(p.clone());
    }
    if let TokenizerSource::Path(p) = &config.tokenizer_source {
        if !p.is_dir() {
            return Err(usage(format!(
                "tokenizer source {} is not a folder; pass the model folder whose tokenizer files should be copied",
                p.display()
            )));
        }
    }
    Ok(())
}

fn engine_options(args: &MergeArgs, config: &MergeConfig) -> anyhow::Result<EngineOptions> {
    let budget_bytes = super::parse_budget(args.budget.as_deref())?;
    if args.chunk_elems == Some(0) {
        return Err(usage("--chunk-elems must be at least 1".into()));
    }
    if args.channel_depth == Some(0) {
        return Err(usage("--channel-depth must be at least 1".into()));
    }
    let precision = match (args.precision, config.dtype) {
        (PrecisionArg::F64, _) | (_, Some(Dtype::F64)) => Precision::F64,
        _ => Precision::F32,
    };
    let threads = match args.threads {
        None => 0,
        Some(0) => return Err(usage("--threads must be at least 1".into())),
        Some(n) => super::check_threads(n)?,
    };
    Ok(EngineOptions {
        threads,
        budget_bytes,
        chunk_elems: args.chunk_elems,
        channel_depth: args.channel_depth,
        precision,
        allow_non_finite: args.allow_non_finite,
        task_vector_norms: args.report.is_some(),
        fused: !args.no_fused,
    })
}

pub fn run(args: &MergeArgs, quiet: bool) -> anyhow::Result<()> {
    let (config, yaml) = load_config(args)?;
    let shard_size_bytes = parse_size(&args.shard_size)?;
    if shard_size_bytes == 0 {
        return Err(usage("--shard-size must be larger than 0".into()));
    }
    let io = match args.io {
        IoArg::Mmap => IoMode::Mmap,
        IoArg::Read => IoMode::Read,
    };
    let engine = engine_options(args, &config)?;
    if let Some(report) = &args.report {
        check_report_path(report, args.output())?;
        if args.dry_run {
            log::warn!(
                "--dry-run merges nothing, so --report {} is not written",
                report.display()
            );
        }
    }
    log::info!(
        "reading inputs with {}",
        if io == IoMode::Mmap {
            "mmap"
        } else {
            "positioned reads"
        }
    );
    let mut job = MergeJob::open(
        config,
        io,
        PlanOptions {
            out_dtype: None,
            shard_size_bytes,
            vocab_policy: match args.vocab_policy {
                VocabArg::Error => VocabPolicy::Error,
                VocabArg::Base => VocabPolicy::Base,
                VocabArg::Fill => VocabPolicy::Fill,
            },
        },
    )?;
    for note in &job.plan.notes {
        log::warn!("{note}");
    }
    // The configuration file is an input too: neither the report nor the output may
    // replace it.
    let mut protected = job.input_paths();
    protected.extend(args.config.iter().cloned());
    if let Some(report) = &args.report {
        gradmerge::writer::check_not_input(report, &protected)
            .map_err(|e| usage(format!("--report: {e}")))?;
        check_report_name(report, args.output(), &job)?;
    }
    if let (Some(out), Some(config)) = (args.output(), &args.config) {
        gradmerge::writer::check_not_input(out, std::slice::from_ref(config))?;
    }

    if args.dry_run {
        report::print_plan(&job, &engine, args.output())?;
        return Ok(());
    }

    let mut resolved = report::resolved_config_yaml(&job, yaml.as_deref());
    // Flags that changed the merge are not all expressible in the YAML (precision,
    // vocabulary policy, overrides of a configuration file), so record the command line.
    resolved.push_str(&command_line_comment());
    let card = report::model_card(&job);
    let extra = [
        ("gradmerge_config.yml", resolved.into_bytes()),
        ("README.md", card.into_bytes()),
    ];
    let bar = progress_bar(quiet, job.plan.tensors.iter().map(|t| t.size_bytes()).sum());
    let tensor_count = job.plan.tensors.len();
    let progress = |done: usize, bytes: u64| {
        bar.set_message(format!("{done}/{tensor_count} tensors"));
        bar.set_position(bytes);
    };
    let out = args.output().map(|o| (o, args.force));
    let summary = job
        .run(out, &engine, Some(&progress), &extra)
        .with_context(|| match args.output() {
            Some(o) => format!(
                "merge into {} failed; nothing was written there",
                o.display()
            ),
            None => "merge failed".into(),
        })?;
    bar.finish_and_clear();

    let peak = report::peak_memory();
    if !quiet {
        let secs = summary.elapsed.as_secs_f64().max(1e-9);
        let mut stderr = std::io::stderr().lock();
        // A closed stderr (a pipe into `head`) must not fail a merge that succeeded.
        let _ = writeln!(
            stderr,
            "merged {} tensors: read {}, wrote {} in {:.2} s ({:.2} GB/s read), peak memory {}{}",
            summary.tensors,
            format_size(summary.bytes_read),
            format_size(summary.bytes_written),
            secs,
            summary.bytes_read as f64 / secs / 1e9,
            peak.map(|p| format_size(p.peak_rss_bytes))
                .unwrap_or_else(|| "unknown".into()),
            args.output()
                .map(|o| format!(" -> {}", o.display()))
                .unwrap_or_default()
        );
    }
    if let Some(path) = &args.report {
        // Never replace a file the merge wrote (a side file copied from the tokenizer
        // source, for example).
        let written_here = args.output().is_some_and(|o| {
            path.parent()
                .is_some_and(|p| std::path::absolute(p).ok() == std::path::absolute(o).ok())
        });
        if written_here && path.exists() {
            return Err(anyhow::anyhow!(
                "the merge into {} succeeded, but --report {} names a file the merge wrote, so the report was not written; choose another report name",
                args.output().map(|o| o.display().to_string()).unwrap_or_default(),
                path.display()
            ));
        }
        report::write_report(path, &job, &summary, peak)
            .with_context(|| "the merge succeeded, but writing the report failed".to_string())?;
    }
    Ok(())
}

fn progress_bar(quiet: bool, total_bytes: u64) -> ProgressBar {
    use std::io::IsTerminal;
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total_bytes);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} {bar:40} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

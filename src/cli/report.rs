//! Human and machine output of `merge`: the dry-run plan, the JSON report, the resolved
//! configuration and the model card written beside the weights.

use std::fmt::Write as _;
use std::path::Path;

use gradmerge::job::MergeJob;
use gradmerge::method::MethodKind;
use gradmerge::params::ParamValue;
use gradmerge::pipeline::{EngineOptions, Summary};
use gradmerge::plan::Action;
use gradmerge::units::format_size;
use gradmerge::Error;
use serde_json::json;

/// Peak and current memory of this process, from /proc/self/status.
#[derive(Clone, Copy, Debug)]
pub struct Memory {
    /// VmHWM: peak resident set size.
    pub peak_rss_bytes: u64,
    /// RssAnon: anonymous resident memory now (heap, stacks), excluding mapped files.
    pub anon_rss_bytes: u64,
}

/// Reads this process's peak RSS and anonymous RSS; `None` where /proc is unavailable.
pub fn peak_memory() -> Option<Memory> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    };
    Some(Memory {
        peak_rss_bytes: field("VmHWM:")?,
        anon_rss_bytes: field("RssAnon:").unwrap_or(0),
    })
}

fn describe(v: &ParamValue) -> String {
    match v {
        ParamValue::Scalar(x) => format!("{x}"),
        ParamValue::Gradient(g) => format!("{g:?} (gradient across layers)"),
        ParamValue::Filtered(entries) => entries
            .iter()
            .map(|(f, v)| format!("{}: {}", f.as_deref().unwrap_or("*"), describe(v)))
            .collect::<Vec<_>>()
            .join("; "),
    }
}

/// Prints the validated plan of a dry run.
pub fn print_plan(
    job: &MergeJob,
    engine: &EngineOptions,
    out: Option<&Path>,
) -> anyhow::Result<()> {
    let mut s = String::new();
    write_method(&mut s, job)?;
    write_models(&mut s, job)?;
    write_totals(&mut s, job, engine, out)?;
    let mut stdout = std::io::stdout().lock();
    std::io::Write::write_all(&mut stdout, s.as_bytes())?;
    Ok(())
}

/// Appends the method, the base and the global parameters.
fn write_method(s: &mut String, job: &MergeJob) -> std::fmt::Result {
    let c = &job.config;
    writeln!(s, "method: {}", c.method)?;
    if let Some(b) = &c.base_model {
        writeln!(s, "base: {}", b.display())?;
    }
    for (k, v) in &c.params.global {
        let flag = matches!(k.as_str(), "normalize" | "filter_wise");
        match v {
            ParamValue::Scalar(x) if flag => writeln!(s, "parameter {k}: {}", *x != 0.0)?,
            _ => writeln!(s, "parameter {k}: {}", describe(v))?,
        }
    }
    if matches!(c.method, MethodKind::DareLinear | MethodKind::DareTies) {
        writeln!(s, "parameter rescale: {:?}", c.rescale)?;
    }
    if c.fisher_normalize != gradmerge::method::FisherNormalize::None {
        writeln!(s, "parameter fisher_normalize: {:?}", c.fisher_normalize)?;
    }
    Ok(())
}

/// Appends one line per model with its Fisher, weight (normalised) and parameters.
fn write_models(s: &mut String, job: &MergeJob) -> std::fmt::Result {
    let c = &job.config;
    // Effective weights after normalisation, for methods that normalise scalar weights.
    let weights: Vec<f64> = (0..c.models.len())
        .map(|m| {
            match c
                .params
                .models
                .get(m)
                .and_then(|p| p.get("weight"))
                .or(c.params.global.get("weight"))
            {
                Some(ParamValue::Scalar(w)) => *w,
                None => 1.0,
                Some(_) => f64::NAN,
            }
        })
        .collect();
    let normalize_default = matches!(
        c.method,
        gradmerge::method::MethodKind::Linear | gradmerge::method::MethodKind::Ties
    );
    let normalize = match c.params.global.get("normalize") {
        Some(ParamValue::Scalar(x)) => *x != 0.0,
        _ => normalize_default,
    };
    let sum: f64 = weights.iter().sum();
    for (i, m) in c.models.iter().enumerate() {
        let mut line = format!("model {}: {}", i + 1, m.path.display());
        if let Some(f) = &m.fisher {
            write!(line, " (fisher {})", f.display())?;
        }
        if c.method.model_parameters().contains(&"weight") {
            let w = weights[i];
            if w.is_nan() {
                write!(line, ", weight varies by tensor")?;
            } else if normalize && sum != 0.0 && c.method != gradmerge::method::MethodKind::Ties {
                write!(
                    line,
                    ", weight {w} (effective {:.4} after normalize)",
                    w / sum
                )?;
            } else {
                write!(line, ", weight {w}")?;
            }
        }
        if let Some(p) = c.params.models.get(i) {
            for (k, v) in p.iter().filter(|(k, _)| *k != "weight") {
                write!(line, ", {k} {}", describe(v))?;
            }
        }
        writeln!(s, "{line}")?;
    }
    Ok(())
}

/// Appends the tensor counts, output size, memory budget, disk space and notes.
fn write_totals(
    s: &mut String,
    job: &MergeJob,
    engine: &EngineOptions,
    out: Option<&Path>,
) -> std::fmt::Result {
    let plan = &job.plan;
    let layout = job.inputs.layout(job.config.method);
    let merged = plan
        .tensors
        .iter()
        .filter(|t| t.action == Action::Merge)
        .count();
    let inputs_bytes = job.inputs.data_bytes();
    writeln!(
        s,
        "inputs: {} checkpoints, {} of tensor data, {} inputs per merged tensor",
        job.inputs.all().count(),
        format_size(inputs_bytes),
        layout.len()
    )?;
    writeln!(
        s,
        "tensors: {} out ({} merged, {} copied)",
        plan.tensors.len(),
        merged,
        plan.tensors.len() - merged
    )?;
    writeln!(
        s,
        "output: {} in {} shard(s), dtype {}",
        format_size(plan.output_bytes()),
        plan.shards.len(),
        plan.out_dtype
            .map(|d| d.to_string())
            .unwrap_or_else(|| "unchanged".into())
    )?;
    writeln!(
        s,
        "memory budget: {} (threads: {})",
        format_size(engine.budget_bytes),
        if engine.threads == 0 {
            "all cores".to_string()
        } else {
            engine.threads.to_string()
        }
    )?;
    match out {
        Some(o) => {
            let parent = std::path::absolute(o)
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf));
            let free = parent.as_deref().and_then(|p| {
                let mut q = p.to_path_buf();
                while !q.exists() {
                    q = q.parent()?.to_path_buf();
                }
                gradmerge::writer::free_space(&q).ok()
            });
            writeln!(
                s,
                "disk: {} needed at {}, {} free",
                format_size(plan.output_bytes()),
                o.display(),
                free.map(format_size).unwrap_or_else(|| "unknown".into())
            )?;
        }
        None => writeln!(s, "disk: {} needed", format_size(plan.output_bytes()))?,
    }
    for note in &plan.notes {
        writeln!(s, "note: {note}")?;
    }
    Ok(())
}

/// Writes the JSON report of a finished merge.
pub fn write_report(
    path: &Path,
    job: &MergeJob,
    summary: &Summary,
    memory: Option<Memory>,
) -> anyhow::Result<()> {
    let secs = summary.elapsed.as_secs_f64();
    let per_tensor: Vec<serde_json::Value> = summary
        .per_tensor
        .iter()
        .map(|t| {
            let kept =
                (t.stats.considered > 0).then(|| t.stats.kept as f64 / t.stats.considered as f64);
            json!({
                "name": t.name,
                "merged": t.merged,
                "fraction_kept": kept,
                "task_vector_norms": t.task_vector_norms,
                "invalid_fisher": t.stats.invalid_fisher,
                "nonpositive_precision": t.stats.nonpositive_precision,
                "non_finite": t.non_finite,
            })
        })
        .collect();
    let doc = json!({
        "method": job.config.method.name(),
        "tensors": summary.tensors,
        "bytes_read": summary.bytes_read,
        "bytes_written": summary.bytes_written,
        "seconds": secs,
        "read_gb_per_s": if secs > 0.0 { summary.bytes_read as f64 / secs / 1e9 } else { 0.0 },
        "threads": summary.threads,
        "chunk_elems": summary.chunk_elems,
        "peak_rss_bytes": memory.map(|m| m.peak_rss_bytes),
        "anon_rss_bytes": memory.map(|m| m.anon_rss_bytes),
        "per_tensor": per_tensor,
    });
    let text = serde_json::to_string_pretty(&doc)? + "\n";
    std::fs::write(path, text).map_err(|e| Error::io("write", path, e))?;
    Ok(())
}

/// Returns the configuration written beside the weights: the YAML as given, or one built
/// from the flags.
pub fn resolved_config_yaml(job: &MergeJob, yaml: Option<&str>) -> String {
    if let Some(text) = yaml {
        return text.to_string();
    }
    let c = &job.config;
    let mut s = String::new();
    let _ = writeln!(s, "merge_method: {}", c.method);
    if let Some(b) = &c.base_model {
        let _ = writeln!(s, "base_model: {}", quote(&b.display().to_string()));
    }
    if let Some(b) = &c.base_fisher {
        let _ = writeln!(s, "base_fisher: {}", quote(&b.display().to_string()));
    }
    let _ = writeln!(s, "models:");
    for (i, m) in c.models.iter().enumerate() {
        let _ = writeln!(s, "  - model: {}", quote(&m.path.display().to_string()));
        if let Some(f) = &m.fisher {
            let _ = writeln!(s, "    fisher: {}", quote(&f.display().to_string()));
        }
        if let Some(p) = c.params.models.get(i).filter(|p| !p.is_empty()) {
            let _ = writeln!(s, "    parameters:");
            for (k, v) in p {
                let _ = writeln!(s, "      {k}: {}", yaml_value(v));
            }
        }
    }
    if !c.params.global.is_empty() {
        let _ = writeln!(s, "parameters:");
        for (k, v) in &c.params.global {
            let _ = writeln!(s, "  {k}: {}", yaml_value(v));
        }
    }
    if let Some(d) = c.out_dtype.and_then(|d| d.torch_name()) {
        let _ = writeln!(s, "out_dtype: {d}");
    }
    s
}

fn quote(s: &str) -> String {
    serde_json::to_string(s).expect("string")
}

fn yaml_value(v: &ParamValue) -> String {
    match v {
        ParamValue::Scalar(x) => format!("{x}"),
        ParamValue::Gradient(g) => format!("{g:?}"),
        ParamValue::Filtered(entries) => {
            let items: Vec<String> = entries
                .iter()
                .map(|(f, v)| match f {
                    Some(f) => format!("{{filter: {}, value: {}}}", quote(f), yaml_value(v)),
                    None => format!("{{value: {}}}", yaml_value(v)),
                })
                .collect();
            format!("[{}]", items.join(", "))
        }
    }
}

/// Returns a short model card naming the method, the models and the parameters.
pub fn model_card(job: &MergeJob) -> String {
    let c = &job.config;
    let mut s = String::new();
    let _ = writeln!(s, "---\ntags:\n- merge\n- gradmerge\n---\n");
    let _ = writeln!(s, "# Merged model\n");
    let _ = writeln!(s, "This model was made with [gradmerge](https://crates.io/crates/gradmerge) using the `{}` method.\n", c.method);
    if let Some(b) = &c.base_model {
        let _ = writeln!(s, "Base model: `{}`\n", b.display());
    }
    let _ = writeln!(s, "Models merged:\n");
    for m in &c.models {
        let _ = writeln!(s, "- `{}`", m.path.display());
    }
    let _ = writeln!(
        s,
        "\nThe configuration used is in `gradmerge_config.yml`:\n\n```yaml\n{}```",
        resolved_config_yaml(job, None)
    );
    s
}

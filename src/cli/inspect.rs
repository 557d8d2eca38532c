//! `gradmerge inspect`: tensors, dtypes, shapes, sizes and shards of a checkpoint.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use gradmerge::checkpoint::Checkpoint;
use gradmerge::source::IoMode;
use gradmerge::units::format_size;
use serde_json::{json, Value};

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A .safetensors file or a Hugging Face model folder.
    path: PathBuf,
    /// Print JSON for scripts instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &InspectArgs) -> anyhow::Result<()> {
    let ckpt = Checkpoint::open(&args.path, IoMode::Read)?;
    let rows: Vec<(String, String, Vec<u64>, u64, String)> = ckpt
        .names()
        .iter()
        .map(|name| {
            let (source, info) = ckpt.get(name).expect("listed name");
            let shard = source
                .path()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (
                name.clone(),
                info.dtype.to_string(),
                info.shape.clone(),
                info.size_bytes(),
                shard,
            )
        })
        .collect();
    let mut by_dtype: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (name, dtype, shape, bytes, _) in &rows {
        let _ = name;
        let entry = by_dtype.entry(dtype.clone()).or_default();
        entry.0 += shape.iter().product::<u64>();
        entry.1 += bytes;
    }
    let total_bytes: u64 = rows.iter().map(|r| r.3).sum();
    let total_elems: u64 = rows.iter().map(|r| r.2.iter().product::<u64>()).sum();
    let mut out = std::io::stdout().lock();

    if args.json {
        let shards: Vec<Value> = ckpt
            .sources()
            .iter()
            .map(|s| {
                let metadata: serde_json::Map<String, Value> = s
                    .header()
                    .metadata
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::from(v.clone())))
                    .collect();
                json!({
                    "path": s.path().display().to_string(),
                    "file_bytes": s.len_bytes(),
                    "tensors": s.header().tensors.len(),
                    "metadata": metadata,
                })
            })
            .collect();
        let tensors: Vec<Value> = rows
            .iter()
            .map(|(name, dtype, shape, bytes, shard)| json!({"name": name, "dtype": dtype, "shape": shape, "bytes": bytes, "shard": shard}))
            .collect();
        let doc = json!({
            "path": args.path.display().to_string(),
            "tensors": tensors,
            "shards": shards,
            "total": {"tensors": rows.len(), "elements": total_elems, "bytes": total_bytes},
            "by_dtype": by_dtype.iter().map(|(d, (e, b))| (d.clone(), json!({"elements": e, "bytes": b}))).collect::<serde_json::Map<_, _>>(),
        });
        serde_json::to_writer_pretty(&mut out, &doc)?;
        writeln!(out)?;
        return Ok(());
    }

    let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(4).max(4);
    let multi = ckpt.sources().len() > 1;
    writeln!(
        out,
        "{:width$}  {:7}  {:>20}  {:>12}{}",
        "name",
        "dtype",
        "shape",
        "bytes",
        if multi { "  shard" } else { "" }
    )?;
    for (name, dtype, shape, bytes, shard) in &rows {
        let shape = format!("{shape:?}");
        if multi {
            writeln!(
                out,
                "{name:width$}  {dtype:7}  {shape:>20}  {bytes:>12}  {shard}"
            )?;
        } else {
            writeln!(out, "{name:width$}  {dtype:7}  {shape:>20}  {bytes:>12}")?;
        }
    }
    writeln!(out)?;
    writeln!(
        out,
        "{} tensors, {} elements, {} ({} bytes) in {} file(s)",
        rows.len(),
        total_elems,
        format_size(total_bytes),
        total_bytes,
        ckpt.sources().len()
    )?;
    for (dtype, (elems, bytes)) in &by_dtype {
        writeln!(out, "  {dtype}: {elems} elements, {}", format_size(*bytes))?;
    }
    for s in ckpt.sources() {
        for (k, v) in &s.header().metadata {
            writeln!(
                out,
                "metadata {}: {k} = {v}",
                s.path()
                    .file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default()
            )?;
        }
    }
    Ok(())
}

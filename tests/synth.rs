//! Synthetic model families: layout, values, and merges of them through the library and
//! through `gradmerge bench`.

use std::path::Path;
use std::process::Command;

use gradmerge::config::{MergeConfig, ModelEntry, TokenizerSource};
use gradmerge::dtype::Dtype;
use gradmerge::job::MergeJob;
use gradmerge::method::{FisherNormalize, MethodKind, Rescale};
use gradmerge::params::{MergeParams, ParamValue};
use gradmerge::pipeline::EngineOptions;
use gradmerge::plan::PlanOptions;
use gradmerge::source::IoMode;
use gradmerge::synth::{generate, Family, FamilyOptions, Preset};
use safetensors::SafeTensors;
use tempfile::TempDir;

fn tiny_options() -> FamilyOptions {
    let mut options = FamilyOptions::new(Preset::LlamaTiny.architecture(), Dtype::BF16);
    // Small shards, so the family has an index like a real multi-shard checkpoint.
    options.shard_size_bytes = 100_000;
    options
}

fn bf16_values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
        .collect()
}

/// Every tensor of a sharded checkpoint folder, by name, as f32 values.
fn read_checkpoint(dir: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            assert_eq!(view.dtype(), safetensors::Dtype::BF16, "{name}");
            out.push((name, view.shape().to_vec(), bf16_values(view.data())));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn tiny_family_layout() {
    let dir = TempDir::new().unwrap();
    let options = tiny_options();
    let family = generate(&dir.path().join("family"), &options).unwrap();
    assert_eq!(family.models.len(), 2);
    assert_eq!(family.fishers.len(), 2);

    for folder in [&family.base, &family.models[0]] {
        assert!(folder.join("config.json").is_file(), "{}", folder.display());
        assert!(folder.join("model.safetensors.index.json").is_file());
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(family.base.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["num_hidden_layers"], 2);
    assert_eq!(config["torch_dtype"], "bfloat16");

    let ckpt = gradmerge::checkpoint::Checkpoint::open(&family.fishers[0], IoMode::Read).unwrap();
    assert_eq!(ckpt.metadata_value("fisher.examples"), Some("1000"));

    let mut expected = options.architecture.tensors();
    expected.sort();
    let base = read_checkpoint(&family.base);
    let names: Vec<(String, Vec<usize>)> = base
        .iter()
        .map(|(n, s, _)| (n.clone(), s.clone()))
        .collect();
    let expected: Vec<(String, Vec<usize>)> = expected
        .into_iter()
        .map(|(n, s)| (n, s.into_iter().map(|d| d as usize).collect()))
        .collect();
    assert_eq!(names, expected);
}

#[test]
fn tiny_family_values() {
    let dir = TempDir::new().unwrap();
    let options = tiny_options();
    let family = generate(&dir.path().join("family"), &options).unwrap();
    let base = read_checkpoint(&family.base);
    let model = read_checkpoint(&family.models[0]);
    let fisher = read_checkpoint(&family.fishers[0]);

    let mut differing = 0usize;
    for ((name, _, b), (_, _, m)) in base.iter().zip(&model) {
        for (&b, &m) in b.iter().zip(m) {
            // Noise of at most `noise`, plus the bf16 rounding (at most 2^-8 relative) of
            // the base and of the variant.
            let bound = options.noise + (b.abs() + m.abs()) / 256.0;
            assert!((m - b).abs() <= bound, "{name}: {b} vs {m}");
            differing += (m != b) as usize;
        }
    }
    assert!(differing > 0, "the variant equals the base");
    for (name, _, f) in &fisher {
        assert!(f.iter().all(|&x| x >= 0.0), "{name}: negative Fisher value");
        assert!(
            f.iter().all(|x| x.is_finite()),
            "{name}: non-finite Fisher value"
        );
    }
}

#[test]
fn generation_is_deterministic() {
    let dir = TempDir::new().unwrap();
    let options = tiny_options();
    let first = generate(&dir.path().join("a"), &options).unwrap();
    let second = generate(&dir.path().join("b"), &options).unwrap();
    let file = "model-00001-of-00003.safetensors";
    assert_eq!(
        std::fs::read(first.models[1].join(file)).unwrap(),
        std::fs::read(second.models[1].join(file)).unwrap()
    );
}

#[test]
fn generate_rejects_nonempty_folder() {
    let dir = TempDir::new().unwrap();
    std::fs::write(dir.path().join("keep.txt"), b"x").unwrap();
    let err = generate(dir.path(), &tiny_options()).unwrap_err();
    assert!(err.to_string().contains("not empty"), "{err}");
}

#[test]
fn sparse_family_reads_zeros() {
    let dir = TempDir::new().unwrap();
    let mut options = tiny_options();
    options.sparse = true;
    let family = generate(&dir.path().join("family"), &options).unwrap();
    let base = read_checkpoint(&family.base);
    assert_eq!(base.len(), options.architecture.tensors().len());
    for (name, _, values) in &base {
        assert!(values.iter().all(|&v| v == 0.0), "{name}");
    }
}

fn merge_config(kind: MethodKind, family: &Family, weight: f64) -> MergeConfig {
    let mut params = MergeParams {
        models: vec![Default::default(); family.models.len()],
        ..MergeParams::default()
    };
    params
        .global
        .insert("weight".into(), ParamValue::Scalar(weight));
    MergeConfig {
        method: kind,
        base_model: Some(family.base.clone()),
        base_fisher: None,
        models: family
            .models
            .iter()
            .enumerate()
            .map(|(m, path)| ModelEntry {
                path: path.clone(),
                fisher: kind.uses_fishers().then(|| family.fishers[m].clone()),
            })
            .collect(),
        params,
        dtype: None,
        out_dtype: None,
        tokenizer_source: TokenizerSource::Base,
        rescale: Rescale::L1,
        fisher_normalize: FisherNormalize::None,
        layer_range: None,
    }
}

#[test]
fn tiny_task_arithmetic_matches_formula() {
    let dir = TempDir::new().unwrap();
    let family = generate(&dir.path().join("family"), &tiny_options()).unwrap();
    let out = dir.path().join("merged");
    let config = merge_config(MethodKind::TaskArithmetic, &family, 0.5);
    let mut job = MergeJob::open(config, IoMode::Mmap, PlanOptions::default()).unwrap();
    job.run(Some((&out, false)), &EngineOptions::default(), None, &[])
        .unwrap();

    let merged = read_checkpoint(&out);
    let base = read_checkpoint(&family.base);
    let m1 = read_checkpoint(&family.models[0]);
    let m2 = read_checkpoint(&family.models[1]);
    assert_eq!(merged.len(), base.len());
    for i in 0..base.len() {
        let name = &base[i].0;
        assert_eq!(&merged[i].0, name);
        for j in 0..base[i].2.len() {
            let b = base[i].2[j];
            // The kernel's order of operations, in f32, rounded to bf16.
            let sum = 0.5 * (m1[i].2[j] - b) + 0.5 * (m2[i].2[j] - b);
            let want = gradmerge::convert::f32_to_bf16_bits(b + sum);
            let got = merged[i].2[j].to_bits() >> 16;
            assert_eq!(got as u16, want, "{name}[{j}]");
        }
    }
}

#[test]
fn tiny_gradmatch_reads_every_input() {
    let dir = TempDir::new().unwrap();
    let options = tiny_options();
    let family = generate(&dir.path().join("family"), &options).unwrap();
    let config = merge_config(MethodKind::GradMatch, &family, 1.0);
    let mut job = MergeJob::open(config, IoMode::Mmap, PlanOptions::default()).unwrap();
    let summary = job.run(None, &EngineOptions::default(), None, &[]).unwrap();
    assert_eq!(summary.tensors, options.architecture.tensors().len());
    assert_eq!(summary.bytes_read, 5 * options.checkpoint_bytes());
}

fn gradmerge(args: &[&str]) -> std::process::Output {
    let output = Command::new(env!("CARGO_BIN_EXE_gradmerge"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "gradmerge {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

#[test]
fn bench_cli_generates_and_merges() {
    let dir = TempDir::new().unwrap();
    let family = dir.path().join("family");
    let family = family.to_str().unwrap();
    gradmerge(&[
        "bench",
        "generate",
        "--out",
        family,
        "--preset",
        "llama-tiny",
    ]);

    for workload in [
        vec!["--method", "task_arithmetic"],
        vec!["--method", "ties"],
        vec!["--method", "gradmatch"],
        vec!["--method", "gradmatch", "--baseline", "copy"],
    ] {
        let mut args = vec!["bench", "run", "--family", family, "--json"];
        args.extend_from_slice(&workload);
        let output = gradmerge(&args);
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        let inputs = if workload.contains(&"gradmatch") {
            5
        } else {
            3
        };
        let checkpoint = tiny_options().checkpoint_bytes();
        assert_eq!(report["bytes_read"], inputs * checkpoint, "{workload:?}");
        assert!(
            report["peak_rss_bytes"].as_u64().unwrap() > 0,
            "{workload:?}"
        );
        assert!(report["seconds"].as_f64().unwrap() > 0.0, "{workload:?}");
    }

    let out = dir.path().join("merged");
    gradmerge(&[
        "bench",
        "run",
        "--family",
        family,
        "--method",
        "ties",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(out.join("model.safetensors").is_file());
}

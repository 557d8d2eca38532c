//! Configuration files, the command line and the files written beside the weights.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use gradmerge::dtype::Dtype;
use gradmerge::format::encode_header;
use gradmerge::params::{LayerPosition, ParamValue};
use safetensors::SafeTensors;

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(rel)
}

fn gradmerge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gradmerge"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run gradmerge")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn tensor_names(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    names
}

#[test]
fn every_example_runs() {
    let dir = tempfile::tempdir().unwrap();
    let mut count = 0;
    for entry in std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")).unwrap()
    {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yml") {
            continue;
        }
        let out = dir.path().join(path.file_stem().unwrap());
        let o = gradmerge(&[
            "merge",
            path.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "-q",
        ]);
        assert!(o.status.success(), "{}: {}", path.display(), stderr(&o));
        let weights = out.join("model.safetensors");
        assert!(!tensor_names(&weights).is_empty(), "{}", path.display());
        assert!(out.join("README.md").is_file());
        assert!(out.join("gradmerge_config.yml").is_file());
        count += 1;
    }
    assert!(count >= 11, "only {count} examples found");
}

/// The examples of mergekit's documentation, with local model paths.
const MERGEKIT_LINEAR: &str = "
models:
  - model: tests/data/gpt2-tiny/bf16/code
    parameters:
      weight: 1.0
  - model: tests/data/gpt2-tiny/bf16/c
    parameters:
      weight: 0.3
  - model: tests/data/gpt2-tiny/bf16/prose
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
";

const MERGEKIT_TASK_ARITHMETIC: &str = "
merge_method: task_arithmetic
base_model: tests/data/gpt2-tiny/bf16/base
models:
  - model: tests/data/gpt2-tiny/bf16/code
    parameters:
      weight: 0.7
  - model: tests/data/gpt2-tiny/bf16/prose
    parameters:
      weight: 0.3
dtype: bfloat16
";

const MERGEKIT_TIES: &str = "
models:
  - model: tests/data/gpt2-tiny/bf16/code
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: tests/data/gpt2-tiny/bf16/c
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: tests/data/gpt2-tiny/bf16/prose
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: tests/data/gpt2-tiny/bf16/base
parameters:
  normalize: true
  int8_mask: true
dtype: float16
";

const MERGEKIT_DARE_TIES: &str = "
models:
  - model: tests/data/gpt2-tiny/bf16/base
    # no parameters necessary for base model
  - model: tests/data/gpt2-tiny/bf16/code
    parameters:
      density: 0.53
      weight: 0.4
  - model: tests/data/gpt2-tiny/bf16/c
    parameters:
      density: 0.53
      weight: 0.3
  - model: tests/data/gpt2-tiny/bf16/prose
    parameters:
      density: 0.53
      weight: 0.3
merge_method: dare_ties
base_model: tests/data/gpt2-tiny/bf16/base
parameters:
  int8_mask: true
dtype: bfloat16
";

const MERGEKIT_SLERP: &str = "
slices:
  - sources:
      - model: tests/data/gpt2-tiny/bf16/base
        layer_range: [0, 2]
      - model: tests/data/gpt2-tiny/bf16/code
        layer_range: [0, 2]
merge_method: slerp
base_model: tests/data/gpt2-tiny/bf16/base
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: bfloat16
";

#[test]
fn mergekit_documentation_configs_run() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("linear", MERGEKIT_LINEAR, Dtype::F16),
        ("task_arithmetic", MERGEKIT_TASK_ARITHMETIC, Dtype::BF16),
        ("ties", MERGEKIT_TIES, Dtype::F16),
        ("dare_ties", MERGEKIT_DARE_TIES, Dtype::BF16),
        ("slerp", MERGEKIT_SLERP, Dtype::BF16),
    ];
    for (name, yaml, dtype) in cases {
        // Relative model paths resolve against the working directory, as in mergekit.
        let config = dir.path().join(format!("mergekit-{name}.yml"));
        std::fs::write(&config, yaml).unwrap();
        let out = dir.path().join(name);
        let o = gradmerge(&[
            "merge",
            config.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "-q",
        ]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let wte = st.tensor("transformer.wte.weight").unwrap();
        let expected = if dtype == Dtype::F16 {
            safetensors::Dtype::F16
        } else {
            safetensors::Dtype::BF16
        };
        assert_eq!(wte.dtype(), expected, "{name}");
        let config_json = std::fs::read_to_string(out.join("config.json")).unwrap();
        assert!(
            config_json.contains(dtype.torch_name().unwrap()),
            "{name}: {config_json}"
        );
    }
}

#[test]
fn filters_and_gradients_resolve_like_mergekit() {
    let yaml = MERGEKIT_TIES.replace("tests/data", "/d");
    let c = gradmerge::config::parse_yaml(&yaml, Path::new("ties.yml"), Path::new("/")).unwrap();
    // mergekit samples a gradient at t = layer / (num_layers - 1); embeddings take t = 0 and
    // tensors after the layers t = 1.
    let layers = 2;
    let at = |layer: Option<u64>| LayerPosition {
        layer,
        num_layers: layers,
    };
    let density = |m: usize, tensor: &str, layer| c.params.model(m, "density", tensor, at(layer));
    let weight = |m: usize, tensor: &str, layer| c.params.model(m, "weight", tensor, at(layer));

    // [1, 0.7, 0.1] at t = 0, 1 and the embedding (t = 0).
    assert_eq!(
        density(0, "transformer.h.0.attn.c_attn.weight", Some(0)),
        Some(1.0)
    );
    assert_eq!(
        density(0, "transformer.h.1.attn.c_attn.weight", Some(1)),
        Some(0.1)
    );
    assert_eq!(density(0, "transformer.wte.weight", None), Some(1.0));
    // [0, 0.3, 0.7, 1] at t = 1 (last layer, final norm) is 1.
    assert_eq!(
        weight(1, "transformer.h.1.mlp.c_fc.weight", Some(1)),
        Some(1.0)
    );
    assert_eq!(weight(1, "transformer.ln_f.weight", None), Some(1.0));
    // With four layers, layer 1 has t = 1/3: 0.3 exactly for the weight gradient.
    let four = LayerPosition {
        layer: Some(1),
        num_layers: 4,
    };
    let w = c
        .params
        .model(1, "weight", "model.layers.1.mlp.up_proj.weight", four)
        .unwrap();
    assert!((w - 0.3).abs() < 1e-12, "{w}");
    // And 1 - 1/3 of the way from 1 to 0.7 for [1, 0.7, 0.1]: t * 2 = 2/3.
    let d = c
        .params
        .model(0, "density", "model.layers.1.mlp.up_proj.weight", four)
        .unwrap();
    assert!((d - (1.0 + (0.7 - 1.0) * (2.0 / 3.0))).abs() < 1e-12, "{d}");
    // Filters: the first match wins, the entry without a filter is the fallback.
    assert_eq!(
        weight(2, "transformer.h.0.mlp.c_fc.weight", Some(0)),
        Some(0.5)
    );
    assert_eq!(
        weight(2, "transformer.h.0.attn.c_attn.weight", Some(0)),
        Some(0.0)
    );
    // Per-model values win over global ones; unset model values fall back to global.
    assert_eq!(
        c.params.global.get("normalize"),
        Some(&ParamValue::Scalar(1.0))
    );
    assert_eq!(c.params.model(0, "normalize", "x", at(None)), Some(1.0));
}

#[test]
fn flags_merge_matches_config_merge() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("flags");
    let b = dir.path().join("yaml");
    let o = gradmerge(&[
        "merge",
        "--method",
        "task_arithmetic",
        "--base",
        data("mlp-digits/f32/models/base.safetensors")
            .to_str()
            .unwrap(),
        "--model",
        data("mlp-digits/f32/models/rot30.safetensors")
            .to_str()
            .unwrap(),
        "--model",
        data("mlp-digits/f32/models/mirror.safetensors")
            .to_str()
            .unwrap(),
        "--model",
        data("mlp-digits/f32/models/shift.safetensors")
            .to_str()
            .unwrap(),
        "--model",
        data("mlp-digits/f32/models/thick.safetensors")
            .to_str()
            .unwrap(),
        "--weight",
        "0.5",
        "--out",
        a.to_str().unwrap(),
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = gradmerge(&[
        "merge",
        "examples/task_arithmetic.yml",
        "--out",
        b.to_str().unwrap(),
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let x = std::fs::read(a.join("model.safetensors")).unwrap();
    let y = std::fs::read(b.join("model.safetensors")).unwrap();
    assert_eq!(x, y);
}

#[test]
fn dry_run_prints_plan() {
    let o = gradmerge(&["merge", "examples/ties.yml", "--dry-run"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("method: ties"), "{text}");
    assert!(text.contains("tensors: 28 out"), "{text}");
    assert!(text.contains("1 shard"), "{text}");
    assert!(text.contains("memory budget"), "{text}");
    assert!(text.contains("density"), "{text}");
}

#[test]
fn dry_run_normalized_weights() {
    let o = gradmerge(&["merge", "examples/linear.yml", "--dry-run"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("effective 0.3333"), "{text}");
}

/// Writes a copy of a single-file checkpoint without the tensors in `drop`.
fn copy_without(src: &Path, dst: &Path, drop: &[&str]) {
    let bytes = std::fs::read(src).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut kept: Vec<(String, Dtype, Vec<u64>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        if drop.contains(&name.as_str()) {
            continue;
        }
        let dtype = Dtype::from_header_name(&format!("{:?}", view.dtype())).unwrap();
        let shape = view.shape().iter().map(|&d| d as u64).collect();
        kept.push((name, dtype, shape, view.data().to_vec()));
    }
    kept.sort_by(|a, b| a.0.cmp(&b.0));
    let entries: Vec<(&str, Dtype, &[u64])> = kept
        .iter()
        .map(|(n, d, s, _)| (n.as_str(), *d, s.as_slice()))
        .collect();
    let (mut out, _) = encode_header(&entries, &[]);
    for (_, _, _, data) in &kept {
        out.extend_from_slice(data);
    }
    std::fs::write(dst, out).unwrap();
}

#[test]
fn dry_run_lists_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let m = |n: &str| data(&format!("mlp-digits/f32/models/{n}.safetensors"));
    let f = |n: &str| data(&format!("mlp-digits/f32/fishers/{n}.safetensors"));
    let a = dir.path().join("a.safetensors");
    let b = dir.path().join("b.safetensors");
    let fa = dir.path().join("fa.safetensors");
    copy_without(&m("rot30"), &a, &["layers.0.bias"]);
    copy_without(&m("mirror"), &b, &["layers.2.weight"]);
    copy_without(&f("rot30"), &fa, &["layers.1.bias"]);
    let o = gradmerge(&[
        "merge",
        "--method",
        "gradmatch",
        "--base",
        m("base").to_str().unwrap(),
        "--model",
        a.to_str().unwrap(),
        "--fisher",
        fa.to_str().unwrap(),
        "--model",
        b.to_str().unwrap(),
        "--fisher",
        f("mirror").to_str().unwrap(),
        "--dry-run",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("`layers.0.bias` is missing from"), "{err}");
    assert!(err.contains("`layers.2.weight` is missing from"), "{err}");
    assert!(err.contains("has no tensor `layers.1.bias`"), "{err}");
    assert!(err.contains("3 problems"), "{err}");
}

#[test]
fn exit_codes_distinguish_usage_from_failure() {
    let o = gradmerge(&[
        "merge",
        "--method",
        "dare-ties",
        "--model",
        "x",
        "--dry-run",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("did you mean `dare_ties`"),
        "{}",
        stderr(&o)
    );

    let o = gradmerge(&["merge", "--no-such-flag"]);
    assert_eq!(o.status.code(), Some(2));

    let o = gradmerge(&[
        "merge",
        "--method",
        "linear",
        "--model",
        "/nonexistent/model",
        "--dry-run",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("/nonexistent/model: not found"),
        "{}",
        stderr(&o)
    );

    let o = gradmerge(&["inspect", "/nonexistent/model"]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn unknown_config_key_names_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.yml");
    std::fs::write(
        &config,
        "merge_method: linear\nmodels:\n  - model: a\n    paramters:\n      weight: 1\n",
    )
    .unwrap();
    let o = gradmerge(&["merge", config.to_str().unwrap(), "--dry-run"]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.contains("line 4"), "{err}");
    assert!(err.contains("did you mean `parameters`"), "{err}");
}

#[test]
fn tied_embeddings_write_no_head() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = gradmerge(&[
        "merge",
        "examples/task_arithmetic_negation.yml",
        "--out",
        out.to_str().unwrap(),
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let names = tensor_names(&out.join("model.safetensors"));
    assert!(!names.iter().any(|n| n == "lm_head.weight"), "{names:?}");
    assert_eq!(
        names,
        tensor_names(&data("gpt2-tiny/bf16/base/model.safetensors"))
    );
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_ne!(
        config["tie_word_embeddings"],
        serde_json::Value::Bool(false)
    );
}

#[test]
fn side_files_and_dtype_update() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = gradmerge(&[
        "merge",
        "--method",
        "linear",
        "--model",
        data("gpt2-tiny/f32/code").to_str().unwrap(),
        "--model",
        data("gpt2-tiny/f32/prose").to_str().unwrap(),
        "--out-dtype",
        "bfloat16",
        "--out",
        out.to_str().unwrap(),
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["dtype"], "bfloat16", "{config}");
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("`linear`"), "{card}");
}

#[test]
fn sharded_output_with_index() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = gradmerge(&[
        "merge",
        "--method",
        "task_arithmetic",
        "--base",
        data("gpt2-tiny/bf16-sharded/base").to_str().unwrap(),
        "--model",
        data("gpt2-tiny/bf16/code").to_str().unwrap(),
        "--shard-size",
        "100K",
        "--out",
        out.to_str().unwrap(),
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), 28);
    let total: u64 = index["metadata"]["total_size"].as_u64().unwrap();
    assert_eq!(total, 141_056 * 2);
    let shards: std::collections::BTreeSet<&str> =
        map.values().map(|v| v.as_str().unwrap()).collect();
    assert!(shards.len() >= 3, "{shards:?}");
    for s in &shards {
        assert!(
            s.starts_with("model-0000") && s.contains(&format!("-of-{:05}", shards.len())),
            "{s}"
        );
    }
}

#[test]
fn verbosity_levels() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("v");
    let o = gradmerge(&[
        "merge",
        "examples/task_arithmetic.yml",
        "--out",
        out.to_str().unwrap(),
        "-v",
    ]);
    assert!(o.status.success());
    let err = stderr(&o);
    assert!(err.contains("threads, chunks of"), "{err}");
    assert!(
        !err.contains("inputs,"),
        "-v must not log per tensor: {err}"
    );
    assert!(err.contains("merged 6 tensors"), "{err}");

    let out = dir.path().join("vv");
    let o = gradmerge(&[
        "merge",
        "examples/task_arithmetic.yml",
        "--out",
        out.to_str().unwrap(),
        "-vv",
    ]);
    assert!(stderr(&o).contains("`layers.0.weight`"), "{}", stderr(&o));

    let out = dir.path().join("q");
    let o = gradmerge(&[
        "merge",
        "examples/task_arithmetic.yml",
        "--out",
        out.to_str().unwrap(),
        "-q",
    ]);
    assert!(o.status.success());
    assert_eq!(stderr(&o), "");
}

#[test]
fn report_lists_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let report = dir.path().join("report.json");
    let o = gradmerge(&[
        "merge",
        "examples/ties.yml",
        "--out",
        out.to_str().unwrap(),
        "-q",
        "--report",
        report.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["tensors"], 28);
    assert!(r["peak_rss_bytes"].as_u64().unwrap() > 0);
    let first = &r["per_tensor"][0];
    let kept = first["fraction_kept"].as_f64().unwrap();
    assert!(kept > 0.29, "{first}");
    assert!(kept <= 0.5, "{first}");
    let norms = first["task_vector_norms"].as_array().unwrap();
    assert_eq!(norms.len(), 3, "{first}");
    assert!(norms.iter().all(|n| n.as_f64().unwrap() > 0.0), "{first}");
}

/// Copies a gpt2-tiny bf16 model folder, appending `extra` rows to `transformer.wte.weight`.
/// Row `r` of the new rows contains the bf16 value `r + 1` in every column.
fn gpt2_with_extra_rows(model: &str, extra: u64, dst: &Path) {
    let src = data(&format!("gpt2-tiny/bf16/{model}"));
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() != "model.safetensors" {
            std::fs::copy(&path, dst.join(path.file_name().unwrap())).unwrap();
        }
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<u64>, Vec<u8>, usize)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let shape: Vec<u64> = v.shape().iter().map(|&d| d as u64).collect();
            let offset = v.data().as_ptr() as usize - bytes.as_ptr() as usize;
            (n, shape, v.data().to_vec(), offset)
        })
        .collect();
    tensors.sort_by_key(|t| t.3);
    for (name, shape, data, _) in &mut tensors {
        if name == "transformer.wte.weight" {
            for r in 0..extra {
                let value = half::bf16::from_f32((r + 1) as f32).to_bits().to_le_bytes();
                for _ in 0..shape[1] {
                    data.extend_from_slice(&value);
                }
            }
            shape[0] += extra;
        }
    }
    let entries: Vec<(&str, Dtype, &[u64])> = tensors
        .iter()
        .map(|(n, s, _, _)| (n.as_str(), Dtype::BF16, s.as_slice()))
        .collect();
    let (mut out, _) = encode_header(&entries, &[("format".into(), "pt".into())]);
    for (_, _, data, _) in &tensors {
        out.extend_from_slice(data);
    }
    std::fs::write(dst.join("model.safetensors"), out).unwrap();
}

fn read_tensor(path: &Path, name: &str) -> (Vec<usize>, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    (t.shape().to_vec(), t.data().to_vec())
}

#[test]
fn vocab_mismatch_needs_policy() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("code-520");
    gpt2_with_extra_rows("code", 8, &big);
    let out = dir.path().join("out");
    let base = data("gpt2-tiny/bf16/base");
    let prose = data("gpt2-tiny/bf16/prose");
    let args = |policy: Option<&str>, out: &Path| {
        let mut a = vec![
            "merge".to_string(),
            "--method".into(),
            "task_arithmetic".into(),
            "--base".into(),
            base.display().to_string(),
            "--model".into(),
            big.display().to_string(),
            "--model".into(),
            prose.display().to_string(),
            "--out".into(),
            out.display().to_string(),
            "-q".into(),
        ];
        if let Some(p) = policy {
            a.extend(["--vocab-policy".to_string(), p.to_string()]);
        }
        a
    };
    let run = |a: Vec<String>| gradmerge(&a.iter().map(String::as_str).collect::<Vec<_>>());

    // Without a policy: an error with both shapes and the choices, and no output.
    let o = run(args(None, &out));
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("[520, 64]") && err.contains("[512, 64]"),
        "{err}"
    );
    assert!(
        err.contains("--vocab-policy base") && err.contains("--vocab-policy fill"),
        "{err}"
    );
    assert!(!out.exists());

    // fill: 520 rows; the new rows come from the only model that has them.
    let fill = dir.path().join("fill");
    let o = run(args(Some("fill"), &fill));
    assert!(o.status.success(), "{}", stderr(&o));
    let (shape, bytes) = read_tensor(&fill.join("model.safetensors"), "transformer.wte.weight");
    assert_eq!(shape, vec![520, 64]);
    let (_, donor) = read_tensor(&big.join("model.safetensors"), "transformer.wte.weight");
    assert_eq!(&bytes[512 * 64 * 2..], &donor[512 * 64 * 2..]);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fill.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["vocab_size"], 520);

    // base: 512 rows, the same as merging the model without its extra rows.
    let keep = dir.path().join("base");
    let o = run(args(Some("base"), &keep));
    assert!(o.status.success(), "{}", stderr(&o));
    let plain = dir.path().join("plain");
    let o = gradmerge(&[
        "merge",
        "--method",
        "task_arithmetic",
        "--base",
        base.to_str().unwrap(),
        "--model",
        data("gpt2-tiny/bf16/code").to_str().unwrap(),
        "--model",
        prose.to_str().unwrap(),
        "--out",
        plain.to_str().unwrap(),
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(keep.join("model.safetensors")).unwrap(),
        std::fs::read(plain.join("model.safetensors")).unwrap()
    );
}

#[test]
fn dry_run_checks_parameters() {
    let o = gradmerge(&[
        "merge",
        "examples/dare_linear.yml",
        "--dry-run",
        "-p",
        "density=2",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("density of model 1 = 2 is outside (0, 1]"),
        "{}",
        stderr(&o)
    );

    let o = gradmerge(&[
        "merge",
        "examples/gradmatch.yml",
        "--dry-run",
        "-p",
        "delta=0",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("delta = 0"), "{}", stderr(&o));
}

#[test]
fn threads_flag_is_bounded() {
    let o = gradmerge(&[
        "merge",
        "examples/task_arithmetic.yml",
        "--dry-run",
        "--threads",
        "100000",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--threads 100000"), "{}", stderr(&o));
    let o = gradmerge(&[
        "merge",
        "examples/task_arithmetic.yml",
        "--dry-run",
        "--threads",
        "0",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn tokenizer_source_is_protected() {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("tok");
    std::fs::create_dir(&tok).unwrap();
    std::fs::copy(
        data("gpt2-tiny/bf16/c/tokenizer.json"),
        tok.join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(tok.join("model.safetensors"), b"keep me").unwrap();
    let o = gradmerge(&[
        "merge",
        "--method",
        "linear",
        "--model",
        data("gpt2-tiny/bf16/code").to_str().unwrap(),
        "--tokenizer-source",
        tok.to_str().unwrap(),
        "--out",
        tok.to_str().unwrap(),
        "--force",
        "-q",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("write the output somewhere else"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read(tok.join("model.safetensors")).unwrap(),
        b"keep me"
    );

    let o = gradmerge(&[
        "merge",
        "--method",
        "linear",
        "--model",
        data("gpt2-tiny/bf16/code").to_str().unwrap(),
        "--tokenizer-source",
        "/nonexistent/tok",
        "--dry-run",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn closed_stderr_keeps_success() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut child = Command::new(env!("CARGO_BIN_EXE_gradmerge"))
        .args([
            "merge",
            "examples/task_arithmetic.yml",
            "--out",
            out.to_str().unwrap(),
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Close the reading end before the summary is written.
    drop(child.stderr.take());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(out.join("model.safetensors").is_file());
}

#[test]
fn empty_checkpoint_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.safetensors");
    let (bytes, _) = encode_header(&[], &[("format".into(), "pt".into())]);
    std::fs::write(&empty, bytes).unwrap();
    let o = gradmerge(&[
        "merge",
        "--method",
        "linear",
        "--model",
        empty.to_str().unwrap(),
        "--dry-run",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("contains no tensors"), "{}", stderr(&o));
}

#[test]
fn report_folder_checked_first() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = gradmerge(&[
        "merge",
        "examples/task_arithmetic.yml",
        "--out",
        out.to_str().unwrap(),
        "--report",
        "/nonexistent/dir/report.json",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(!out.exists());
}

#[test]
fn parent_folder_output_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let o = gradmerge(&[
        "merge",
        "examples/task_arithmetic.yml",
        "--out",
        sub.join("..").to_str().unwrap(),
        "--force",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("does not name a folder"),
        "{}",
        stderr(&o)
    );
    assert!(sub.is_dir());
}

#[test]
fn non_finite_parameters_rejected() {
    for (param, shown) in [("weight=nan", "is NaN"), ("lambda=inf", "is inf")] {
        let o = gradmerge(&[
            "merge",
            "examples/task_arithmetic.yml",
            "--dry-run",
            "-p",
            param,
        ]);
        assert_eq!(o.status.code(), Some(2), "{param}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(shown) && stderr(&o).contains("finite number"),
            "{param}: {}",
            stderr(&o)
        );
    }
}

#[test]
fn partial_slice_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("partial.yml");
    std::fs::write(&config, MERGEKIT_SLERP.replace("[0, 2]", "[0, 1]")).unwrap();
    let out = dir.path().join("out");
    let o = gradmerge(&[
        "merge",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("layer_range [0, 1] does not cover the 2 layers")
            && stderr(&o).contains("layer_range: [0, 2]"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
}

#[test]
fn fisher_without_examples_warns() {
    // The same Fisher as tests/data's `code` Fisher, without its metadata.
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(data("gpt2-tiny/fishers/code/model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let fisher = dir.path().join("fisher-code");
    std::fs::create_dir(&fisher).unwrap();
    safetensors::serialize_to_file(st.tensors(), None, &fisher.join("model.safetensors")).unwrap();

    let yaml = std::fs::read_to_string("examples/gradmatch_gpt2.yml")
        .unwrap()
        .replace(
            "fisher: tests/data/gpt2-tiny/fishers/code",
            &format!("fisher: {}", fisher.display()),
        );
    let config = dir.path().join("gradmatch.yml");
    std::fs::write(&config, yaml).unwrap();
    let o = gradmerge(&["merge", config.to_str().unwrap(), "--dry-run"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("has no fisher.examples metadata, so model 1's Fisher is scaled by 1"),
        "{}",
        stderr(&o)
    );
    // An explicit fisher_scale silences the warning.
    let o = gradmerge(&[
        "merge",
        config.to_str().unwrap(),
        "--dry-run",
        "-p",
        "fisher_scale=100",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("fisher.examples"), "{}", stderr(&o));
}

#[test]
fn report_path_checked_first() {
    let dir = tempfile::tempdir().unwrap();
    // A private copy of an input model, so that a wrong write would show.
    let model = dir.path().join("code");
    std::fs::create_dir(&model).unwrap();
    for f in ["model.safetensors", "config.json"] {
        std::fs::copy(data("gpt2-tiny/bf16/code").join(f), model.join(f)).unwrap();
    }
    let original = std::fs::read(model.join("model.safetensors")).unwrap();
    let out = dir.path().join("out");
    let merge = |report: &Path| {
        gradmerge(&[
            "merge",
            "--method",
            "task_arithmetic",
            "--base",
            data("gpt2-tiny/bf16/base").to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "-q",
            "--report",
            report.to_str().unwrap(),
        ])
    };

    // Into an input: rejected, and the input is untouched.
    let o = merge(&model.join("model.safetensors"));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--report"), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(model.join("model.safetensors")).unwrap(),
        original
    );
    assert!(!out.exists());

    // A folder: rejected before merging.
    let o = merge(dir.path());
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("is a folder"), "{}", stderr(&o));
    assert!(!out.exists());

    // Inside the output folder, which the merge creates: accepted.
    let o = merge(&out.join("report.json"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.join("report.json").is_file());
}

#[test]
fn output_rejects_current_folder() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(sub.join("keep.txt"), "mine").unwrap();
    for out in ["../sub", "."] {
        let o = Command::new(env!("CARGO_BIN_EXE_gradmerge"))
            .args([
                "merge",
                "--method",
                "task_arithmetic",
                "--base",
                data("gpt2-tiny/bf16/base").to_str().unwrap(),
                "--model",
                data("gpt2-tiny/bf16/code").to_str().unwrap(),
                "--out",
                out,
                "--force",
                "-q",
            ])
            .current_dir(&sub)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{out}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("current folder"),
            "{out}: {}",
            stderr(&o)
        );
        assert_eq!(
            std::fs::read_to_string(sub.join("keep.txt")).unwrap(),
            "mine"
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["sub"], "{out}: leftovers {names:?}");
    }
}

#[test]
fn index_and_hub_id_advice() {
    let o = gradmerge(&[
        "inspect",
        "tests/data/gpt2-tiny/bf16-sharded/base/model.safetensors.index.json",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("is a shard index, not a checkpoint file; pass the folder"),
        "{}",
        stderr(&o)
    );
    let o = gradmerge(&["inspect", "some-org/some-model"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("never downloads"), "{}", stderr(&o));
}

#[test]
fn positional_output_like_mergekit() {
    let dir = tempfile::tempdir().unwrap();
    let positional = dir.path().join("positional");
    let flag = dir.path().join("flag");
    let o = gradmerge(&[
        "merge",
        "examples/task_arithmetic_gpt2.yml",
        positional.to_str().unwrap(),
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = gradmerge(&[
        "merge",
        "examples/task_arithmetic_gpt2.yml",
        "--out",
        flag.to_str().unwrap(),
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(positional.join("model.safetensors")).unwrap(),
        std::fs::read(flag.join("model.safetensors")).unwrap()
    );
    // Both at once is ambiguous.
    let o = gradmerge(&[
        "merge",
        "examples/task_arithmetic_gpt2.yml",
        positional.to_str().unwrap(),
        "--out",
        flag.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn report_spares_config_and_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let cfg_dir = dir.path().join("cfg");
    std::fs::create_dir(&cfg_dir).unwrap();
    let config = cfg_dir.join("ta.yml");
    let yaml = std::fs::read_to_string("examples/task_arithmetic_gpt2.yml")
        .unwrap()
        .replace(
            "tests/data",
            data("").to_str().unwrap().trim_end_matches('/'),
        );
    std::fs::write(&config, &yaml).unwrap();
    let out = dir.path().join("out");
    let merge = |extra: &[&str]| {
        let mut args = vec!["merge", config.to_str().unwrap(), "-q"];
        args.extend_from_slice(extra);
        gradmerge(&args)
    };
    let out_s = out.to_str().unwrap();
    let cases: [(Vec<String>, &str); 4] = [
        (
            vec![
                "--out".into(),
                out_s.into(),
                "--report".into(),
                config.display().to_string(),
            ],
            "--report",
        ),
        (
            vec![
                "--out".into(),
                out_s.into(),
                "--report".into(),
                out.join("model.safetensors").display().to_string(),
            ],
            "writes a file of that name",
        ),
        (
            vec![
                "--out".into(),
                out_s.into(),
                "--report".into(),
                out_s.into(),
            ],
            "is the output folder",
        ),
        (
            vec![
                "--out".into(),
                cfg_dir.display().to_string(),
                "--force".into(),
            ],
            "write the output somewhere else",
        ),
    ];
    for (args, expected) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = merge(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(expected), "{args:?}: {}", stderr(&o));
        assert_eq!(std::fs::read_to_string(&config).unwrap(), yaml, "{args:?}");
        assert!(!out.exists(), "{args:?}");
    }

    // A symbolic link to nothing is rejected with a fix.
    let link = dir.path().join("dangling");
    std::os::unix::fs::symlink(dir.path().join("nowhere"), &link).unwrap();
    let o = merge(&["--out", link.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("does not exist; create that folder"),
        "{}",
        stderr(&o)
    );
}

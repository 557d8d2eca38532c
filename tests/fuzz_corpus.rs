//! Replays every file of the fuzz corpora (`fuzz/corpus/<target>/`) through the entry
//! points of the fuzz targets, so stable Rust checks that none of them panics.
//!
//! The seed files are written by the ignored test `write_seed_corpus`:
//!
//!     cargo test --release --test fuzz_corpus -- --ignored write_seed_corpus

mod common_errors;

#[path = "../fuzz/src/lib.rs"]
mod fuzz_entries;

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use common_errors::*;
use gradmerge::dtype::Dtype;
use gradmerge::format::encode_index;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

/// Runs `entry` on every file of the target's corpus and fails naming each file that
/// panics.
fn replay(target: &str, entry: fn(&[u8])) {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(
        files.len() >= 10,
        "{}: only {} files",
        dir.display(),
        files.len()
    );

    let mut panicked = Vec::new();
    for file in &files {
        let bytes = fs::read(file).unwrap();
        if catch_unwind(AssertUnwindSafe(|| entry(&bytes))).is_err() {
            panicked.push(file.display().to_string());
        }
    }
    assert!(panicked.is_empty(), "{target}: panicked on {panicked:#?}");
}

#[test]
fn header_corpus() {
    replay("header", fuzz_entries::header);
}

#[test]
fn index_corpus() {
    replay("index", fuzz_entries::index);
}

#[test]
fn config_corpus() {
    replay("config", fuzz_entries::config);
}

#[test]
fn merge_corpus() {
    replay("merge", fuzz_entries::merge);
}

// Seed corpus generation.

fn write_seed(target: &str, name: &str, bytes: &[u8]) {
    write_file(&corpus_dir(target).join(name), bytes);
}

/// Returns the length prefix and JSON header of a file, without its data.
fn header_only(path: &Path) -> Vec<u8> {
    let bytes = fs::read(path).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[..8 + len].to_vec()
}

fn header_seeds() {
    let t = "header";
    write_seed(
        t,
        "real-mlp-f32-fisher",
        &fs::read(data("mlp-digits/f32/fishers/base.safetensors")).unwrap(),
    );
    for (name, path) in [
        (
            "real-gpt2-shard1-header",
            "gpt2-tiny/bf16-sharded/base/model-00001-of-00006.safetensors",
        ),
        (
            "real-gpt2-shard4-header",
            "gpt2-tiny/bf16-sharded/code/model-00004-of-00006.safetensors",
        ),
        (
            "real-gpt2-f32-header",
            "gpt2-tiny/f32/base/model.safetensors",
        ),
        (
            "real-mlp-bf16-header",
            "mlp-digits/bf16/models/rot30.safetensors",
        ),
    ] {
        write_seed(t, name, &header_only(&data(path)));
    }

    let every_dtype: Vec<TensorSpec> = Dtype::ALL
        .iter()
        .enumerate()
        .map(|(i, &dtype)| TensorSpec {
            name: format!("t{i}.{dtype}"),
            dtype,
            shape: vec![2, 1],
            data: vec![i as u8; 2 * dtype.size_bytes()],
        })
        .collect();
    write_seed(
        t,
        "valid-every-dtype",
        &safetensors_bytes(&every_dtype, &[]),
    );
    write_seed(
        t,
        "valid-metadata",
        &safetensors_bytes(
            &small_model(1.0),
            &[
                ("format", "pt"),
                ("fisher.examples", "128"),
                ("ünï", "çødé"),
            ],
        ),
    );
    let zero_sized = [
        f32_tensor("empty", &[0, 3], &[]),
        f32_tensor("scalar", &[], &[1.5]),
        f32_tensor("also_empty", &[4, 0], &[]),
    ];
    write_seed(t, "valid-zero-sized", &safetensors_bytes(&zero_sized, &[]));
    write_seed(t, "valid-empty-object", &raw_file("{}", &[]));
    let raw_cases: [(&str, &str, usize); 16] = [
        ("metadata-only", r#"{"__metadata__":{"format":"pt"}}"#, 0),
        (
            "metadata-null",
            r#"{"__metadata__":null,"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
            1,
        ),
        ("metadata-not-string", r#"{"__metadata__":{"n":1}}"#, 0),
        (
            "duplicate-keys",
            r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#,
            2,
        ),
        (
            "leading-whitespace",
            "\n\t {\"a\":{\"dtype\":\"I8\",\"shape\":[3],\"data_offsets\":[0,3]}}",
            3,
        ),
        (
            "overlap",
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            12,
        ),
        (
            "gap",
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#,
            12,
        ),
        (
            "trailing-bytes",
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            9,
        ),
        (
            "out-of-bounds",
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[400,404]}}"#,
            8,
        ),
        (
            "unknown-dtype",
            r#"{"a":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}}"#,
            1,
        ),
        (
            "shape-overflow",
            r#"{"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#,
            8,
        ),
        (
            "huge-offsets",
            r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[18446744073709551615,18446744073709551615]}}"#,
            0,
        ),
        (
            "negative-shape",
            r#"{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}"#,
            1,
        ),
        (
            "float-shape",
            r#"{"a":{"dtype":"U8","shape":[1.0],"data_offsets":[0,1]}}"#,
            1,
        ),
        (
            "three-offsets",
            r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}}"#,
            1,
        ),
        ("not-object", "[1,2,3]", 0),
    ];
    for (name, json, data_len) in raw_cases {
        write_seed(t, name, &raw_file(json, &vec![7; data_len]));
    }
    let mut not_utf8 = raw_file(r#"{"a":1}"#, &[]);
    not_utf8[10] = 0xc3;
    write_seed(t, "not-utf8", &not_utf8);
    write_seed(t, "empty-file", &[]);
    write_seed(t, "short-prefix", &[8, 0, 0]);
    let mut huge = u64::MAX.to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    write_seed(t, "huge-length", &huge);
    write_seed(
        t,
        "lfs-pointer",
        b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n",
    );
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    write_seed(t, "deep-nesting", &raw_file(&deep, &[]));
}

fn index_seeds() {
    let t = "index";
    write_seed(
        t,
        "real-gpt2-index",
        &fs::read(data(
            "gpt2-tiny/bf16-sharded/base/model.safetensors.index.json",
        ))
        .unwrap(),
    );
    let map = vec![
        (
            "a".to_string(),
            "model-00001-of-00002.safetensors".to_string(),
        ),
        (
            "b".to_string(),
            "model-00002-of-00002.safetensors".to_string(),
        ),
    ];
    write_seed(t, "valid-encoded", &encode_index(12, &map));
    let cases: [(&str, &str); 16] = [
        ("minimal", r#"{"weight_map":{"a":"x.safetensors"}}"#),
        ("empty-map", r#"{"weight_map":{}}"#),
        (
            "total-float",
            r#"{"metadata":{"total_size":1234.0},"weight_map":{"a":"x"}}"#,
        ),
        (
            "total-negative",
            r#"{"metadata":{"total_size":-1},"weight_map":{"a":"x"}}"#,
        ),
        (
            "total-huge",
            r#"{"metadata":{"total_size":1e300},"weight_map":{"a":"x"}}"#,
        ),
        (
            "total-string",
            r#"{"metadata":{"total_size":"12"},"weight_map":{"a":"x"}}"#,
        ),
        (
            "metadata-array",
            r#"{"metadata":[],"weight_map":{"a":"x"}}"#,
        ),
        ("missing-map", r#"{"metadata":{}}"#),
        ("map-array", r#"{"weight_map":["a","x"]}"#),
        ("shard-number", r#"{"weight_map":{"a":1}}"#),
        ("shard-parent", r#"{"weight_map":{"a":"../x.safetensors"}}"#),
        (
            "shard-nested",
            r#"{"weight_map":{"a":"sub/x.safetensors"}}"#,
        ),
        ("shard-empty", r#"{"weight_map":{"a":""}}"#),
        ("shard-nul", r#"{"weight_map":{"a":"x\u0000y"}}"#),
        ("duplicate-tensor", r#"{"weight_map":{"a":"x","a":"y"}}"#),
        ("not-object", "[]"),
    ];
    for (name, json) in cases {
        write_seed(t, name, json.as_bytes());
    }
    write_seed(t, "empty-file", b"");
    write_seed(
        t,
        "lfs-pointer",
        b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n",
    );
    write_seed(t, "not-utf8", b"{\"weight_map\":{\"\xff\":\"x\"}}");
}

fn config_seeds() {
    let t = "config";
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    if let Ok(entries) = fs::read_dir(&examples) {
        for entry in entries {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yml") {
                let name = format!("example-{}", path.file_stem().unwrap().to_string_lossy());
                write_seed(t, &name, &fs::read(&path).unwrap());
            }
        }
    }
    let cases: [(&str, &str); 16] = [
        ("ties-base-listed", "models:\n  - model: base\n  - model: a\n    parameters:\n      density: 0.5\n      weight: 0.5\nmerge_method: ties\nbase_model: base\nparameters:\n  normalize: true\ndtype: float16\n"),
        ("slerp-slices", "slices:\n  - sources:\n      - model: a\n        layer_range: [0, 32]\n      - model: b\n        layer_range: [0, 32]\nmerge_method: slerp\nbase_model: a\nparameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n    - value: 0.5\ndtype: bfloat16\n"),
        ("gradmatch-fishers", "merge_method: gradmatch\nbase_model: base\nbase_fisher: fb\nmodels:\n  - model: a\n    fisher: fa\n    parameters:\n      weight: -0.5\n      fisher_scale: 100\nparameters:\n  delta: 1e-8\nout_dtype: float32\n"),
        ("fisher-normalize", "merge_method: fisher\nmodels:\n  - model: a\n    fisher: fa\nparameters:\n  fisher_normalize: l2\n  epsilon: 0\n"),
        ("dare-rescale", "merge_method: dare_ties\nbase_model: b\nmodels:\n  - model: a\nparameters:\n  density: 0.3\n  rescale: density\n  seed: 7\n"),
        ("unknown-key", "merge_method: linear\nmodels:\n  - model: a\nbase_modle: b\n"),
        ("unknown-method", "merge_method: dare-ties\nmodels:\n  - model: a\n"),
        ("unknown-parameter", "merge_method: ties\nmodels:\n  - model: a\n    parameters:\n      densty: 0.5\n"),
        ("wrong-type", "merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: heavy\n"),
        ("two-slices", "merge_method: linear\nslices:\n  - sources:\n      - model: a\n  - sources:\n      - model: b\n"),
        ("union-tokenizer", "merge_method: linear\nmodels:\n  - model: a\ntokenizer_source: union\n"),
        ("empty-list", "merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: []\n"),
        ("anchors", "merge_method: linear\nmodels:\n  - &m {model: a, parameters: {weight: 1}}\n  - *m\n"),
        ("not-a-map", "- merge_method\n- linear\n"),
        ("empty", ""),
        ("tab-and-nul", "merge_method:\t\u{0}linear\n"),
    ];
    for (name, yaml) in cases {
        write_seed(t, name, yaml.as_bytes());
    }
    let deep = format!(
        "merge_method: linear\nparameters:\n  w: {}{}\n",
        "[".repeat(300),
        "]".repeat(300)
    );
    write_seed(t, "deep-nesting", deep.as_bytes());
    let mut aliases = String::from("a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1]\n");
    for i in 1..8 {
        let p = i - 1;
        aliases.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    aliases.push_str("merge_method: linear\n");
    write_seed(t, "alias-expansion", aliases.as_bytes());
}

/// A merge target input: method byte, options byte, first file length, both files.
fn merge_input(method: u8, options: u8, first: &[u8], second: &[u8]) -> Vec<u8> {
    let mut bytes = vec![method, options];
    bytes.extend_from_slice(&(first.len() as u16).to_le_bytes());
    bytes.extend_from_slice(first);
    bytes.extend_from_slice(second);
    bytes
}

fn merge_seeds() {
    let t = "merge";
    let a = safetensors_bytes(&small_model(1.0), &[]);
    let b = safetensors_bytes(&small_model(-2.0), &[]);

    // Every method, into a folder, with several options.
    for method in 0..9u8 {
        let options = 0b10 | (method % 2) | ((method % 4) << 2) | (method << 4);
        write_seed(
            t,
            &format!("valid-method{method}"),
            &merge_input(method, options, &a, &b),
        );
    }

    // Mixed dtypes, copied integer tensors, 0-d and empty tensors.
    let with_ids = |ids: &[i64], value: f32| {
        safetensors_bytes(
            &[
                bf16_tensor("h.0.w", &[2, 3], &[value; 6]),
                f16_tensor("h.1.w", &[3], &[1.0, -1.0, value]),
                i64_tensor("position_ids", ids),
                f32_tensor("scalar", &[], &[value]),
                f32_tensor("empty", &[0], &[]),
            ],
            &[("format", "pt")],
        )
    };
    write_seed(
        t,
        "mixed-dtypes-equal-ids",
        &merge_input(0, 0b10, &with_ids(&[0, 1], 1.0), &with_ids(&[0, 1], 3.0)),
    );
    write_seed(
        t,
        "differing-ids",
        &merge_input(0, 0b11, &with_ids(&[0, 1], 1.0), &with_ids(&[0, 2], 3.0)),
    );

    // Inputs that must fail: overflow and NaN, shape mismatch, truncated or empty files.
    let overflow = safetensors_bytes(&[f32_tensor("w", &[2], &[70000.0, f32::NAN])], &[]);
    write_seed(
        t,
        "f16-overflow-nan",
        &merge_input(1, 0b1110, &overflow, &overflow),
    );
    let reshaped = safetensors_bytes(
        &[
            f32_tensor("layer.weight", &[4], &[1.0; 4]),
            f32_tensor("layer.bias", &[4], &[1.0; 4]),
        ],
        &[],
    );
    write_seed(t, "shape-mismatch", &merge_input(1, 0b10, &a, &reshaped));
    write_seed(
        t,
        "truncated-second",
        &merge_input(0, 0b10, &a, &b[..b.len() - 1]),
    );
    write_seed(t, "empty-second", &merge_input(2, 0b10, &a, &[]));
    write_seed(t, "same-file-sink", &merge_input(3, 0, &a, &a));
    write_seed(t, "too-short", &[1, 2, 3]);
}

/// Writes the seed corpora. Run it after changing the seeds, then commit the files.
#[test]
#[ignore]
fn write_seed_corpus() {
    header_seeds();
    index_seeds();
    config_seeds();
    merge_seeds();
}

//! Helpers shared by the error, round-trip and fuzz-corpus tests: hand-made safetensors
//! bytes, merges through the library and the binary, and checks that a failed merge
//! leaves no output folder and no temporary folder behind.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use gradmerge::checkpoint::Checkpoint;
use gradmerge::config::{MergeConfig, ModelEntry, TokenizerSource};
use gradmerge::dtype::Dtype;
use gradmerge::format::{encode_header, encode_index};
use gradmerge::job::MergeJob;
use gradmerge::method::{FisherNormalize, MethodKind, Rescale};
use gradmerge::params::{MergeParams, ParamValue};
use gradmerge::pipeline::{EngineOptions, Summary};
use gradmerge::plan::PlanOptions;
use gradmerge::source::IoMode;
use gradmerge::Error;
use half::{bf16, f16};

/// Exit code of the binary for a failed read or merge.
pub const EXIT_FAILURE: i32 = 1;
/// Exit code of the binary for a usage error.
pub const EXIT_USAGE: i32 = 2;

/// One tensor of a hand-made file: name, dtype, shape and raw little-endian bytes.
#[derive(Clone, Debug)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    pub data: Vec<u8>,
}

/// Builds an F32 tensor from `values`.
pub fn f32_tensor(name: &str, shape: &[u64], values: &[f32]) -> TensorSpec {
    assert_eq!(shape.iter().product::<u64>(), values.len() as u64);
    TensorSpec {
        name: name.into(),
        dtype: Dtype::F32,
        shape: shape.to_vec(),
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// Builds a BF16 tensor from `values`, rounded to bf16.
pub fn bf16_tensor(name: &str, shape: &[u64], values: &[f32]) -> TensorSpec {
    assert_eq!(shape.iter().product::<u64>(), values.len() as u64);
    TensorSpec {
        name: name.into(),
        dtype: Dtype::BF16,
        shape: shape.to_vec(),
        data: values
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect(),
    }
}

/// Builds an F16 tensor from `values`, rounded to f16.
pub fn f16_tensor(name: &str, shape: &[u64], values: &[f32]) -> TensorSpec {
    assert_eq!(shape.iter().product::<u64>(), values.len() as u64);
    TensorSpec {
        name: name.into(),
        dtype: Dtype::F16,
        shape: shape.to_vec(),
        data: values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect(),
    }
}

/// Builds an I64 tensor from `values`.
pub fn i64_tensor(name: &str, values: &[i64]) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        dtype: Dtype::I64,
        shape: vec![values.len() as u64],
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// Encodes a complete safetensors file: header from `encode_header`, then the data in
/// the given order.
pub fn safetensors_bytes(tensors: &[TensorSpec], metadata: &[(&str, &str)]) -> Vec<u8> {
    let entries: Vec<(&str, Dtype, &[u64])> = tensors
        .iter()
        .map(|t| (t.name.as_str(), t.dtype, t.shape.as_slice()))
        .collect();
    let metadata: Vec<(String, String)> = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let (mut bytes, offsets) = encode_header(&entries, &metadata);
    for (t, (begin, end)) in tensors.iter().zip(offsets) {
        assert_eq!(
            end - begin,
            t.data.len() as u64,
            "data size of `{}`",
            t.name
        );
        bytes.extend_from_slice(&t.data);
    }
    bytes
}

/// Builds a file whose header is the given JSON text (padded with spaces to a multiple
/// of 8) followed by `data`, for headers `encode_header` cannot produce.
pub fn raw_file(json: &str, data: &[u8]) -> Vec<u8> {
    let mut header = json.as_bytes().to_vec();
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(data);
    bytes
}

/// Writes `bytes` to `path`, creating the parent folders.
pub fn write_file(path: &Path, bytes: &[u8]) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(path, bytes).unwrap();
}

/// Writes a single-file checkpoint and returns its path.
pub fn write_model(path: &Path, tensors: &[TensorSpec]) -> PathBuf {
    write_file(path, &safetensors_bytes(tensors, &[]));
    path.to_path_buf()
}

/// Writes `shards` (file name, tensors) into `folder` with a matching index.
pub fn write_sharded(folder: &Path, shards: &[(&str, Vec<TensorSpec>)]) {
    let mut weight_map = Vec::new();
    let mut total = 0;
    for (file, tensors) in shards {
        write_model(&folder.join(file), tensors);
        for t in tensors {
            weight_map.push((t.name.clone(), file.to_string()));
            total += t.data.len() as u64;
        }
    }
    write_file(
        &folder.join("model.safetensors.index.json"),
        &encode_index(total, &weight_map),
    );
}

/// Returns a small valid model: two F32 tensors of 4 values each, scaled by `scale`.
pub fn small_model(scale: f32) -> Vec<TensorSpec> {
    vec![
        f32_tensor("layer.weight", &[2, 2], &[scale, 2.0 * scale, -scale, 0.5]),
        f32_tensor("layer.bias", &[4], &[0.0, scale, 1.0, -1.0]),
    ]
}

/// Reads the F32 values of `name` from a single-file checkpoint.
pub fn read_f32(path: &Path, name: &str) -> Vec<f32> {
    let ckpt = Checkpoint::open(path, IoMode::Read).unwrap();
    let (source, info) = ckpt.get(name).unwrap();
    assert_eq!(info.dtype, Dtype::F32, "dtype of `{name}`");
    let bytes = source.bytes(info, 0..info.size_bytes()).unwrap();
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// Builds a flag-style configuration of `method` with a base, models and optional Fishers.
pub fn config(
    method: MethodKind,
    base: Option<&Path>,
    models: &[&Path],
    fishers: &[&Path],
) -> MergeConfig {
    let entries: Vec<ModelEntry> = models
        .iter()
        .enumerate()
        .map(|(i, p)| ModelEntry {
            path: p.to_path_buf(),
            fisher: fishers.get(i).map(|f| f.to_path_buf()),
        })
        .collect();
    MergeConfig {
        method,
        base_model: base.map(Path::to_path_buf),
        base_fisher: None,
        params: MergeParams {
            models: vec![Default::default(); entries.len()],
            ..MergeParams::default()
        },
        models: entries,
        dtype: None,
        out_dtype: None,
        tokenizer_source: TokenizerSource::Base,
        rescale: Rescale::L1,
        fisher_normalize: FisherNormalize::None,
        layer_range: None,
    }
}

/// Sets a global parameter of `config`.
pub fn set_global(config: &mut MergeConfig, key: &str, value: f64) {
    config
        .params
        .global
        .insert(key.into(), ParamValue::Scalar(value));
}

/// Sets parameter `key` of model `m` (0-based) of `config`.
pub fn set_model_param(config: &mut MergeConfig, m: usize, key: &str, value: f64) {
    config.params.models[m].insert(key.into(), ParamValue::Scalar(value));
}

/// Opens and runs `config` through the library into `dest`.
pub fn merge_lib(config: MergeConfig, dest: &Path) -> Result<Summary, Error> {
    let mut job = MergeJob::open(config, IoMode::Mmap, PlanOptions::default())?;
    job.run(Some((dest, false)), &EngineOptions::default(), None, &[])
}

/// Runs `config` into `dest`, expects it to fail, checks that nothing was left behind and
/// returns the error.
pub fn merge_lib_error(config: MergeConfig, dest: &Path) -> Error {
    let result = merge_lib(config, dest);
    assert_no_output(dest);
    match result {
        Ok(summary) => panic!("merge into {} succeeded: {summary:?}", dest.display()),
        Err(e) => e,
    }
}

/// Asserts that `dest` does not exist and that its parent contains no temporary folder of a
/// merge into it (`.NAME.gradmerge-tmp-*`, including the `.old` folder of a replaced
/// destination).
pub fn assert_no_output(dest: &Path) {
    assert!(!dest.exists(), "{} was left behind", dest.display());
    assert_no_temp(dest);
}

/// Asserts that the parent of `dest` contains no temporary folder of a merge into `dest`.
pub fn assert_no_temp(dest: &Path) {
    let name = dest.file_name().unwrap().to_string_lossy().into_owned();
    let prefix = format!(".{name}.gradmerge-tmp-");
    let parent = dest.parent().unwrap();
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    let leftovers: Vec<String> = entries
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary folders left in {}: {leftovers:?}",
        parent.display()
    );
}

/// Returns a command that runs the built `gradmerge` binary with its default log level.
pub fn gradmerge() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gradmerge"));
    cmd.env_remove("GRADMERGE_LOG");
    cmd
}

/// Runs the binary with `args` and returns its output.
pub fn run<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    gradmerge().args(args).output().expect("run gradmerge")
}

/// Returns the standard error of `output` as text.
pub fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts that the binary exited with `code` and returns its standard error.
pub fn expect_exit(output: &Output, code: i32) -> String {
    let stderr = stderr_of(output);
    assert_eq!(
        output.status.code(),
        Some(code),
        "exit status {:?}, stderr:\n{stderr}",
        output.status
    );
    stderr
}

/// Returns the arguments of `gradmerge merge --method METHOD [--base B] --model M... --out OUT`.
pub fn merge_args(method: &str, base: Option<&Path>, models: &[&Path], out: &Path) -> Vec<String> {
    let mut args = vec!["merge".to_string(), "--method".into(), method.into()];
    if let Some(b) = base {
        args.push("--base".into());
        args.push(b.display().to_string());
    }
    for m in models {
        args.push("--model".into());
        args.push(m.display().to_string());
    }
    args.push("--out".into());
    args.push(out.display().to_string());
    args
}

/// Runs a linear merge of `models` into `out` through the binary, expects exit code 1
/// with every fragment of `expected` in standard error, and checks that nothing was left
/// behind. Returns standard error.
pub fn cli_linear_fails(models: &[&Path], out: &Path, expected: &[&str]) -> String {
    let output = run(merge_args("linear", None, models, out));
    let stderr = expect_exit(&output, EXIT_FAILURE);
    for fragment in expected {
        assert!(
            stderr.contains(fragment),
            "stderr lacks `{fragment}`:\n{stderr}"
        );
    }
    assert_no_output(out);
    stderr
}

/// Copies a folder's files (not recursively) into `to`.
pub fn copy_folder(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.path().is_file() {
            fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// Path of a folder or file under `tests/data`.
pub fn data(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(relative)
}

//! Round trips of the output format: headers written by `encode_header` parse back
//! unchanged through gradmerge's parser and the `safetensors` crate, and a real sharded
//! merge produces files and an index that standard readers load.

mod common_errors;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common_errors::*;
use gradmerge::checkpoint::Checkpoint;
use gradmerge::dtype::Dtype;
use gradmerge::format::{encode_header, parse_header, parse_index};
use gradmerge::source::IoMode;
use proptest::prelude::*;
use safetensors::SafeTensors;
use tempfile::TempDir;

/// One generated tensor: name, dtype and shape.
type TensorCase = (String, Dtype, Vec<u64>);

fn dtype_strategy() -> impl Strategy<Value = Dtype> {
    prop::sample::select(Dtype::ALL.to_vec())
}

fn tensors_strategy() -> impl Strategy<Value = Vec<TensorCase>> {
    let name = prop_oneof!["[a-z_]{1,6}(\\.[0-9]{1,2})?\\.[a-z_]{1,8}", "\\PC{1,10}",];
    let shape = prop::collection::vec(0u64..6, 0..4);
    prop::collection::btree_map(name, (dtype_strategy(), shape), 0..8).prop_map(|map| {
        map.into_iter()
            .filter(|(name, _)| name != "__metadata__")
            .map(|(name, (dtype, shape))| (name, dtype, shape))
            .collect()
    })
}

fn metadata_strategy() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::btree_map("\\PC{1,8}", "\\PC{0,12}", 0..4)
        .prop_map(|map| map.into_iter().collect())
}

/// Encodes `tensors` with deterministic data bytes derived from `seed`.
fn encode_file(tensors: &[TensorCase], metadata: &[(String, String)], seed: u8) -> Vec<u8> {
    let entries: Vec<(&str, Dtype, &[u64])> = tensors
        .iter()
        .map(|(n, d, s)| (n.as_str(), *d, s.as_slice()))
        .collect();
    let (mut bytes, offsets) = encode_header(&entries, metadata);
    let data_len = offsets.last().map_or(0, |o| o.1);
    bytes.extend((0..data_len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn header_round_trips(
        tensors in tensors_strategy(),
        metadata in metadata_strategy(),
        seed in any::<u8>(),
    ) {
        let bytes = encode_file(&tensors, &metadata, seed);
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        prop_assert_eq!((8 + header_len) % 8, 0, "data section is not 8-byte aligned");

        // gradmerge's parser.
        let path = Path::new("generated.safetensors");
        let header = parse_header(path, &bytes[8..8 + header_len], bytes.len() as u64)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&header.metadata, &metadata);
        prop_assert_eq!(header.tensors.len(), tensors.len());
        let parsed: HashMap<&str, _> =
            header.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
        for (name, dtype, shape) in &tensors {
            let t = parsed[name.as_str()];
            prop_assert_eq!(t.dtype, *dtype);
            prop_assert_eq!(&t.shape, shape);
            prop_assert_eq!(t.size_bytes(), t.elems() * dtype.size_bytes() as u64);
        }

        // The safetensors crate, on the same bytes.
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| TestCaseError::fail(format!("safetensors rejected the file: {e:?}")))?;
        prop_assert_eq!(st.len(), tensors.len());
        for (name, dtype, shape) in &tensors {
            let view = st.tensor(name)
                .map_err(|e| TestCaseError::fail(format!("`{name}`: {e:?}")))?;
            prop_assert_eq!(format!("{:?}", view.dtype()), dtype.header_name());
            let st_shape: Vec<u64> = view.shape().iter().map(|&d| d as u64).collect();
            prop_assert_eq!(&st_shape, shape);
            let info = parsed[name.as_str()];
            let begin = (header.data_start + info.data_offsets.0) as usize;
            let end = (header.data_start + info.data_offsets.1) as usize;
            prop_assert_eq!(view.data(), &bytes[begin..end]);
        }
        let (_, st_metadata) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        let expected: Option<HashMap<String, String>> =
            (!metadata.is_empty()).then(|| metadata.iter().cloned().collect());
        prop_assert_eq!(st_metadata.metadata(), &expected);
    }
}

#[test]
fn empty_header_round_trips() {
    let bytes = encode_file(&[], &[], 0);
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = parse_header(Path::new("empty"), &bytes[8..], bytes.len() as u64).unwrap();
    assert!(header.tensors.is_empty());
    assert_eq!(header.data_start as usize, 8 + header_len);
    assert_eq!(SafeTensors::deserialize(&bytes).unwrap().len(), 0);
}

/// Runs a task-arithmetic merge of the sharded bf16 GPT-2 into `out` with extra flags.
fn merge_gpt2(out: &Path, extra: &[&str]) {
    let folder = data("gpt2-tiny/bf16-sharded");
    let mut args = merge_args(
        "task_arithmetic",
        Some(&folder.join("base")),
        &[&folder.join("code"), &folder.join("prose")],
        out,
    );
    args.extend(["--weight", "0.5", "--shard-size", "100K"].map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    expect_exit(&run(&args), 0);
}

/// Names and data sizes of the shards in `folder`, read with the safetensors crate.
fn load_shards(folder: &Path) -> BTreeMap<String, (Vec<String>, u64)> {
    let mut shards = BTreeMap::new();
    for entry in fs::read_dir(folder).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".safetensors") {
            continue;
        }
        let bytes = fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes)
            .unwrap_or_else(|e| panic!("{name}: safetensors rejected it: {e:?}"));
        let (header_len, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(
            metadata.metadata().as_ref().and_then(|m| m.get("format")),
            Some(&"pt".to_string()),
            "{name}: __metadata__.format"
        );
        let data_bytes = (bytes.len() - 8 - header_len) as u64;
        let names: Vec<String> = st.names().into_iter().map(String::from).collect();
        shards.insert(name, (names, data_bytes));
    }
    shards
}

#[test]
fn sharded_merge_loads_in_safetensors() {
    let dir = TempDir::new().unwrap();
    let out = dir.path().join("merged");
    merge_gpt2(&out, &[]);

    let shards = load_shards(&out);
    assert!(shards.len() > 1, "expected several shards: {shards:?}");
    assert!(!out.join("model.safetensors").exists());
    for (i, name) in shards.keys().enumerate() {
        assert_eq!(
            name,
            &format!("model-{:05}-of-{:05}.safetensors", i + 1, shards.len())
        );
    }

    let index_path = out.join("model.safetensors.index.json");
    let index = parse_index(&index_path, &fs::read(&index_path).unwrap()).unwrap();
    let data_total: u64 = shards.values().map(|(_, bytes)| bytes).sum();
    assert_eq!(index.total_size, Some(data_total));

    // Every tensor is named once, and mapped to the shard that contains it.
    let mut seen = BTreeSet::new();
    for (tensor, shard) in &index.weight_map {
        assert!(seen.insert(tensor.clone()), "`{tensor}` listed twice");
        let (names, _) = &shards[shard];
        assert!(names.contains(tensor), "`{tensor}` is not in {shard}");
    }
    let in_shards: BTreeSet<String> = shards.values().flat_map(|(n, _)| n.clone()).collect();
    assert_eq!(seen, in_shards);

    // The same tensors as the base model, read back through gradmerge.
    let base = Checkpoint::open(&data("gpt2-tiny/bf16-sharded/base"), IoMode::Read).unwrap();
    let merged = Checkpoint::open(&out, IoMode::Read).unwrap();
    let base_names: BTreeSet<&String> = base.names().iter().collect();
    let merged_names: BTreeSet<&String> = merged.names().iter().collect();
    assert_eq!(merged_names, base_names);

    check_with_python(&out, &index.weight_map);
}

/// Loads every shard with Python's `safetensors` package when it is installed.
fn check_with_python(folder: &Path, weight_map: &[(String, String)]) {
    let available = Command::new("python3")
        .args(["-c", "import safetensors"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !available {
        println!("note: python3 with the safetensors package is not available; skipping the Python load check");
        return;
    }
    let script = r#"
import json, sys
from safetensors import safe_open
folder = sys.argv[1]
index = json.load(open(folder + "/model.safetensors.index.json"))
names = {}
for shard in sorted(set(index["weight_map"].values())):
    with safe_open(folder + "/" + shard, framework="np") as f:
        assert f.metadata().get("format") == "pt", shard
        for key in f.keys():
            names[key] = shard
            f.get_slice(key).get_shape()
print(json.dumps(names, sort_keys=True))
"#;
    let output = Command::new("python3")
        .args(["-c", script, folder.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "Python safetensors failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let loaded: BTreeMap<String, String> = serde_json::from_slice(&output.stdout).unwrap();
    let expected: BTreeMap<String, String> = weight_map.iter().cloned().collect();
    assert_eq!(loaded, expected);
}

/// Reads every file of `folder`, by name.
fn read_folder(folder: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(folder)
        .unwrap()
        .map(|e| {
            let path: PathBuf = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, fs::read(&path).unwrap())
        })
        .collect()
}

#[test]
fn mmap_and_read_outputs_identical() {
    let dir = TempDir::new().unwrap();
    let runs: [(&str, &[&str]); 3] = [
        ("mmap", &["--io", "mmap"]),
        ("read", &["--io", "read"]),
        (
            "read-small-chunks",
            &[
                "--io",
                "read",
                "--threads",
                "1",
                "--chunk-elems",
                "777",
                "--channel-depth",
                "1",
            ],
        ),
    ];
    let mut outputs = Vec::new();
    for (name, flags) in runs {
        let out = dir.path().join(name);
        merge_gpt2(&out, flags);
        outputs.push((name, read_folder(&out)));
    }

    let (first_name, first) = &outputs[0];
    assert!(first.contains_key("model.safetensors.index.json"));
    for (name, files) in &outputs[1..] {
        let first_names: Vec<&String> = first.keys().collect();
        let names: Vec<&String> = files.keys().collect();
        assert_eq!(names, first_names, "{name} vs {first_name}: file names");
        for (file, bytes) in files {
            // The saved configuration ends with the command line, which differs here.
            let strip = |b: &[u8]| -> Vec<u8> {
                if file != "gradmerge_config.yml" {
                    return b.to_vec();
                }
                String::from_utf8_lossy(b)
                    .lines()
                    .filter(|l| !l.starts_with('#'))
                    .collect::<Vec<_>>()
                    .join("\n")
                    .into_bytes()
            };
            assert!(
                strip(bytes) == strip(&first[file]),
                "{name} vs {first_name}: {file} differs"
            );
        }
    }
}

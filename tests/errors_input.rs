//! Malformed input files and checkpoint folders. The library and the binary must reject
//! each with an error that names the file, and the tensor where one is involved. A failed
//! merge must leave no output behind.

mod common_errors;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common_errors::*;
use gradmerge::checkpoint::Checkpoint;
use gradmerge::dtype::Dtype;
use gradmerge::format::encode_header;
use gradmerge::source::IoMode;
use gradmerge::Error;
use tempfile::TempDir;

/// Writes `bad` as `bad.safetensors` beside a valid `good.safetensors` and checks that
/// `Checkpoint::open` rejects it in both I/O modes with an error accepted by `expected`.
/// Then checks that a merge through the binary exits with code 1, names the file and
/// every fragment of `stderr_fragments`, and leaves no output. Returns the library error.
fn check_bad_file(bad: &[u8], expected: fn(&Error) -> bool, stderr_fragments: &[&str]) -> Error {
    let dir = TempDir::new().unwrap();
    let bad_path = dir.path().join("bad.safetensors");
    write_file(&bad_path, bad);
    let good = write_model(&dir.path().join("good.safetensors"), &small_model(1.0));

    let mut first = None;
    for mode in [IoMode::Mmap, IoMode::Read] {
        let err = Checkpoint::open(&bad_path, mode).expect_err("bad file opened");
        assert!(expected(&err), "unexpected error ({mode:?}): {err:?}");
        assert!(
            err.to_string().contains(&bad_path.display().to_string()),
            "error does not name the file: {err}"
        );
        first.get_or_insert(err);
    }

    let out = dir.path().join("out");
    let mut fragments = vec![bad_path.to_str().unwrap()];
    fragments.extend_from_slice(stderr_fragments);
    cli_linear_fails(&[&good, &bad_path], &out, &fragments);
    first.unwrap()
}

fn valid_file() -> Vec<u8> {
    safetensors_bytes(&small_model(1.0), &[])
}

#[test]
fn truncated_one_byte_short() {
    let mut bytes = valid_file();
    let full = bytes.len() as u64;
    bytes.pop();
    let err = check_bad_file(
        &bytes,
        |e| matches!(e, Error::Truncated { .. }),
        &["truncated"],
    );
    let Error::Truncated {
        needed_bytes,
        actual_bytes,
        ..
    } = err
    else {
        unreachable!()
    };
    assert_eq!(needed_bytes, full);
    assert_eq!(actual_bytes, full - 1);
}

#[test]
fn truncated_header_only() {
    let (header, _) = encode_header(&[("w", Dtype::F32, &[4][..])], &[]);
    check_bad_file(
        &header,
        |e| matches!(e, Error::Truncated { .. }),
        &["truncated"],
    );
}

#[test]
fn truncated_inside_length_prefix() {
    check_bad_file(
        &[16, 0, 0],
        |e| matches!(e, Error::Truncated { .. }),
        &["truncated"],
    );
}

#[test]
fn zero_byte_file() {
    check_bad_file(&[], |e| matches!(e, Error::EmptyFile { .. }), &["empty"]);
}

#[test]
fn git_lfs_pointer() {
    let pointer = b"version https://git-lfs.github.com/spec/v1\n\
        oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n\
        size 12345\n";
    check_bad_file(
        pointer,
        |e| matches!(e, Error::LfsPointer { .. }),
        &["Git LFS pointer", "git lfs pull"],
    );
}

#[test]
fn header_length_beyond_file() {
    let mut bytes = valid_file();
    let len = bytes.len() as u64;
    bytes[..8].copy_from_slice(&(len * 2).to_le_bytes());
    check_bad_file(
        &bytes,
        |e| matches!(e, Error::Truncated { .. }),
        &["truncated"],
    );
}

#[test]
fn header_length_beyond_limit() {
    let mut bytes = valid_file();
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    check_bad_file(
        &bytes,
        |e| matches!(e, Error::InvalidHeader { .. }),
        &["limit"],
    );
}

#[test]
fn header_not_json() {
    check_bad_file(
        &raw_file("{\"w\": {\"dtype\": \"F32\",", &[0; 4]),
        |e| matches!(e, Error::InvalidHeader { .. }),
        &["not valid JSON"],
    );
}

#[test]
fn header_not_an_object() {
    check_bad_file(
        &raw_file("[1, 2, 3]", &[]),
        |e| matches!(e, Error::InvalidHeader { .. }),
        &["not an object"],
    );
}

#[test]
fn header_not_utf8() {
    let mut bytes = raw_file("{\"w\": 1}", &[]);
    bytes[10] = 0xff;
    check_bad_file(
        &bytes,
        |e| matches!(e, Error::InvalidHeader { .. }),
        &["not UTF-8"],
    );
}

#[test]
fn unknown_dtype() {
    let json = r#"{"w":{"dtype":"F4X","shape":[4],"data_offsets":[0,4]}}"#;
    let err = check_bad_file(
        &raw_file(json, &[0; 4]),
        |e| matches!(e, Error::InvalidTensor { tensor, .. } if tensor == "w"),
        &["`w`", "unknown dtype `F4X`"],
    );
    assert!(err.to_string().contains("known: F64"), "{err}");
}

#[test]
fn shape_overflows_u64() {
    let json = format!(
        r#"{{"w":{{"dtype":"F32","shape":[{}, 4],"data_offsets":[0,4]}}}}"#,
        u64::MAX / 2
    );
    check_bad_file(
        &raw_file(&json, &[0; 4]),
        |e| matches!(e, Error::InvalidTensor { tensor, .. } if tensor == "w"),
        &["`w`", "overflows"],
    );
}

#[test]
fn shape_disagrees_with_span() {
    let json = r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}}"#;
    check_bad_file(
        &raw_file(json, &[0; 16]),
        |e| matches!(e, Error::InvalidTensor { tensor, .. } if tensor == "w"),
        &["`w`", "needs 12 bytes"],
    );
}

#[test]
fn overlapping_offsets() {
    let json = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
                   "b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
    check_bad_file(
        &raw_file(json, &[0; 12]),
        |e| matches!(e, Error::InvalidTensor { tensor, .. } if tensor == "b"),
        &["`b`", "overlap tensor `a`"],
    );
}

#[test]
fn gap_between_offsets() {
    let json = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
                   "b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}}"#;
    check_bad_file(
        &raw_file(json, &[0; 20]),
        |e| matches!(e, Error::InvalidTensor { tensor, .. } if tensor == "b"),
        &["`b`", "gap of 4 bytes"],
    );
}

#[test]
fn gap_at_data_start() {
    let json = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
    check_bad_file(
        &raw_file(json, &[0; 12]),
        |e| matches!(e, Error::InvalidTensor { tensor, .. } if tensor == "a"),
        &["`a`", "at the start"],
    );
}

#[test]
fn trailing_bytes_after_data() {
    let json = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    check_bad_file(
        &raw_file(json, &[0; 12]),
        |e| matches!(e, Error::InvalidHeader { .. }),
        &["4 bytes after the last tensor"],
    );
}

#[test]
fn offsets_out_of_bounds() {
    // Not contiguous and past the end: a bad offset, not a truncated file.
    let json = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
                   "b":{"dtype":"F32","shape":[2],"data_offsets":[100,108]}}"#;
    check_bad_file(
        &raw_file(json, &[0; 16]),
        |e| matches!(e, Error::InvalidTensor { tensor, .. } if tensor == "b"),
        &["`b`", "out of bounds"],
    );
}

#[test]
fn offsets_end_before_begin() {
    let json = r#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}"#;
    check_bad_file(
        &raw_file(json, &[0; 8]),
        |e| matches!(e, Error::InvalidTensor { tensor, .. } if tensor == "a"),
        &["`a`", "end before they begin"],
    );
}

#[test]
fn duplicate_name_in_header() {
    // The first entry is malformed; a reader that keeps the last value would not see it.
    let json = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets_typo":[0,1]},
                   "a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#;
    check_bad_file(
        &raw_file(json, &[7; 2]),
        |e| matches!(e, Error::InvalidTensor { tensor, .. } if tensor == "a"),
        &["`a`", "tensor name", "more than once"],
    );
}

#[test]
fn duplicate_field_in_header_entry() {
    let json = r#"{"a":{"dtype":"U8","shape":[1],"shape":[2],"data_offsets":[0,2]}}"#;
    check_bad_file(
        &raw_file(json, &[7; 2]),
        |e| matches!(e, Error::InvalidTensor { tensor, .. } if tensor == "a"),
        &["`a`", "key `shape`", "more than once"],
    );
}

#[test]
fn duplicate_metadata_in_header() {
    let json = r#"{"__metadata__":{"format":"pt"},
                   "a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},
                   "__metadata__":{"format":"np"}}"#;
    check_bad_file(
        &raw_file(json, &[7]),
        |e| matches!(e, Error::InvalidHeader { .. }),
        &["`__metadata__`", "more than once"],
    );
}

#[test]
fn duplicate_names_across_shards() {
    let dir = TempDir::new().unwrap();
    let folder = dir.path().join("model");
    write_model(
        &folder.join("part-1.safetensors"),
        &[f32_tensor("shared", &[1], &[1.0])],
    );
    write_model(
        &folder.join("part-2.safetensors"),
        &[f32_tensor("shared", &[1], &[2.0])],
    );

    let err = Checkpoint::open(&folder, IoMode::Mmap).unwrap_err();
    let Error::DuplicateTensor {
        tensor,
        first,
        second,
    } = &err
    else {
        panic!("unexpected error: {err:?}")
    };
    assert_eq!(tensor, "shared");
    assert_eq!(first, &folder.join("part-1.safetensors"));
    assert_eq!(second, &folder.join("part-2.safetensors"));

    let out = dir.path().join("out");
    cli_linear_fails(
        &[&folder, &folder],
        &out,
        &["`shared`", "part-1.safetensors", "part-2.safetensors"],
    );
}

/// Writes two shards and an index into `folder`: tensor `a` in shard 1, `b` in shard 2.
fn indexed_folder(folder: &Path) {
    write_sharded(
        folder,
        &[
            (
                "model-00001-of-00002.safetensors",
                vec![f32_tensor("a", &[2], &[1.0, 2.0])],
            ),
            (
                "model-00002-of-00002.safetensors",
                vec![f32_tensor("b", &[2], &[3.0, 4.0])],
            ),
        ],
    );
}

fn write_index(folder: &Path, json: &str) -> PathBuf {
    let path = folder.join("model.safetensors.index.json");
    fs::write(&path, json).unwrap();
    path
}

#[test]
fn index_names_missing_shard() {
    let dir = TempDir::new().unwrap();
    let folder = dir.path().join("model");
    indexed_folder(&folder);
    fs::remove_file(folder.join("model-00002-of-00002.safetensors")).unwrap();

    let err = Checkpoint::open(&folder, IoMode::Mmap).unwrap_err();
    assert!(matches!(err, Error::InvalidIndex { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("model-00002-of-00002.safetensors"), "{text}");
    assert!(text.contains("does not exist"), "{text}");

    let out = dir.path().join("out");
    cli_linear_fails(
        &[&folder],
        &out,
        &[
            "model.safetensors.index.json",
            "model-00002-of-00002.safetensors",
        ],
    );
}

#[test]
fn index_names_tensor_shard_lacks() {
    let dir = TempDir::new().unwrap();
    let folder = dir.path().join("model");
    indexed_folder(&folder);
    write_index(
        &folder,
        r#"{"weight_map": {"a": "model-00001-of-00002.safetensors",
                           "b": "model-00002-of-00002.safetensors",
                           "c": "model-00002-of-00002.safetensors"}}"#,
    );

    let err = Checkpoint::open(&folder, IoMode::Mmap).unwrap_err();
    assert!(matches!(err, Error::InvalidIndex { .. }), "{err:?}");
    assert!(err.to_string().contains("`c`"), "{err}");

    let out = dir.path().join("out");
    cli_linear_fails(
        &[&folder],
        &out,
        &["model.safetensors.index.json", "`c`", "does not contain it"],
    );
}

#[test]
fn index_omits_tensor_shard_has() {
    let dir = TempDir::new().unwrap();
    let folder = dir.path().join("model");
    write_sharded(
        &folder,
        &[(
            "model-00001-of-00001.safetensors",
            vec![f32_tensor("a", &[2], &[1.0, 2.0])],
        )],
    );
    // The shard gains a tensor the index does not list.
    write_model(
        &folder.join("model-00001-of-00001.safetensors"),
        &[
            f32_tensor("a", &[2], &[1.0, 2.0]),
            f32_tensor("extra", &[1], &[5.0]),
        ],
    );

    let err = Checkpoint::open(&folder, IoMode::Mmap).unwrap_err();
    assert!(matches!(err, Error::InvalidIndex { .. }), "{err:?}");
    assert!(err.to_string().contains("`extra`"), "{err}");

    let out = dir.path().join("out");
    cli_linear_fails(
        &[&folder],
        &out,
        &[
            "model.safetensors.index.json",
            "does not list tensor `extra`",
        ],
    );
}

#[test]
fn index_maps_tensor_to_other_shard() {
    let dir = TempDir::new().unwrap();
    let folder = dir.path().join("model");
    write_sharded(
        &folder,
        &[
            (
                "model-00001-of-00002.safetensors",
                vec![f32_tensor("a", &[2], &[1.0, 2.0])],
            ),
            (
                "model-00002-of-00002.safetensors",
                vec![
                    f32_tensor("b", &[2], &[3.0, 4.0]),
                    f32_tensor("a", &[2], &[1.0, 2.0]),
                ],
            ),
        ],
    );
    write_index(
        &folder,
        r#"{"weight_map": {"a": "model-00001-of-00002.safetensors",
                           "b": "model-00002-of-00002.safetensors"}}"#,
    );

    let err = Checkpoint::open(&folder, IoMode::Mmap).unwrap_err();
    let Error::DuplicateTensor { tensor, .. } = &err else {
        panic!("unexpected error: {err:?}")
    };
    assert_eq!(tensor, "a");
}

#[test]
fn index_with_unsafe_shard_name() {
    let dir = TempDir::new().unwrap();
    let folder = dir.path().join("model");
    indexed_folder(&folder);
    write_index(
        &folder,
        r#"{"weight_map": {"a": "../outside.safetensors"}}"#,
    );

    let err = Checkpoint::open(&folder, IoMode::Mmap).unwrap_err();
    assert!(matches!(err, Error::InvalidIndex { .. }), "{err:?}");
    assert!(err.to_string().contains("not a plain file name"), "{err}");
}

#[test]
fn index_not_json() {
    let dir = TempDir::new().unwrap();
    let folder = dir.path().join("model");
    indexed_folder(&folder);
    let index = write_index(&folder, "{\"weight_map\": ");

    let err = Checkpoint::open(&folder, IoMode::Mmap).unwrap_err();
    assert!(matches!(err, Error::InvalidIndex { .. }), "{err:?}");

    let out = dir.path().join("out");
    cli_linear_fails(
        &[&folder],
        &out,
        &[index.to_str().unwrap(), "not valid JSON"],
    );
}

#[test]
fn stray_consolidated_file_ignored() {
    let dir = TempDir::new().unwrap();
    let mut models = Vec::new();
    for (name, scale) in [("m1", 1.0), ("m2", 3.0)] {
        let folder = dir.path().join(name);
        write_sharded(
            &folder,
            &[
                (
                    "model-00001-of-00002.safetensors",
                    vec![f32_tensor("a", &[2], &[scale, scale])],
                ),
                (
                    "model-00002-of-00002.safetensors",
                    vec![f32_tensor("b", &[2], &[-scale, 0.0])],
                ),
            ],
        );
        // mistral-style consolidated weights beside the HF shards, with another layout.
        write_model(
            &folder.join("consolidated.safetensors"),
            &[
                f32_tensor("a", &[2], &[9.0, 9.0]),
                f32_tensor("tok_embeddings.weight", &[2], &[9.0, 9.0]),
            ],
        );
        models.push(folder);
    }

    let ckpt = Checkpoint::open(&models[0], IoMode::Mmap).unwrap();
    assert_eq!(ckpt.names(), ["a", "b"]);
    assert_eq!(ckpt.sources().len(), 2);

    let out = dir.path().join("out");
    let output = run(merge_args("linear", None, &[&models[0], &models[1]], &out));
    expect_exit(&output, 0);
    let merged = out.join("model.safetensors");
    let merged_ckpt = Checkpoint::open(&merged, IoMode::Read).unwrap();
    assert_eq!(merged_ckpt.names(), ["a", "b"]);
    assert_eq!(read_f32(&merged, "a"), [2.0, 2.0]);
    assert_eq!(read_f32(&merged, "b"), [-2.0, 0.0]);
    assert!(!out.join("consolidated.safetensors").exists());
    assert_no_temp(&out);
}

#[test]
fn single_file_beside_index_ambiguous() {
    let dir = TempDir::new().unwrap();
    let folder = dir.path().join("model");
    indexed_folder(&folder);
    let single = write_model(&folder.join("model.safetensors"), &small_model(1.0));
    let index = folder.join("model.safetensors.index.json");

    let err = Checkpoint::open(&folder, IoMode::Mmap).unwrap_err();
    let Error::AmbiguousCheckpoint {
        single: s,
        index: i,
    } = &err
    else {
        panic!("unexpected error: {err:?}")
    };
    assert_eq!(s, &single);
    assert_eq!(i, &index);

    let out = dir.path().join("out");
    cli_linear_fails(
        &[&folder],
        &out,
        &[
            single.to_str().unwrap(),
            index.to_str().unwrap(),
            "ambiguous",
        ],
    );
}

#[test]
fn missing_input_path() {
    let dir = TempDir::new().unwrap();
    let good = write_model(&dir.path().join("good.safetensors"), &small_model(1.0));
    let missing = dir.path().join("nowhere");
    let err = Checkpoint::open(&missing, IoMode::Mmap).unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");

    let out = dir.path().join("out");
    cli_linear_fails(
        &[&good, &missing],
        &out,
        &[missing.to_str().unwrap(), "not found"],
    );
}

#[test]
fn folder_without_checkpoint() {
    let dir = TempDir::new().unwrap();
    let good = write_model(&dir.path().join("good.safetensors"), &small_model(1.0));
    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    fs::write(empty.join("config.json"), "{}").unwrap();
    let err = Checkpoint::open(&empty, IoMode::Mmap).unwrap_err();
    assert!(matches!(err, Error::NoCheckpoint { .. }), "{err:?}");

    let out = dir.path().join("out");
    cli_linear_fails(&[&good, &empty], &out, &["no checkpoint found"]);
}

/// Sets `mode` on `path` and every entry below it.
fn chmod_tree(path: &Path, mode: u32) {
    if path.is_dir() {
        for entry in fs::read_dir(path).unwrap() {
            chmod_tree(&entry.unwrap().path(), mode);
        }
    }
    let mode = if path.is_dir() { mode | 0o111 } else { mode };
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn read_only_inputs_merge() {
    // NOTE: tests run as root ignore these permission bits; the merge must not need
    // write access either way.
    let dir = TempDir::new().unwrap();
    let inputs = dir.path().join("inputs");
    let base = inputs.join("base");
    let model = inputs.join("model");
    copy_folder(&data("gpt2-tiny/bf16/base"), &base);
    copy_folder(&data("gpt2-tiny/bf16/code"), &model);
    chmod_tree(&inputs, 0o444);

    let mut outputs = Vec::new();
    for io in ["mmap", "read"] {
        let out = dir.path().join(format!("out-{io}"));
        let mut args = merge_args("task_arithmetic", Some(&base), &[&model], &out);
        args.extend(["--io".into(), io.into()]);
        outputs.push((out, run(&args)));
    }
    chmod_tree(&inputs, 0o755);

    for (out, output) in &outputs {
        expect_exit(output, 0);
        assert!(out.join("model.safetensors").is_file());
        assert!(out.join("config.json").is_file());
        assert_no_temp(out);
    }
}

#[test]
fn paths_with_spaces_and_unicode() {
    let dir = TempDir::new().unwrap();
    let root = dir.path().join("mes modèles ü");
    let a = write_model(&root.join("modèle A.safetensors"), &small_model(1.0));
    let b_folder = root.join("模型 b");
    write_model(&b_folder.join("model.safetensors"), &small_model(3.0));
    let out = root.join("sortie fusionnée");

    let output = run(merge_args("linear", None, &[&a, &b_folder], &out));
    expect_exit(&output, 0);
    let merged = out.join("model.safetensors");
    assert_eq!(read_f32(&merged, "layer.weight"), [2.0, 4.0, -2.0, 0.5]);
    assert_no_temp(&out);

    // An error on such a path names it intact.
    let bad = root.join("défaut ü.safetensors");
    write_file(&bad, &[]);
    cli_linear_fails(
        &[&a, &bad],
        &root.join("sortie 2"),
        &[bad.to_str().unwrap()],
    );
}

//! Entry points of the fuzz targets, shared with `tests/fuzz_corpus.rs`, which replays the
//! seed corpora on stable Rust.
//!
//! Each function takes arbitrary bytes and must return normally: an `Err` from gradmerge
//! is an expected outcome, while a panic (including a failed invariant below) is a bug.

use std::path::Path;

use gradmerge::checkpoint::Checkpoint;
use gradmerge::config::{MergeConfig, ModelEntry, TokenizerSource};
use gradmerge::dtype::Dtype;
use gradmerge::format::header::parse_length_prefix;
use gradmerge::format::{encode_header, encode_index, parse_header, parse_index, Header};
use gradmerge::job::MergeJob;
use gradmerge::method::{FisherNormalize, MethodKind, Rescale};
use gradmerge::params::{MergeParams, ParamValue};
use gradmerge::pipeline::EngineOptions;
use gradmerge::plan::PlanOptions;
use gradmerge::source::IoMode;

/// Parses `data` as a whole safetensors file. When gradmerge accepts it, checks the
/// header invariants, that re-encoding gives the same header, and that the `safetensors`
/// crate accepts the same bytes with the same tensors.
pub fn header(data: &[u8]) {
    let path = Path::new("fuzz.safetensors");
    let file_len = data.len() as u64;
    let prefix = &data[..data.len().min(64)];
    let Ok(header_len) = parse_length_prefix(path, prefix, file_len) else {
        return;
    };
    let json_end = 8 + usize::try_from(header_len).expect("header length within the limit");
    let Ok(header) = parse_header(path, &data[8..json_end], file_len) else {
        return;
    };
    check_header_invariants(&header, header_len, file_len);

    // Re-encoding the parsed tensors in file order reproduces the same header.
    let entries: Vec<(&str, Dtype, &[u64])> = header
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t.dtype, t.shape.as_slice()))
        .collect();
    let (encoded, offsets) = encode_header(&entries, &header.metadata);
    let reencoded_file_len = encoded.len() as u64 + header.data_len_bytes;
    let reparsed = parse_header(path, &encoded[8..], reencoded_file_len)
        .expect("a re-encoded valid header parses");
    assert_eq!(
        reparsed.tensors, header.tensors,
        "re-encoded tensors differ"
    );
    assert_eq!(
        reparsed.metadata, header.metadata,
        "re-encoded metadata differs"
    );
    let expected_offsets: Vec<(u64, u64)> = header.tensors.iter().map(|t| t.data_offsets).collect();
    assert_eq!(offsets, expected_offsets, "encode_header moved the data");

    // The reference implementation accepts what gradmerge accepts.
    let st = match safetensors::SafeTensors::deserialize(data) {
        Ok(st) => st,
        Err(e) => panic!("gradmerge accepted a header the safetensors crate rejects: {e:?}"),
    };
    assert_eq!(st.len(), header.tensors.len(), "tensor counts differ");
    for t in &header.tensors {
        let view = st.tensor(&t.name).expect("the crate has every tensor");
        assert_eq!(format!("{:?}", view.dtype()), t.dtype.header_name());
        let shape: Vec<u64> = view.shape().iter().map(|&d| d as u64).collect();
        assert_eq!(shape, t.shape, "shape of `{}`", t.name);
        assert_eq!(
            view.data().len() as u64,
            t.size_bytes(),
            "size of `{}`",
            t.name
        );
    }
}

fn check_header_invariants(header: &Header, header_len: u64, file_len: u64) {
    assert_eq!(header.data_start, 8 + header_len);
    assert_eq!(header.data_start + header.data_len_bytes, file_len);
    let mut expected_begin = 0;
    for t in &header.tensors {
        assert_ne!(t.name, "__metadata__");
        assert_eq!(
            t.data_offsets.0, expected_begin,
            "`{}` is not contiguous",
            t.name
        );
        let elems = t.shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        let bytes = elems.and_then(|n| n.checked_mul(t.dtype.size_bytes() as u64));
        assert_eq!(bytes, Some(t.size_bytes()), "size of `{}`", t.name);
        expected_begin = t.data_offsets.1;
    }
    assert_eq!(
        expected_begin, header.data_len_bytes,
        "spans do not cover the data"
    );
}

/// Parses `data` as a shard index. When gradmerge accepts it, checks that every shard
/// name is a plain file name and that encoding the index again gives the same map.
pub fn index(data: &[u8]) {
    let path = Path::new("model.safetensors.index.json");
    let Ok(index) = parse_index(path, data) else {
        return;
    };
    for (tensor, shard) in &index.weight_map {
        let plain = !shard.is_empty()
            && shard != "."
            && shard != ".."
            && !shard.contains(['/', '\\', '\0']);
        assert!(plain, "`{tensor}` maps to the unsafe shard name {shard:?}");
    }
    let total = index.total_size.unwrap_or(0);
    let encoded = encode_index(total, &index.weight_map);
    let reparsed = parse_index(path, &encoded).expect("a re-encoded index parses");
    assert_eq!(reparsed.weight_map, index.weight_map);
    assert_eq!(reparsed.total_size, Some(total));
}

/// Parses `data` as a YAML merge configuration (when it is UTF-8).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) =
        gradmerge::config::parse_yaml(text, Path::new("fuzz.yml"), Path::new("/nonexistent/fuzz"))
    else {
        return;
    };
    assert_eq!(
        config.params.models.len(),
        config.models.len(),
        "one parameter block per model"
    );
}

/// Methods the merge target runs: the ones that need no Fisher files.
const MERGE_METHODS: [MethodKind; 9] = [
    MethodKind::Linear,
    MethodKind::TaskArithmetic,
    MethodKind::Ties,
    MethodKind::DareLinear,
    MethodKind::DareTies,
    MethodKind::Breadcrumbs,
    MethodKind::BreadcrumbsTies,
    MethodKind::Slerp,
    MethodKind::ModelStock,
];

/// Runs a whole merge of two fuzzed files.
///
/// Byte 0 of `data` picks the method and byte 1 the options: bit 0 selects positioned
/// reads, bit 1 a folder instead of a sink, bits 2-3 the output dtype and bits 4-7 the
/// chunk size. Bytes 2-3 are the length of the first file (little-endian), and the first
/// and second file follow. A merge into a folder must either fail and leave nothing
/// behind, or produce a checkpoint that gradmerge opens again.
pub fn merge(data: &[u8]) {
    let [method, options, len_lo, len_hi, rest @ ..] = data else {
        return;
    };
    let split = usize::from(u16::from_le_bytes([*len_lo, *len_hi])).min(rest.len());
    let (first, second) = rest.split_at(split);
    let kind = MERGE_METHODS[usize::from(*method) % MERGE_METHODS.len()];
    let io = if options & 1 == 0 {
        IoMode::Mmap
    } else {
        IoMode::Read
    };
    let to_folder = options & 2 != 0;
    let out_dtype = [None, Some(Dtype::F32), Some(Dtype::BF16), Some(Dtype::F16)]
        [usize::from((options >> 2) & 3)];
    let chunk_elems = 1 + u64::from(options >> 4) * 17;

    let dir = tempfile::tempdir().expect("create a temporary folder");
    let a = dir.path().join("a.safetensors");
    let b = dir.path().join("b.safetensors");
    std::fs::write(&a, first).expect("write the first input");
    std::fs::write(&b, second).expect("write the second input");

    let (base, models) = match kind {
        MethodKind::Linear => (None, vec![a.clone(), b.clone()]),
        MethodKind::ModelStock => (Some(a.clone()), vec![b.clone(), b.clone()]),
        _ => (Some(a.clone()), vec![b.clone()]),
    };
    let mut params = MergeParams {
        models: vec![Default::default(); models.len()],
        ..MergeParams::default()
    };
    for (key, value) in [("density", 0.5), ("t", 0.3)] {
        params.global.insert(key.into(), ParamValue::Scalar(value));
    }
    let config = MergeConfig {
        method: kind,
        base_model: base,
        base_fisher: None,
        models: models
            .into_iter()
            .map(|path| ModelEntry { path, fisher: None })
            .collect(),
        params,
        dtype: None,
        out_dtype,
        tokenizer_source: TokenizerSource::Base,
        rescale: Rescale::L1,
        fisher_normalize: FisherNormalize::None,
        layer_range: None,
    };
    let plan_options = PlanOptions {
        shard_size_bytes: 64,
        ..PlanOptions::default()
    };
    let Ok(mut job) = MergeJob::open(config, io, plan_options) else {
        return;
    };
    let engine = EngineOptions {
        threads: 1,
        chunk_elems: Some(chunk_elems),
        ..EngineOptions::default()
    };
    let out = dir.path().join("out");
    let target = to_folder.then_some((out.as_path(), false));
    let result = job.run(target, &engine, None, &[]);
    if !to_folder {
        return;
    }
    match result {
        Ok(_) => {
            Checkpoint::open(&out, io).expect("the merged output opens again");
        }
        Err(_) => assert!(!out.exists(), "a failed merge left its output"),
    }
    let leftovers = std::fs::read_dir(dir.path())
        .expect("list the temporary folder")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".gradmerge-tmp-"))
        .count();
    assert_eq!(leftovers, 0, "a temporary output folder was left behind");
}

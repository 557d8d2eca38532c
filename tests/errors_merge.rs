//! Model sets, Fisher files and parameters that cannot be merged: each must stop with an
//! error of the right kind that names the tensor or file, and leave no output behind.

mod common_errors;

use std::path::{Path, PathBuf};

use common_errors::*;
use gradmerge::checkpoint::Checkpoint;
use gradmerge::dtype::Dtype;
use gradmerge::job::MergeJob;
use gradmerge::method::MethodKind;
use gradmerge::plan::PlanOptions;
use gradmerge::source::IoMode;
use gradmerge::Error;
use tempfile::TempDir;

/// Asserts that `err` is an [`Error::Mismatch`] whose message contains every fragment.
fn assert_mismatch(err: &Error, fragments: &[&str]) {
    assert!(
        matches!(err, Error::Mismatch(_)),
        "unexpected error: {err:?}"
    );
    let text = err.to_string();
    for fragment in fragments {
        assert!(
            text.contains(fragment),
            "message lacks `{fragment}`:\n{text}"
        );
    }
}

/// Asserts that `err` is an [`Error::InvalidParameter`] whose message contains every fragment.
fn assert_invalid_parameter(err: &Error, fragments: &[&str]) {
    assert!(
        matches!(err, Error::InvalidParameter(_)),
        "unexpected error: {err:?}"
    );
    let text = err.to_string();
    for fragment in fragments {
        assert!(
            text.contains(fragment),
            "message lacks `{fragment}`:\n{text}"
        );
    }
}

/// Writes a base and two models with the tensors of [`small_model`] into `dir`.
fn three_models(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (
        write_model(&dir.join("base.safetensors"), &small_model(1.0)),
        write_model(&dir.join("m1.safetensors"), &small_model(2.0)),
        write_model(&dir.join("m2.safetensors"), &small_model(3.0)),
    )
}

/// Writes a Fisher file for [`small_model`] with the given values for `layer.weight` and
/// `layer.bias`.
fn fisher(path: &Path, weight: [f32; 4], bias: [f32; 4]) -> PathBuf {
    write_model(
        path,
        &[
            f32_tensor("layer.weight", &[2, 2], &weight),
            f32_tensor("layer.bias", &[4], &bias),
        ],
    )
}

// Model sets.

#[test]
fn missing_tensor_in_one_model() {
    let dir = TempDir::new().unwrap();
    let (base, m1, _) = three_models(dir.path());
    let partial = write_model(
        &dir.path().join("partial.safetensors"),
        &[f32_tensor("layer.weight", &[2, 2], &[1.0; 4])],
    );
    let out = dir.path().join("out");

    let cfg = config(
        MethodKind::TaskArithmetic,
        Some(&base),
        &[&m1, &partial],
        &[],
    );
    let err = merge_lib_error(cfg, &out);
    assert_mismatch(
        &err,
        &["`layer.bias` is missing from", partial.to_str().unwrap()],
    );

    let output = run(merge_args(
        "task_arithmetic",
        Some(&base),
        &[&m1, &partial],
        &out,
    ));
    let stderr = expect_exit(&output, EXIT_FAILURE);
    assert!(stderr.contains("`layer.bias`"), "{stderr}");
    assert!(stderr.contains(partial.to_str().unwrap()), "{stderr}");
    assert_no_output(&out);
}

#[test]
fn extra_tensor_in_one_model() {
    let dir = TempDir::new().unwrap();
    let (base, m1, _) = three_models(dir.path());
    let mut tensors = small_model(2.0);
    tensors.push(f32_tensor("adapter.weight", &[1], &[1.0]));
    let bigger = write_model(&dir.path().join("bigger.safetensors"), &tensors);

    let cfg = config(
        MethodKind::TaskArithmetic,
        Some(&base),
        &[&m1, &bigger],
        &[],
    );
    let err = merge_lib_error(cfg, &dir.path().join("out"));
    assert_mismatch(&err, &["`adapter.weight`", bigger.to_str().unwrap()]);
}

#[test]
fn shape_mismatch() {
    let dir = TempDir::new().unwrap();
    let (base, m1, _) = three_models(dir.path());
    let reshaped = write_model(
        &dir.path().join("reshaped.safetensors"),
        &[
            f32_tensor("layer.weight", &[4, 1], &[1.0; 4]),
            f32_tensor("layer.bias", &[4], &[1.0; 4]),
        ],
    );
    let cfg = config(
        MethodKind::TaskArithmetic,
        Some(&base),
        &[&m1, &reshaped],
        &[],
    );
    let err = merge_lib_error(cfg, &dir.path().join("out"));
    assert_mismatch(&err, &["`layer.weight`", "[4, 1]", "[2, 2]"]);
}

#[test]
fn embedding_rows_mismatch() {
    let dir = TempDir::new().unwrap();
    let embed = |rows: u64, value: f32| {
        vec![f32_tensor(
            "model.embed_tokens.weight",
            &[rows, 2],
            &vec![value; (rows * 2) as usize],
        )]
    };
    let base = write_model(&dir.path().join("base.safetensors"), &embed(10, 0.0));
    let m1 = write_model(&dir.path().join("m1.safetensors"), &embed(10, 1.0));
    let wider = write_model(&dir.path().join("wider.safetensors"), &embed(12, 1.0));
    let out = dir.path().join("out");

    let cfg = config(MethodKind::TaskArithmetic, Some(&base), &[&m1, &wider], &[]);
    let err = merge_lib_error(cfg, &out);
    assert_mismatch(
        &err,
        &[
            "`model.embed_tokens.weight`",
            "12",
            "10",
            "rows",
            "vocabular",
            wider.to_str().unwrap(),
            base.to_str().unwrap(),
        ],
    );

    let output = run(merge_args(
        "task_arithmetic",
        Some(&base),
        &[&m1, &wider],
        &out,
    ));
    let stderr = expect_exit(&output, EXIT_FAILURE);
    assert!(stderr.contains("`model.embed_tokens.weight`"), "{stderr}");
    assert!(stderr.contains("12"), "{stderr}");
    assert!(stderr.contains("10"), "{stderr}");
    assert_no_output(&out);
}

#[test]
fn non_float_tensor_differs() {
    let dir = TempDir::new().unwrap();
    let model = |ids: &[i64]| {
        let mut t = small_model(1.0);
        t.push(i64_tensor("position_ids", ids));
        t
    };
    let a = write_model(&dir.path().join("a.safetensors"), &model(&[0, 1, 2, 3]));
    let b = write_model(&dir.path().join("b.safetensors"), &model(&[0, 1, 2, 4]));
    let out = dir.path().join("out");

    let err = merge_lib_error(config(MethodKind::Linear, None, &[&a, &b], &[]), &out);
    assert_mismatch(
        &err,
        &[
            "`position_ids`",
            "I64",
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ],
    );

    cli_linear_fails(&[&a, &b], &out, &["`position_ids`", "differs"]);
}

#[test]
fn equal_non_float_tensor_copied() {
    let dir = TempDir::new().unwrap();
    let model = |scale: f32| {
        let mut t = small_model(scale);
        t.push(i64_tensor("position_ids", &[0, 1, 2, 3]));
        t
    };
    let a = write_model(&dir.path().join("a.safetensors"), &model(1.0));
    let b = write_model(&dir.path().join("b.safetensors"), &model(3.0));
    let out = dir.path().join("out");
    merge_lib(config(MethodKind::Linear, None, &[&a, &b], &[]), &out).unwrap();

    let merged = Checkpoint::open(&out.join("model.safetensors"), IoMode::Read).unwrap();
    let (source, info) = merged.get("position_ids").unwrap();
    assert_eq!(info.dtype, Dtype::I64);
    let bytes = source.bytes(info, 0..info.size_bytes()).unwrap();
    assert_eq!(
        bytes.as_ref(),
        i64_tensor("x", &[0, 1, 2, 3]).data.as_slice()
    );
}

#[test]
fn f16_and_bf16_merge_as_f32() {
    let dir = TempDir::new().unwrap();
    let a = write_model(
        &dir.path().join("a.safetensors"),
        &[f16_tensor("w", &[4], &[1.0, 2.0, 3.0, 4.0])],
    );
    let b = write_model(
        &dir.path().join("b.safetensors"),
        &[bf16_tensor("w", &[4], &[3.0, 2.0, 1.0, 0.0])],
    );

    let job = MergeJob::open(
        config(MethodKind::Linear, None, &[&a, &b], &[]),
        IoMode::Mmap,
        PlanOptions::default(),
    )
    .unwrap();
    assert_eq!(job.plan.tensors[0].dtype, Dtype::F32);
    assert!(
        job.plan
            .notes
            .iter()
            .any(|n| n.contains("`w`") && n.contains("F16") && n.contains("BF16")),
        "notes: {:?}",
        job.plan.notes
    );

    let out = dir.path().join("out");
    let output = run(merge_args("linear", None, &[&a, &b], &out));
    let stderr = expect_exit(&output, 0);
    assert!(stderr.contains("merged and written as F32"), "{stderr}");
    let merged = out.join("model.safetensors");
    assert_eq!(read_f32(&merged, "w"), [2.0, 2.0, 2.0, 2.0]);
}

#[test]
fn same_model_twice_counts_twice() {
    let dir = TempDir::new().unwrap();
    let a = write_model(
        &dir.path().join("a.safetensors"),
        &[f32_tensor("w", &[2], &[1.0, -1.0])],
    );
    let b = write_model(
        &dir.path().join("b.safetensors"),
        &[f32_tensor("w", &[2], &[4.0, 2.0])],
    );
    let out = dir.path().join("out");
    merge_lib(config(MethodKind::Linear, None, &[&a, &a, &b], &[]), &out).unwrap();
    // (2 a + b) / 3 with the default weights of 1 and normalize.
    assert_eq!(read_f32(&out.join("model.safetensors"), "w"), [2.0, 0.0]);

    let out_cli = dir.path().join("out-cli");
    let output = run(merge_args("linear", None, &[&a, &a, &b], &out_cli));
    expect_exit(&output, 0);
    assert_eq!(
        read_f32(&out_cli.join("model.safetensors"), "w"),
        [2.0, 0.0]
    );
}

#[test]
fn quantization_config_rejected() {
    let dir = TempDir::new().unwrap();
    let (base, _, _) = three_models(dir.path());
    let folder = dir.path().join("gptq");
    write_model(&folder.join("model.safetensors"), &small_model(2.0));
    write_file(
        &folder.join("config.json"),
        br#"{"model_type": "llama", "quantization_config": {"quant_method": "gptq", "bits": 4}}"#,
    );

    let err = Checkpoint::open(&folder, IoMode::Mmap).unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("quantized"), "{text}");
    assert!(text.contains("gptq"), "{text}");
    assert!(text.contains("config.json"), "{text}");

    let out = dir.path().join("out");
    let output = run(merge_args("task_arithmetic", Some(&base), &[&folder], &out));
    let stderr = expect_exit(&output, EXIT_FAILURE);
    assert!(stderr.contains("quantized"), "{stderr}");
    assert_no_output(&out);
}

#[test]
fn qweight_tensor_rejected() {
    let dir = TempDir::new().unwrap();
    let quantized = |scale: i32| {
        vec![
            TensorSpec {
                name: "model.layers.0.mlp.down_proj.qweight".into(),
                dtype: Dtype::I32,
                shape: vec![2],
                data: [scale, scale]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            },
            f16_tensor("model.layers.0.mlp.down_proj.scales", &[2], &[0.5, 0.5]),
        ]
    };
    let a = write_model(&dir.path().join("a.safetensors"), &quantized(1));
    let b = write_model(&dir.path().join("b.safetensors"), &quantized(1));
    let out = dir.path().join("out");

    let err = merge_lib_error(config(MethodKind::Linear, None, &[&a, &b], &[]), &out);
    assert!(matches!(err, Error::Unsupported(_)), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("qweight"), "{text}");
    assert!(text.contains("quantized"), "{text}");

    cli_linear_fails(&[&a, &b], &out, &["qweight", "quantized"]);
}

// Fisher files.

#[test]
fn fisher_missing_and_extra_names() {
    let dir = TempDir::new().unwrap();
    let (base, m1, m2) = three_models(dir.path());
    let f1 = fisher(&dir.path().join("f1.safetensors"), [1.0; 4], [1.0; 4]);
    let f2 = write_model(
        &dir.path().join("f2.safetensors"),
        &[
            f32_tensor("layer.weight", &[2, 2], &[1.0; 4]),
            f32_tensor("stray.weight", &[1], &[1.0]),
            f32_tensor("other.weight", &[1], &[1.0]),
        ],
    );
    let out = dir.path().join("out");

    let cfg = config(MethodKind::GradMatch, Some(&base), &[&m1, &m2], &[&f1, &f2]);
    let err = merge_lib_error(cfg, &out);
    assert_mismatch(
        &err,
        &[
            f2.to_str().unwrap(),
            "has no tensor `layer.bias`",
            "tensors the model lacks",
            "`stray.weight`",
            "`other.weight`",
        ],
    );
}

#[test]
fn fisher_shape_mismatch() {
    let dir = TempDir::new().unwrap();
    let (base, m1, m2) = three_models(dir.path());
    let f1 = fisher(&dir.path().join("f1.safetensors"), [1.0; 4], [1.0; 4]);
    let f2 = write_model(
        &dir.path().join("f2.safetensors"),
        &[
            f32_tensor("layer.weight", &[4], &[1.0; 4]),
            f32_tensor("layer.bias", &[4], &[1.0; 4]),
        ],
    );
    let cfg = config(MethodKind::Fisher, None, &[&m1, &m2], &[&f1, &f2]);
    let _ = base;
    let err = merge_lib_error(cfg, &dir.path().join("out"));
    assert_mismatch(
        &err,
        &[f2.to_str().unwrap(), "`layer.weight`", "[4]", "[2, 2]"],
    );
}

/// Runs gradmatch with a second Fisher whose `layer.bias` is `bad` at one element and
/// checks the error through the library and the binary.
fn check_invalid_fisher_value(bad: f32) {
    let dir = TempDir::new().unwrap();
    let (base, m1, m2) = three_models(dir.path());
    let f1 = fisher(&dir.path().join("f1.safetensors"), [1.0; 4], [1.0; 4]);
    let f2 = fisher(
        &dir.path().join("f2.safetensors"),
        [1.0; 4],
        [1.0, bad, 1.0, 1.0],
    );
    let out = dir.path().join("out");

    let cfg = config(MethodKind::GradMatch, Some(&base), &[&m1, &m2], &[&f1, &f2]);
    let err = merge_lib_error(cfg, &out);
    assert_mismatch(
        &err,
        &[
            "tensor `layer.bias`",
            "1 Fisher value is",
            "negative, NaN or infinite",
            &format!("the first is {bad} at element 1 of {}", f2.display()),
        ],
    );

    let mut args = merge_args("gradmatch", Some(&base), &[&m1, &m2], &out);
    args.extend(["--fisher".into(), f1.display().to_string()]);
    args.extend(["--fisher".into(), f2.display().to_string()]);
    let output = run(&args);
    let stderr = expect_exit(&output, EXIT_FAILURE);
    assert!(stderr.contains("`layer.bias`"), "{stderr}");
    assert_no_output(&out);
}

#[test]
fn fisher_negative_value() {
    check_invalid_fisher_value(-0.5);
}

#[test]
fn fisher_nan_value() {
    check_invalid_fisher_value(f32::NAN);
}

#[test]
fn fisher_infinite_value() {
    check_invalid_fisher_value(f32::INFINITY);
}

#[test]
fn zero_fisher_with_zero_delta() {
    let dir = TempDir::new().unwrap();
    let (base, m1, m2) = three_models(dir.path());
    let f1 = fisher(&dir.path().join("f1.safetensors"), [0.0; 4], [0.0; 4]);
    let f2 = fisher(&dir.path().join("f2.safetensors"), [0.0; 4], [0.0; 4]);
    let out = dir.path().join("out");

    let mut cfg = config(MethodKind::GradMatch, Some(&base), &[&m1, &m2], &[&f1, &f2]);
    set_global(&mut cfg, "delta", 0.0);
    let err = merge_lib_error(cfg, &out);
    assert_invalid_parameter(&err, &["delta = 0", "(0, inf)"]);

    let mut args = merge_args("gradmatch", Some(&base), &[&m1, &m2], &out);
    args.extend(["--fisher".into(), f1.display().to_string()]);
    args.extend(["--fisher".into(), f2.display().to_string()]);
    args.extend(["--param".into(), "delta=0".into()]);
    let stderr = expect_exit(&run(&args), EXIT_USAGE);
    assert!(stderr.contains("delta"), "{stderr}");
    assert_no_output(&out);
}

#[test]
fn fisher_method_without_fisher_files() {
    let dir = TempDir::new().unwrap();
    let (base, m1, m2) = three_models(dir.path());
    let cfg = config(MethodKind::GradMatch, Some(&base), &[&m1, &m2], &[]);
    let err = merge_lib_error(cfg, &dir.path().join("out"));
    assert_invalid_parameter(&err, &["needs a Fisher file", m1.to_str().unwrap()]);
}

// Parameters.

#[test]
fn density_outside_unit_interval() {
    for density in [0.0, -0.1, 1.5, f64::NAN] {
        let dir = TempDir::new().unwrap();
        let (base, m1, m2) = three_models(dir.path());
        let out = dir.path().join("out");
        let mut cfg = config(MethodKind::Ties, Some(&base), &[&m1, &m2], &[]);
        set_model_param(&mut cfg, 1, "density", density);
        let err = merge_lib_error(cfg, &out);
        if density.is_nan() {
            assert_invalid_parameter(&err, &["`density` in model 2's parameters is NaN"]);
        } else {
            assert_invalid_parameter(&err, &["density of model 2", "(0, 1]", "tensor `"]);
        }

        let mut args = merge_args("ties", Some(&base), &[&m1, &m2], &out);
        args.extend(["--param".into(), format!("density={density}")]);
        let stderr = expect_exit(&run(&args), EXIT_USAGE);
        assert!(stderr.contains("density"), "{stderr}");
        assert_no_output(&out);
    }
}

#[test]
fn slerp_with_three_models() {
    let dir = TempDir::new().unwrap();
    let (base, m1, m2) = three_models(dir.path());
    let out = dir.path().join("out");
    let mut cfg = config(MethodKind::Slerp, Some(&base), &[&m1, &m2], &[]);
    set_global(&mut cfg, "t", 0.5);
    let err = merge_lib_error(cfg, &out);
    assert_invalid_parameter(&err, &["exactly two models", "2 models besides the base"]);

    let mut args = merge_args("slerp", Some(&base), &[&m1, &m2], &out);
    args.extend(["--param".into(), "t=0.5".into()]);
    let stderr = expect_exit(&run(&args), EXIT_USAGE);
    assert!(stderr.contains("exactly two models"), "{stderr}");
    assert_no_output(&out);
}

#[test]
fn gradmatch_nonpositive_precision() {
    let dir = TempDir::new().unwrap();
    let (base, m1, m2) = three_models(dir.path());
    let f1 = fisher(&dir.path().join("f1.safetensors"), [0.5; 4], [0.5; 4]);
    // Model 2 is removed (weight -1); its Fisher outweighs model 1's at three elements
    // of `layer.weight` and nowhere in `layer.bias`.
    let f2 = fisher(
        &dir.path().join("f2.safetensors"),
        [1.0, 1.0, 0.0, 1.0],
        [0.0; 4],
    );
    let out = dir.path().join("out");

    let mut cfg = config(MethodKind::GradMatch, Some(&base), &[&m1, &m2], &[&f1, &f2]);
    set_model_param(&mut cfg, 1, "weight", -1.0);
    let err = merge_lib_error(cfg, &out);
    let Error::NonPositivePrecision { tensor, count } = &err else {
        panic!("unexpected error: {err:?}")
    };
    assert_eq!(tensor, "layer.weight");
    assert_eq!(*count, 3);

    let mut args = merge_args("gradmatch", Some(&base), &[&m1, &m2], &out);
    args.extend(["--fisher".into(), f1.display().to_string()]);
    args.extend(["--fisher".into(), f2.display().to_string()]);
    args.extend([
        "--weight".into(),
        "1".into(),
        "--weight".into(),
        "-1".into(),
    ]);
    let stderr = expect_exit(&run(&args), EXIT_FAILURE);
    assert!(stderr.contains("`layer.weight`"), "{stderr}");
    assert!(stderr.contains("at 3 elements"), "{stderr}");
    assert_no_output(&out);
}

#[test]
fn unknown_method_suggests_name() {
    let dir = TempDir::new().unwrap();
    let (base, m1, _) = three_models(dir.path());
    let out = dir.path().join("out");
    let output = run(merge_args("dare-ties", Some(&base), &[&m1], &out));
    let stderr = expect_exit(&output, EXIT_USAGE);
    assert!(stderr.contains("`dare-ties`"), "{stderr}");
    assert!(stderr.contains("did you mean `dare_ties`"), "{stderr}");
    assert_no_output(&out);

    let yaml = dir.path().join("merge.yml");
    write_file(
        &yaml,
        format!(
            "merge_method: dare-ties\nbase_model: {}\nmodels:\n  - model: {}\n",
            base.display(),
            m1.display()
        )
        .as_bytes(),
    );
    let output = run([
        "merge",
        yaml.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let stderr = expect_exit(&output, EXIT_USAGE);
    assert!(stderr.contains("did you mean `dare_ties`"), "{stderr}");
    assert!(stderr.contains("merge.yml"), "{stderr}");
    assert_no_output(&out);
}

#[test]
fn bad_size_units() {
    let dir = TempDir::new().unwrap();
    let (_, m1, m2) = three_models(dir.path());
    let out = dir.path().join("out");
    for (flag, value) in [
        ("--shard-size", "5X"),
        ("--shard-size", "G5"),
        ("--budget", "256Q"),
        ("--budget", "lots"),
    ] {
        let mut args = merge_args("linear", None, &[&m1, &m2], &out);
        args.extend([flag.into(), value.into()]);
        let stderr = expect_exit(&run(&args), EXIT_USAGE);
        assert!(stderr.contains(&format!("`{value}`")), "{flag}: {stderr}");
        assert!(stderr.contains("invalid size"), "{flag}: {stderr}");
        assert_no_output(&out);
    }
}

#[test]
fn mismatched_fisher_flags() {
    let dir = TempDir::new().unwrap();
    let (base, m1, m2) = three_models(dir.path());
    let f1 = fisher(&dir.path().join("f1.safetensors"), [1.0; 4], [1.0; 4]);
    let out = dir.path().join("out");
    let mut args = merge_args("gradmatch", Some(&base), &[&m1, &m2], &out);
    args.extend(["--fisher".into(), f1.display().to_string()]);
    let stderr = expect_exit(&run(&args), EXIT_USAGE);
    assert!(stderr.contains("--fisher"), "{stderr}");
    assert_no_output(&out);
}

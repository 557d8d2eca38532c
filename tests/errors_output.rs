//! The output side: rejected destinations, a full disk, interrupts during the write and
//! merged values that are NaN or overflow the output dtype. Every failure must leave the
//! destination as it was and remove the temporary folder.

mod common_errors;

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common_errors::*;
use gradmerge::checkpoint::Checkpoint;
use gradmerge::dtype::Dtype;
use gradmerge::format::encode_header;
use gradmerge::job::MergeJob;
use gradmerge::method::MethodKind;
use gradmerge::pipeline::EngineOptions;
use gradmerge::plan::PlanOptions;
use gradmerge::source::IoMode;
use gradmerge::Error;
use tempfile::TempDir;

fn two_models(dir: &Path) -> (PathBuf, PathBuf) {
    (
        write_model(&dir.join("a.safetensors"), &small_model(1.0)),
        write_model(&dir.join("b.safetensors"), &small_model(3.0)),
    )
}

// Destinations.

#[test]
fn destination_inside_input_folder() {
    let dir = TempDir::new().unwrap();
    let folder = dir.path().join("model");
    write_model(&folder.join("model.safetensors"), &small_model(1.0));
    let other = write_model(&dir.path().join("b.safetensors"), &small_model(3.0));
    let out = folder.join("merged");

    let err = merge_lib_error(
        config(MethodKind::Linear, None, &[&folder, &other], &[]),
        &out,
    );
    let Error::Destination { path, detail } = &err else {
        panic!("unexpected error: {err:?}")
    };
    assert_eq!(path, &out);
    assert!(detail.contains(folder.to_str().unwrap()), "{detail}");

    let output = run(merge_args("linear", None, &[&folder, &other], &out));
    let stderr = expect_exit(&output, EXIT_USAGE);
    assert!(stderr.contains("lies inside the input"), "{stderr}");
    assert_no_output(&out);
}

#[test]
fn destination_containing_input() {
    let dir = TempDir::new().unwrap();
    let folder = dir.path().join("models");
    let (a, b) = two_models(&folder);

    // Even with --force, the folder holding the inputs is never replaced.
    let mut args = merge_args("linear", None, &[&a, &b], &folder);
    args.push("--force".into());
    let stderr = expect_exit(&run(&args), EXIT_USAGE);
    assert!(stderr.contains("lies inside the input"), "{stderr}");
    assert!(a.is_file(), "input {} was removed", a.display());
    assert!(b.is_file(), "input {} was removed", b.display());
    assert_no_temp(&folder);
}

#[test]
fn destination_exists_without_force() {
    let dir = TempDir::new().unwrap();
    let (a, b) = two_models(dir.path());
    let out = dir.path().join("out");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("keep.txt"), "earlier results").unwrap();

    let err = merge_lib(config(MethodKind::Linear, None, &[&a, &b], &[]), &out).unwrap_err();
    let Error::Destination { detail, .. } = &err else {
        panic!("unexpected error: {err:?}")
    };
    assert!(detail.contains("--force"), "{detail}");

    let stderr = expect_exit(
        &run(merge_args("linear", None, &[&a, &b], &out)),
        EXIT_USAGE,
    );
    assert!(stderr.contains(out.to_str().unwrap()), "{stderr}");
    assert!(stderr.contains("not empty"), "{stderr}");
    assert_eq!(
        fs::read_to_string(out.join("keep.txt")).unwrap(),
        "earlier results"
    );
    assert!(!out.join("model.safetensors").exists());
    assert_no_temp(&out);
}

#[test]
fn destination_replaced_with_force() {
    let dir = TempDir::new().unwrap();
    let (a, b) = two_models(dir.path());
    let out = dir.path().join("out");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("keep.txt"), "earlier results").unwrap();

    let mut args = merge_args("linear", None, &[&a, &b], &out);
    args.push("--force".into());
    expect_exit(&run(&args), 0);
    assert!(!out.join("keep.txt").exists(), "old contents were kept");
    assert_eq!(
        read_f32(&out.join("model.safetensors"), "layer.weight"),
        [2.0, 4.0, -2.0, 0.5]
    );
    assert_no_temp(&out);
}

#[test]
fn destination_empty_folder_accepted() {
    let dir = TempDir::new().unwrap();
    let (a, b) = two_models(dir.path());
    let out = dir.path().join("out");
    fs::create_dir(&out).unwrap();
    expect_exit(&run(merge_args("linear", None, &[&a, &b], &out)), 0);
    assert!(out.join("model.safetensors").is_file());
    assert_no_temp(&out);
}

#[test]
fn destination_is_a_file() {
    let dir = TempDir::new().unwrap();
    let (a, b) = two_models(dir.path());
    let out = dir.path().join("out.safetensors");
    fs::write(&out, "not a folder").unwrap();

    let mut args = merge_args("linear", None, &[&a, &b], &out);
    args.push("--force".into());
    let stderr = expect_exit(&run(&args), EXIT_USAGE);
    assert!(stderr.contains("not a folder"), "{stderr}");
    assert_eq!(fs::read_to_string(&out).unwrap(), "not a folder");
    assert_no_temp(&out);
}

// A full disk.

/// Runs the binary with the file size limit (RLIMIT_FSIZE) set to `limit_bytes` and
/// SIGXFSZ ignored, so a write past the limit fails with EFBIG instead of killing it.
fn run_with_file_size_limit(args: &[String], limit_bytes: u64) -> std::process::Output {
    let mut cmd = gradmerge();
    cmd.args(args);
    // SAFETY: the closure runs in the forked child before exec. It calls only setrlimit
    // and signal, which are async-signal-safe, and touches no memory shared with the
    // parent.
    unsafe {
        cmd.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: limit_bytes as libc::rlim_t,
                rlim_max: limit_bytes as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::signal(libc::SIGXFSZ, libc::SIG_IGN) == libc::SIG_ERR {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().expect("run gradmerge")
}

#[test]
fn disk_full_while_writing() {
    let dir = TempDir::new().unwrap();
    let values: Vec<f32> = (0..256 * 1024).map(|i| i as f32).collect();
    let model = |scale: f32| {
        let scaled: Vec<f32> = values.iter().map(|v| v * scale).collect();
        vec![f32_tensor("w", &[512, 512], &scaled)]
    };
    let a = write_model(&dir.path().join("a.safetensors"), &model(1.0));
    let b = write_model(&dir.path().join("b.safetensors"), &model(2.0));
    let out = dir.path().join("out");

    // The output is 1 MiB of data; the limit stops it a quarter of the way in.
    let output = run_with_file_size_limit(&merge_args("linear", None, &[&a, &b], &out), 256 << 10);
    let stderr = expect_exit(&output, EXIT_FAILURE);
    assert!(stderr.contains("model.safetensors"), "{stderr}");
    assert!(stderr.contains("write"), "{stderr}");
    assert!(stderr.contains("File too large"), "{stderr}");
    assert_no_output(&out);
}

#[test]
fn disk_full_in_second_shard() {
    let dir = TempDir::new().unwrap();
    let model = |scale: f32| {
        vec![
            f32_tensor("a", &[1024], &vec![scale; 1024]),
            f32_tensor("b", &[64 * 1024], &vec![scale; 64 * 1024]),
        ]
    };
    let a = write_model(&dir.path().join("a.safetensors"), &model(1.0));
    let b = write_model(&dir.path().join("b.safetensors"), &model(2.0));
    let out = dir.path().join("out");

    // Shard 1 has 4 KiB of data and fits, but shard 2 has 256 KiB and does not.
    let mut args = merge_args("linear", None, &[&a, &b], &out);
    args.extend(["--shard-size".into(), "8KiB".into()]);
    let output = run_with_file_size_limit(&args, 64 << 10);
    let stderr = expect_exit(&output, EXIT_FAILURE);
    assert!(
        stderr.contains("model-00002-of-00002.safetensors"),
        "{stderr}"
    );
    assert_no_output(&out);
}

// Interrupts.

/// Writes a single-tensor BF16 checkpoint of `elems` zeros as a sparse file.
fn sparse_zeros(path: &Path, elems: u64) -> PathBuf {
    let (header, offsets) = encode_header(&[("w", Dtype::BF16, &[elems][..])], &[]);
    let mut file = File::create(path).unwrap();
    file.write_all(&header).unwrap();
    file.set_len(header.len() as u64 + offsets[0].1).unwrap();
    path.to_path_buf()
}

/// Waits until the child has written tensor data into its temporary folder beside `out`,
/// so the merge is past its setup and inside the write loop.
fn wait_for_data(child: &mut Child, out: &Path, header_bytes: u64) {
    let parent = out.parent().unwrap();
    let prefix = format!(
        ".{}.gradmerge-tmp-",
        out.file_name().unwrap().to_string_lossy()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("gradmerge exited with {status} before it could be interrupted");
        }
        let writing = fs::read_dir(parent).unwrap().any(|e| {
            let e = e.unwrap();
            e.file_name().to_string_lossy().starts_with(&prefix)
                && fs::metadata(e.path().join("model.safetensors"))
                    .is_ok_and(|m| m.len() > header_bytes)
        });
        if writing {
            return;
        }
        assert!(Instant::now() < deadline, "no data written within 60 s");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Starts a long merge of two sparse 300 MB inputs, sends `signal` once data is being
/// written, and checks the exit code, the message and that nothing is left behind.
fn check_interrupt(signal: libc::c_int) {
    let dir = TempDir::new().unwrap();
    let elems = 150_000_000;
    let a = sparse_zeros(&dir.path().join("a.safetensors"), elems);
    let b = sparse_zeros(&dir.path().join("b.safetensors"), elems);
    let header_bytes = fs::metadata(&a).unwrap().len() - 2 * elems;
    let out = dir.path().join("out");

    let mut args = merge_args("linear", None, &[&a, &b], &out);
    args.extend(
        [
            "--chunk-elems",
            "1024",
            "--threads",
            "1",
            "--channel-depth",
            "1",
        ]
        .map(String::from),
    );
    let mut child = gradmerge()
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_data(&mut child, &out, header_bytes);

    let pid = child.id() as libc::pid_t;
    // SAFETY: kill has no memory-safety preconditions; `pid` is our own child, which has
    // not been waited for, so the id cannot have been reused.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    let output = child.wait_with_output().unwrap();
    let stderr = stderr_of(&output);
    assert_eq!(
        output.status.code(),
        Some(130),
        "status {:?}, stderr:\n{stderr}",
        output.status
    );
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert_no_output(&out);
}

#[test]
fn sigint_during_write() {
    check_interrupt(libc::SIGINT);
}

#[test]
fn sigterm_during_write() {
    check_interrupt(libc::SIGTERM);
}

// Values the output dtype cannot hold.

#[test]
fn nan_output_names_tensor() {
    let dir = TempDir::new().unwrap();
    let a = write_model(
        &dir.path().join("a.safetensors"),
        &[
            f32_tensor("fine", &[2], &[1.0, 2.0]),
            f32_tensor("broken", &[3], &[1.0, f32::INFINITY, f32::INFINITY]),
        ],
    );
    let b = write_model(
        &dir.path().join("b.safetensors"),
        &[
            f32_tensor("fine", &[2], &[1.0, 2.0]),
            f32_tensor("broken", &[3], &[1.0, f32::NEG_INFINITY, f32::NEG_INFINITY]),
        ],
    );
    let out = dir.path().join("out");

    // The inputs hold the infinities, so the error names the first one.
    let err = merge_lib_error(config(MethodKind::Linear, None, &[&a, &b], &[]), &out);
    let text = err.to_string();
    assert!(
        matches!(err, Error::Mismatch(_))
            && text.contains("tensor `broken`: 2 merged values are NaN or infinite")
            && text.contains(&format!(
                "because {} contains inf at element 1",
                a.display()
            )),
        "{err:?}"
    );

    let stderr = cli_linear_fails(&[&a, &b], &out, &["`broken`", "--allow-non-finite"]);
    assert!(stderr.contains("2 merged values"), "{stderr}");

    // The library option lets the values through.
    let mut job = MergeJob::open(
        config(MethodKind::Linear, None, &[&a, &b], &[]),
        IoMode::Mmap,
        PlanOptions::default(),
    )
    .unwrap();
    let engine = EngineOptions {
        allow_non_finite: true,
        ..EngineOptions::default()
    };
    let summary = job.run(Some((&out, false)), &engine, None, &[]).unwrap();
    let broken = summary
        .per_tensor
        .iter()
        .find(|t| t.name == "broken")
        .unwrap();
    assert_eq!(broken.non_finite, 2);
    let values = read_f32(&out.join("model.safetensors"), "broken");
    assert_eq!(values[0], 1.0);
    assert!(values[1].is_nan(), "{values:?}");
    assert!(values[2].is_nan(), "{values:?}");
}

#[test]
fn nan_input_stops_sparse_methods() {
    // TIES and DARE would drop a NaN task-vector value (its sign agrees with nothing), so
    // the output would look finite: the merge must stop instead.
    let dir = TempDir::new().unwrap();
    let tensor = |name: &str, values: &[f32]| f32_tensor(name, &[4], values);
    let base = write_model(
        &dir.path().join("base.safetensors"),
        &[tensor("w", &[0.0, 0.0, 0.0, 0.0])],
    );
    let a = write_model(
        &dir.path().join("a.safetensors"),
        &[tensor("w", &[1.0, f32::NAN, 1.0, 1.0])],
    );
    let b = write_model(
        &dir.path().join("b.safetensors"),
        &[tensor("w", &[1.0, 2.0, 1.0, 1.0])],
    );
    for kind in [
        MethodKind::Ties,
        MethodKind::DareTies,
        MethodKind::Breadcrumbs,
    ] {
        let mut cfg = config(kind, Some(&base), &[&a, &b], &[]);
        set_global(&mut cfg, "density", 1.0);
        let out = dir.path().join(format!("out-{kind}"));
        let err = merge_lib_error(cfg.clone(), &out);
        let text = err.to_string();
        assert!(
            matches!(err, Error::Mismatch(_))
                && text.contains("tensor `w`: 1 task-vector value is NaN or infinite")
                && text.contains("--allow-non-finite"),
            "{kind}: {err:?}"
        );
        assert_no_output(&out);

        let mut job = MergeJob::open(cfg, IoMode::Mmap, PlanOptions::default()).unwrap();
        let engine = EngineOptions {
            allow_non_finite: true,
            ..EngineOptions::default()
        };
        job.run(Some((&out, false)), &engine, None, &[])
            .unwrap_or_else(|e| panic!("{kind} with --allow-non-finite: {e}"));
    }
}

#[test]
fn f16_overflow_names_tensor() {
    let dir = TempDir::new().unwrap();
    let model = |big: f32| {
        vec![
            f32_tensor("small", &[2], &[1.0, -1.0]),
            f32_tensor("large", &[4], &[big, -big, 1.0, 65504.0]),
        ]
    };
    let a = write_model(&dir.path().join("a.safetensors"), &model(70000.0));
    let b = write_model(&dir.path().join("b.safetensors"), &model(90000.0));
    let out = dir.path().join("out");

    let mut cfg = config(MethodKind::Linear, None, &[&a, &b], &[]);
    cfg.out_dtype = Some(Dtype::F16);
    let err = merge_lib_error(cfg, &out);
    let Error::NonFinite {
        tensor,
        count,
        dtype,
    } = &err
    else {
        panic!("unexpected error: {err:?}")
    };
    assert_eq!(tensor, "large");
    assert_eq!(*count, 2);
    assert_eq!(*dtype, Dtype::F16);

    let mut args = merge_args("linear", None, &[&a, &b], &out);
    args.extend(["--out-dtype".into(), "float16".into()]);
    let stderr = expect_exit(&run(&args), EXIT_FAILURE);
    assert!(stderr.contains("`large`"), "{stderr}");
    assert!(stderr.contains("F16"), "{stderr}");
    assert_no_output(&out);

    args.push("--allow-non-finite".into());
    expect_exit(&run(&args), 0);
    let merged = Checkpoint::open(&out.join("model.safetensors"), IoMode::Read).unwrap();
    let (source, info) = merged.get("large").unwrap();
    assert_eq!(info.dtype, Dtype::F16);
    let bytes = source.bytes(info, 0..info.size_bytes()).unwrap();
    let values: Vec<f32> = bytes
        .chunks_exact(2)
        .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect();
    assert_eq!(values, [f32::INFINITY, f32::NEG_INFINITY, 1.0, 65504.0]);
    assert_no_temp(&out);
}

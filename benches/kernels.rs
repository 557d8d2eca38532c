//! Kernel and conversion throughput on one thread, in bytes of input per second, next to a
//! plain memcpy of the same bytes measured in the same run.
//!
//! Each method runs the engine's per-tile loop (load every input tile to f32, apply the
//! kernel, store the output) over one 512 x 512 tensor of a synthetic family, so the
//! inputs sit in the L2 cache and the numbers show compute cost, not memory bandwidth.
//! Methods with a fused loop (`method::fused`) are also timed on it, as `fused`.
//!
//!     cargo bench --bench kernels
//!     cargo bench --bench kernels -- 'kernel/bf16'     # one group

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gradmerge::config::{MergeConfig, ModelEntry, TokenizerSource};
use gradmerge::convert::{Real, TILE_ELEMS};
use gradmerge::dtype::Dtype;
use gradmerge::job::MergeJob;
use gradmerge::method::{FisherNormalize, KernelStats, MethodKind, Rescale};
use gradmerge::params::{LayerPosition, MergeParams, ParamValue};
use gradmerge::plan::PlanOptions;
use gradmerge::source::IoMode;
use gradmerge::synth::{generate, Architecture, Family, FamilyOptions};

const METHODS: [MethodKind; 6] = [
    MethodKind::Linear,
    MethodKind::TaskArithmetic,
    MethodKind::Ties,
    MethodKind::DareTies,
    MethodKind::Fisher,
    MethodKind::GradMatch,
];

/// One layer with every matrix 512 x 512 (256 Ki elements).
fn architecture() -> Architecture {
    Architecture {
        hidden: 512,
        intermediate: 512,
        kv_dim: 512,
        layers: 1,
        vocab: 512,
        head_dim: 64,
    }
}

fn open_job(kind: MethodKind, family: &Family) -> MergeJob {
    let mut params = MergeParams {
        models: vec![Default::default(); family.models.len()],
        ..MergeParams::default()
    };
    params
        .global
        .insert("weight".into(), ParamValue::Scalar(0.5));
    if kind.model_parameters().contains(&"density") {
        params
            .global
            .insert("density".into(), ParamValue::Scalar(0.5));
    }
    let config = MergeConfig {
        method: kind,
        base_model: kind.uses_base().then(|| family.base.clone()),
        base_fisher: None,
        models: family
            .models
            .iter()
            .enumerate()
            .map(|(m, p)| ModelEntry {
                path: p.clone(),
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
    };
    MergeJob::open(config, IoMode::Mmap, PlanOptions::default()).expect("synthetic family opens")
}

/// Raw bytes of every input of the `q_proj` tensor, in the method's input order.
fn input_bytes(job: &MergeJob, index: usize) -> Vec<Vec<u8>> {
    let inputs = job.plan.tensor_inputs(&job.inputs, index);
    inputs
        .views
        .iter()
        .map(|v| v.bytes(&(0..inputs.elems)).expect("mapped").into_owned())
        .collect()
}

fn bench_kernels(c: &mut Criterion) {
    let dir = tempfile::TempDir::new().expect("temporary folder");
    for dtype in [Dtype::BF16, Dtype::F16, Dtype::F32] {
        let root = dir.path().join(dtype.header_name());
        let family =
            generate(&root, &FamilyOptions::new(architecture(), dtype)).expect("synthetic family");
        let mut group = c.benchmark_group(format!("kernel/{}", dtype.header_name()));
        for kind in METHODS {
            let job = open_job(kind, &family);
            let index = job
                .plan
                .tensors
                .iter()
                .position(|t| t.name.ends_with("q_proj.weight"))
                .expect("q_proj present");
            let inputs = job.plan.tensor_inputs(&job.inputs, index);
            let layout = job.inputs.layout(kind);
            let position = LayerPosition {
                layer: Some(0),
                num_layers: 1,
            };
            let kernel = job
                .method
                .prepare(layout, &inputs, position)
                .expect("kernel prepares");
            let raw = input_bytes(&job, index);
            let total: usize = raw.iter().map(Vec::len).sum();
            group.throughput(Throughput::Bytes(total as u64));

            group.bench_function(BenchmarkId::new("memcpy", kind.name()), |b| {
                let mut copy = vec![0u8; total];
                b.iter(|| {
                    let mut offset = 0;
                    for input in &raw {
                        copy[offset..offset + input.len()].copy_from_slice(input);
                        offset += input.len();
                    }
                    black_box(&copy);
                })
            });
            group.bench_function(BenchmarkId::new("merge", kind.name()), |b| {
                let elems = inputs.elems as usize;
                let size = dtype.size_bytes();
                let mut tiles = vec![vec![0f32; TILE_ELEMS]; raw.len()];
                let mut result = vec![0f32; TILE_ELEMS];
                let mut out = Vec::with_capacity(elems * size);
                b.iter(|| {
                    out.clear();
                    let mut stats = KernelStats::default();
                    for start in (0..elems).step_by(TILE_ELEMS) {
                        let len = TILE_ELEMS.min(elems - start);
                        for (tile, bytes) in tiles.iter_mut().zip(&raw) {
                            f32::load(
                                dtype,
                                &bytes[start * size..(start + len) * size],
                                &mut tile[..len],
                            );
                        }
                        let refs: Vec<&[f32]> = tiles.iter().map(|t| &t[..len]).collect();
                        kernel.apply_f32(start as u64, &refs, &mut result[..len], &mut stats);
                        f32::store(dtype, &result[..len], &mut out);
                    }
                    black_box((&out, stats));
                })
            });
            let slices: Vec<&[u8]> = raw.iter().map(Vec::as_slice).collect();
            if kernel.has_stored_path(slices.len(), dtype, dtype) {
                group.bench_function(BenchmarkId::new("fused", kind.name()), |b| {
                    let mut out = Vec::with_capacity(inputs.elems as usize * dtype.size_bytes());
                    b.iter(|| {
                        out.clear();
                        let counts = kernel.apply_stored(&slices, dtype, dtype, &mut out);
                        black_box((&out, counts.expect("aligned inputs")));
                    })
                });
            }
        }
        group.finish();
    }
}

/// Conversion loops alone: bytes of the stored dtype per second, one thread.
fn bench_conversion(c: &mut Criterion) {
    const ELEMS: usize = 1 << 18;
    let values: Vec<f32> = (0..ELEMS).map(|i| (i as f32 * 1e-3).sin()).collect();
    let mut group = c.benchmark_group("convert");
    for dtype in [Dtype::BF16, Dtype::F16, Dtype::F32] {
        let mut bytes = Vec::new();
        f32::store(dtype, &values, &mut bytes);
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_function(BenchmarkId::new("memcpy", dtype.header_name()), |b| {
            let mut copy = vec![0u8; bytes.len()];
            b.iter(|| {
                copy.copy_from_slice(&bytes);
                black_box(&copy);
            })
        });
        group.bench_function(BenchmarkId::new("load", dtype.header_name()), |b| {
            let mut out = vec![0f32; ELEMS];
            b.iter(|| {
                f32::load(dtype, black_box(&bytes), &mut out);
                black_box(&out);
            })
        });
        group.bench_function(BenchmarkId::new("store", dtype.header_name()), |b| {
            let mut out = Vec::with_capacity(bytes.len());
            b.iter(|| {
                out.clear();
                black_box(f32::store(dtype, black_box(&values), &mut out));
            })
        });
    }
    group.finish();
}

fn config() -> Criterion {
    // Short runs: the kernels are steady within a second, and the machine is shared.
    Criterion::default()
        .sample_size(20)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_kernels, bench_conversion
}
criterion_main!(benches);

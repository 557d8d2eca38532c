//! Test inputs and outputs for the method tests: random checkpoints written as real
//! safetensors files, merges run through `MergeJob`, merged files read back with the
//! `safetensors` crate, and comparisons in units in the last place of the output dtype.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use gradmerge::config::{MergeConfig, ModelEntry, TokenizerSource};
use gradmerge::dtype::Dtype;
use gradmerge::job::MergeJob;
use gradmerge::method::{FisherNormalize, MethodKind, Rescale};
use gradmerge::params::{MergeParams, ParamValue};
use gradmerge::pipeline::{EngineOptions, Precision, Summary};
use gradmerge::plan::PlanOptions;
use gradmerge::source::IoMode;
use half::{bf16, f16};

/// SplitMix64: a small deterministic generator for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal, by the Box-Muller transform.
    pub fn normal(&mut self) -> f64 {
        let u = 1.0 - self.uniform();
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    /// Uniform integer in [lo, hi].
    pub fn int(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as i64
    }
}

/// Rounds `x` to the nearest value of a float `dtype` (ties to even) and returns it
/// exactly as f64.
pub fn quantize(x: f64, dtype: Dtype) -> f64 {
    match dtype {
        Dtype::F64 => x,
        Dtype::F32 => x as f32 as f64,
        Dtype::BF16 | Dtype::F16 => decode_bits(dtype, nearest_bits16(x, dtype)),
        other => panic!("no float rounding for {other}"),
    }
}

fn decode_bits(dtype: Dtype, bits: u16) -> f64 {
    match dtype {
        Dtype::BF16 => bf16::from_bits(bits).to_f64(),
        Dtype::F16 => f16::from_bits(bits).to_f64(),
        other => panic!("not a 16-bit float: {other}"),
    }
}

/// Correctly rounded 16-bit encoding of `x`: `half`'s conversion from f64 can round
/// twice, so its result and both neighbours are compared exactly and the nearest wins,
/// ties going to the even encoding.
fn nearest_bits16(x: f64, dtype: Dtype) -> u16 {
    let approx = match dtype {
        Dtype::BF16 => bf16::from_f64(x).to_bits(),
        _ => f16::from_f64(x).to_bits(),
    };
    if x.is_nan() || !decode_bits(dtype, approx).is_finite() {
        return approx;
    }
    let sign = approx & 0x8000;
    let magnitude = approx & 0x7FFF;
    let mut best = approx;
    let mut best_error = (decode_bits(dtype, approx) - x).abs();
    for candidate in [magnitude.wrapping_sub(1), magnitude + 1] {
        if candidate > 0x7FFF {
            continue;
        }
        let bits = sign | candidate;
        let value = decode_bits(dtype, bits);
        if !value.is_finite() {
            continue;
        }
        let error = (value - x).abs();
        if error < best_error || (error == best_error && bits & 1 == 0) {
            best = bits;
            best_error = error;
        }
    }
    best
}

/// Encodes exact values of `dtype` as little-endian bytes.
pub fn encode(values: &[f64], dtype: Dtype) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * dtype.size_bytes());
    for &v in values {
        match dtype {
            Dtype::F64 => out.extend_from_slice(&v.to_le_bytes()),
            Dtype::F32 => out.extend_from_slice(&(v as f32).to_le_bytes()),
            Dtype::BF16 | Dtype::F16 => {
                out.extend_from_slice(&nearest_bits16(v, dtype).to_le_bytes())
            }
            other => panic!("cannot encode {other}"),
        }
    }
    out
}

/// Decodes little-endian float bytes exactly.
pub fn decode(bytes: &[u8], dtype: Dtype) -> Vec<f64> {
    match dtype {
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        Dtype::BF16 | Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| decode_bits(dtype, u16::from_le_bytes([b[0], b[1]])))
            .collect(),
        other => panic!("cannot decode {other}"),
    }
}

/// One tensor: name, shape and exact values.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<u64>,
    pub values: Vec<f64>,
}

/// One checkpoint or Fisher file in memory.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub dtype: Dtype,
    pub tensors: Vec<Tensor>,
    pub metadata: Vec<(String, String)>,
}

impl Checkpoint {
    /// Values of tensor `name`.
    pub fn get(&self, name: &str) -> &[f64] {
        &self
            .tensors
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no tensor `{name}`"))
            .values
    }

    /// Writes the checkpoint as a safetensors file with gradmerge's header encoder.
    pub fn write(&self, path: &Path) {
        let specs: Vec<(&str, Dtype, &[u64])> = self
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), self.dtype, t.shape.as_slice()))
            .collect();
        let (mut bytes, _) = gradmerge::format::encode_header(&specs, &self.metadata);
        for t in &self.tensors {
            bytes.extend_from_slice(&encode(&t.values, self.dtype));
        }
        std::fs::write(path, bytes).unwrap();
    }

    /// Reads a safetensors file with the `safetensors` crate.
    pub fn read(path: &Path) -> Checkpoint {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let parsed = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut names: Vec<(usize, String)> = parsed
            .names()
            .into_iter()
            .map(|n| (header.info(n).unwrap().data_offsets.0, n.to_string()))
            .collect();
        names.sort();
        let mut dtypes = Vec::new();
        let tensors = names
            .into_iter()
            .map(|(_, name)| {
                let view = parsed.tensor(&name).unwrap();
                let dtype = Dtype::from_header_name(&format!("{:?}", view.dtype()))
                    .unwrap_or_else(|| panic!("unknown dtype {:?}", view.dtype()));
                dtypes.push(dtype);
                Tensor {
                    shape: view.shape().iter().map(|&d| d as u64).collect(),
                    values: if dtype.is_mergeable_float() {
                        decode(view.data(), dtype)
                    } else {
                        Vec::new()
                    },
                    name,
                }
            })
            .collect();
        let metadata = header
            .metadata()
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        Checkpoint {
            dtype: dtypes.first().copied().unwrap_or(Dtype::F32),
            tensors,
            metadata,
        }
    }
}

/// Tensor names and shapes of the random checkpoints. They include a 0-d tensor, odd 1-d,
/// 2-d and 3-d shapes, and a tensor of few distinct values, whose task vectors have many
/// equal magnitudes and exact zeros. The last is larger than a reduction block (65,536
/// elements).
pub const SHAPES: &[(&str, &[u64])] = &[
    ("scale", &[]),
    ("layers.0.bias", &[7]),
    ("layers.0.weight", &[13, 17]),
    ("layers.1.weight", &[3, 5, 11]),
    ("layers.1.tied_values", &[9, 31]),
    (LARGE, &[257, 263]),
];

/// Name of the tensor larger than a reduction block.
pub const LARGE: &str = "embed.weight";

/// Name of the tensor whose task vectors take few distinct values.
pub const TIED_VALUES: &str = "layers.1.tied_values";

/// How the random values are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// Base values around 0, so merged values can cancel to nearly 0.
    General,
    /// Base magnitudes in [0.5, 1] and task vectors of at most 0.19, so no merged value
    /// comes near 0 and f32 rounding errors stay far below a bf16 ulp.
    NoCancellation,
}

/// A base, models, one Fisher per model and a base Fisher, in memory and on disk.
pub struct Case {
    pub dir: tempfile::TempDir,
    pub base: Checkpoint,
    pub models: Vec<Checkpoint>,
    pub fishers: Vec<Checkpoint>,
    pub base_fisher: Checkpoint,
    pub base_path: PathBuf,
    pub model_paths: Vec<PathBuf>,
    pub fisher_paths: Vec<PathBuf>,
    pub base_fisher_path: PathBuf,
}

/// `fisher.examples` of the random Fisher files, per model.
pub const FISHER_EXAMPLES: [f64; 4] = [120.0, 80.0, 200.0, 50.0];
/// `fisher.examples` of the random base Fisher.
pub const BASE_FISHER_EXAMPLES: f64 = 300.0;

impl Case {
    /// Draws `models` models in `dtype` with the tensors of [`SHAPES`].
    pub fn random(seed: u64, models: usize, dtype: Dtype, profile: Profile) -> Case {
        Case::with_shapes(seed, models, dtype, profile, SHAPES)
    }

    /// Draws `models` models in `dtype` with the given tensors.
    pub fn with_shapes(
        seed: u64,
        models: usize,
        dtype: Dtype,
        profile: Profile,
        shapes: &[(&str, &[u64])],
    ) -> Case {
        let mut rng = Rng::new(seed);
        let elems = |shape: &[u64]| shape.iter().product::<u64>() as usize;
        let checkpoint = |tensors: Vec<Tensor>, metadata: Vec<(String, String)>| Checkpoint {
            dtype,
            tensors,
            metadata,
        };

        let mut base_tensors = Vec::new();
        for &(name, shape) in shapes {
            let values = (0..elems(shape))
                .map(|_| {
                    let v = match (name, profile) {
                        (TIED_VALUES, Profile::General) => rng.int(-32, 32) as f64 / 64.0,
                        (TIED_VALUES, Profile::NoCancellation) => {
                            rng.int(32, 48) as f64 / 64.0
                                * if rng.uniform() < 0.5 { -1.0 } else { 1.0 }
                        }
                        (_, Profile::General) => 0.1 * rng.normal(),
                        (_, Profile::NoCancellation) => {
                            let sign = if rng.uniform() < 0.5 { -1.0 } else { 1.0 };
                            sign * (0.5 + 0.5 * rng.uniform())
                        }
                    };
                    quantize(v, dtype)
                })
                .collect();
            base_tensors.push(Tensor {
                name: name.to_string(),
                shape: shape.to_vec(),
                values,
            });
        }
        let base = checkpoint(base_tensors, Vec::new());

        let mut model_list = Vec::new();
        for m in 0..models {
            let spread = 0.01 * (m + 1) as f64;
            let tensors = base
                .tensors
                .iter()
                .map(|t| Tensor {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    values: t
                        .values
                        .iter()
                        .map(|&b| {
                            let tau = if t.name == TIED_VALUES {
                                rng.int(-3, 3) as f64 / 16.0
                            } else {
                                (spread * rng.normal()).clamp(-0.08, 0.08)
                            };
                            quantize(b + tau, dtype)
                        })
                        .collect(),
                })
                .collect();
            model_list.push(checkpoint(tensors, Vec::new()));
        }

        // Fishers: squared normals of varied scale, about one in eight exactly 0.
        let fisher = |examples: f64, rng: &mut Rng| {
            let tensors = base
                .tensors
                .iter()
                .map(|t| Tensor {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    values: (0..t.values.len())
                        .map(|_| {
                            if rng.uniform() < 0.125 {
                                0.0
                            } else {
                                let g = rng.normal() * 10f64.powf(rng.uniform() * 2.0 - 3.0);
                                quantize(g * g, dtype)
                            }
                        })
                        .collect(),
                })
                .collect();
            checkpoint(
                tensors,
                vec![
                    ("fisher.examples".to_string(), examples.to_string()),
                    ("format".to_string(), "pt".to_string()),
                ],
            )
        };
        let fishers: Vec<Checkpoint> = (0..models)
            .map(|m| fisher(FISHER_EXAMPLES[m % FISHER_EXAMPLES.len()], &mut rng))
            .collect();
        let base_fisher = fisher(BASE_FISHER_EXAMPLES, &mut rng);

        let dir = tempfile::tempdir().unwrap();
        let inputs = dir.path().join("inputs");
        std::fs::create_dir(&inputs).unwrap();
        let base_path = inputs.join("base.safetensors");
        base.write(&base_path);
        let mut model_paths = Vec::new();
        let mut fisher_paths = Vec::new();
        for m in 0..models {
            let path = inputs.join(format!("model{m}.safetensors"));
            model_list[m].write(&path);
            model_paths.push(path);
            let path = inputs.join(format!("fisher{m}.safetensors"));
            fishers[m].write(&path);
            fisher_paths.push(path);
        }
        let base_fisher_path = inputs.join("base_fisher.safetensors");
        base_fisher.write(&base_fisher_path);
        Case {
            dir,
            base,
            models: model_list,
            fishers,
            base_fisher,
            base_path,
            model_paths,
            fisher_paths,
            base_fisher_path,
        }
    }

    /// Returns every model's values of tensor `name`.
    pub fn model_values(&self, name: &str) -> Vec<&[f64]> {
        self.models.iter().map(|m| m.get(name)).collect()
    }

    /// Returns every model Fisher's values of tensor `name`.
    pub fn fisher_values(&self, name: &str) -> Vec<&[f64]> {
        self.fishers.iter().map(|f| f.get(name)).collect()
    }

    /// Returns a path inside the case's temporary folder that does not exist yet.
    pub fn out_dir(&self, label: &str) -> PathBuf {
        let mut i = 0;
        loop {
            let path = self.dir.path().join(format!("out-{label}-{i}"));
            if !path.exists() {
                return path;
            }
            i += 1;
        }
    }

    /// Builds a configuration for `method` without parameters. It names the base (for
    /// methods that use one), every model and, for Fisher methods, every model's Fisher.
    pub fn config(&self, method: MethodKind) -> Merge {
        Merge {
            config: MergeConfig {
                method,
                base_model: if method.uses_base() {
                    Some(self.base_path.clone())
                } else {
                    None
                },
                base_fisher: None,
                models: self
                    .model_paths
                    .iter()
                    .zip(&self.fisher_paths)
                    .map(|(path, fisher)| ModelEntry {
                        path: path.clone(),
                        fisher: method.uses_fishers().then(|| fisher.clone()),
                    })
                    .collect(),
                params: MergeParams {
                    models: vec![BTreeMap::new(); self.models.len()],
                    ..MergeParams::default()
                },
                dtype: None,
                out_dtype: None,
                tokenizer_source: TokenizerSource::Base,
                rescale: Rescale::L1,
                fisher_normalize: FisherNormalize::None,
                layer_range: None,
            },
        }
    }
}

/// A merge configuration with a builder for the parameters used in tests.
#[derive(Clone, Debug)]
pub struct Merge {
    pub config: MergeConfig,
}

impl Merge {
    /// Sets a global parameter.
    pub fn global(mut self, key: &str, value: f64) -> Merge {
        self.config
            .params
            .global
            .insert(key.to_string(), ParamValue::Scalar(value));
        self
    }

    /// Sets model `m`'s parameter.
    pub fn model(mut self, m: usize, key: &str, value: f64) -> Merge {
        self.config.params.models[m].insert(key.to_string(), ParamValue::Scalar(value));
        self
    }

    /// Sets the same parameter for every model, one value each.
    pub fn models(mut self, key: &str, values: &[f64]) -> Merge {
        for (m, &v) in values.iter().enumerate() {
            self = self.model(m, key, v);
        }
        self
    }

    /// Sets the base model's parameter (for `linear`, where the base is an input).
    pub fn base_param(mut self, key: &str, value: f64) -> Merge {
        self.config
            .params
            .base
            .insert(key.to_string(), ParamValue::Scalar(value));
        self
    }

    /// Adds the base model as an input (for `linear`).
    pub fn with_base(mut self, path: &Path) -> Merge {
        self.config.base_model = Some(path.to_path_buf());
        self
    }

    /// Adds the base Fisher (for `gradmatch`).
    pub fn with_base_fisher(mut self, path: &Path) -> Merge {
        self.config.base_fisher = Some(path.to_path_buf());
        self
    }

    /// Keeps only the first `n` models.
    pub fn first_models(mut self, n: usize) -> Merge {
        self.config.models.truncate(n);
        self.config.params.models.truncate(n);
        self
    }

    pub fn out_dtype(mut self, dtype: Dtype) -> Merge {
        self.config.out_dtype = Some(dtype);
        self
    }

    pub fn rescale(mut self, rescale: Rescale) -> Merge {
        self.config.rescale = rescale;
        self
    }

    pub fn fisher_normalize(mut self, normalize: FisherNormalize) -> Merge {
        self.config.fisher_normalize = normalize;
        self
    }

    /// Runs the merge into `dest` and returns the engine's summary.
    pub fn run_with(
        &self,
        dest: &Path,
        engine: &EngineOptions,
        io: IoMode,
    ) -> gradmerge::Result<Summary> {
        let mut job = MergeJob::open(self.config.clone(), io, PlanOptions::default())?;
        job.run(Some((dest, false)), engine, None, &[])
    }

    /// Runs the merge into `dest` and reads the merged file back.
    pub fn run(&self, dest: &Path, engine: &EngineOptions) -> Checkpoint {
        self.run_with(dest, engine, IoMode::Mmap)
            .unwrap_or_else(|e| panic!("{} merge failed: {e}", self.config.method));
        Checkpoint::read(&dest.join("model.safetensors"))
    }
}

/// Engine options with the given precision and chunk size, everything else default.
pub fn engine(precision: Precision, chunk_elems: Option<u64>) -> EngineOptions {
    EngineOptions {
        precision,
        chunk_elems,
        ..EngineOptions::default()
    }
}

/// Returns the position of a value on the number line of `dtype`, in units in the last
/// place. +0 and -0 share position 0.
pub fn ulp_position(x: f64, dtype: Dtype) -> i64 {
    let (sign, magnitude) = match dtype {
        Dtype::F64 => {
            let bits = x.to_bits();
            (bits >> 63 == 1, (bits & !(1 << 63)) as i64)
        }
        Dtype::F32 => {
            let bits = (x as f32).to_bits();
            (bits >> 31 == 1, (bits & 0x7FFF_FFFF) as i64)
        }
        Dtype::BF16 | Dtype::F16 => {
            let bits = nearest_bits16(x, dtype);
            (bits >> 15 == 1, (bits & 0x7FFF) as i64)
        }
        other => panic!("no ulps for {other}"),
    };
    if sign {
        -magnitude
    } else {
        magnitude
    }
}

/// Distance in ulps of `dtype` between a stored value and an exact value rounded to
/// `dtype`.
pub fn ulp_distance(stored: f64, exact: f64, dtype: Dtype) -> u64 {
    assert!(stored.is_finite(), "stored value {stored} is not finite");
    assert!(exact.is_finite(), "reference value {exact} is not finite");
    (ulp_position(stored, dtype) - ulp_position(quantize(exact, dtype), dtype)).unsigned_abs()
}

/// Asserts that tensor `name` of `output` has `shape` and values within `max_ulps` of
/// `expected` after rounding to the output dtype.
///
/// A value may also differ by at most `abs_slack`. Where a merge cancels to nearly 0, the
/// f64 reference is only accurate to a few f64 ulps of the terms it adds, and the output
/// dtype's ulp there can be smaller than that.
pub fn assert_tensor_close(
    output: &Checkpoint,
    name: &str,
    shape: &[u64],
    expected: &[f64],
    max_ulps: u64,
    abs_slack: f64,
    label: &str,
) {
    let tensor = output
        .tensors
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("{label}: output has no tensor `{name}`"));
    assert_eq!(tensor.shape, shape, "{label}: shape of `{name}`");
    assert_eq!(
        tensor.values.len(),
        expected.len(),
        "{label}: length of `{name}`"
    );
    let dtype = output.dtype;
    let mut worst = (0u64, 0usize);
    for (j, (&got, &want)) in tensor.values.iter().zip(expected).enumerate() {
        let d = ulp_distance(got, want, dtype);
        if d > worst.0 && (got - want).abs() > abs_slack {
            worst = (d, j);
        }
    }
    let (d, j) = worst;
    assert!(
        d <= max_ulps,
        "{label}: `{name}`[{j}] = {} but the reference is {} ({d} ulps of {dtype} apart, at most {max_ulps} or {abs_slack:e} allowed)",
        tensor.values[j],
        expected[j]
    );
}

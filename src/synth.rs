//! Synthetic model families for benchmarks and tests: a base checkpoint, fine-tuned
//! variants (the base plus small deterministic noise) and one Fisher file per variant,
//! with the tensor names and shapes of a Llama architecture in Hugging Face layout.
//!
//! ```text
//! ROOT/base/       config.json, model.safetensors or model-0000i-of-0000N + index
//! ROOT/model-1/    base + noise, same layout
//! ROOT/fisher-1/   non-negative values, `fisher.examples` in the header metadata
//! ```
//!
//! Values come from a counter-based hash of (seed, checkpoint, tensor, element), so a
//! family is the same bytes on every machine and thread count. In sparse mode each file
//! gets its header and is then extended with `set_len`, so the data section is a hole
//! that takes no disk space and reads as zeros (valid weights and valid Fishers).

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rayon::prelude::*;
use serde_json::json;

use crate::checkpoint::{INDEX_FILE, SINGLE_FILE};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::format::{encode_header, encode_index};

/// An architecture preset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// A two-layer Llama of about 100 thousand parameters, for tests.
    LlamaTiny,
    /// Llama 2 7B: hidden 4096, intermediate 11008, 32 layers.
    Llama7b,
    /// Llama 2 13B: hidden 5120, intermediate 13824, 40 layers.
    Llama13b,
    /// Llama 2 70B: hidden 8192, intermediate 28672, 80 layers, grouped-query attention
    /// with 8 key/value heads, so `k_proj` and `v_proj` have 1024 rows.
    Llama70b,
}

impl Preset {
    /// Every preset, smallest first.
    pub const ALL: [Preset; 4] = [
        Preset::LlamaTiny,
        Preset::Llama7b,
        Preset::Llama13b,
        Preset::Llama70b,
    ];

    /// The command-line name (`llama-7b`).
    pub fn name(self) -> &'static str {
        match self {
            Preset::LlamaTiny => "llama-tiny",
            Preset::Llama7b => "llama-7b",
            Preset::Llama13b => "llama-13b",
            Preset::Llama70b => "llama-70b",
        }
    }

    /// The full-size architecture, with the dimensions of the published configs.
    pub fn architecture(self) -> Architecture {
        let (hidden, intermediate, layers, heads, kv_heads, vocab) = match self {
            Preset::LlamaTiny => (64, 172, 2, 4, 2, 256),
            Preset::Llama7b => (4096, 11008, 32, 32, 32, 32000),
            Preset::Llama13b => (5120, 13824, 40, 40, 40, 32000),
            Preset::Llama70b => (8192, 28672, 80, 64, 8, 32000),
        };
        let head_dim = hidden / heads;
        Architecture {
            hidden,
            intermediate,
            kv_dim: kv_heads * head_dim,
            layers,
            vocab,
            head_dim,
        }
    }
}

impl FromStr for Preset {
    type Err = Error;

    fn from_str(s: &str) -> Result<Preset> {
        Preset::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Preset::ALL.iter().map(|p| p.name()).collect();
                Error::InvalidParameter(format!(
                    "unknown architecture preset `{s}` (known: {})",
                    names.join(", ")
                ))
            })
    }
}

/// Dimensions of a Llama-style decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Architecture {
    /// Hidden size (rows of `q_proj` and `o_proj`).
    pub hidden: u64,
    /// MLP intermediate size.
    pub intermediate: u64,
    /// Rows of `k_proj` and `v_proj`: key/value heads times the head dimension.
    pub kv_dim: u64,
    /// Decoder layers.
    pub layers: u64,
    /// Vocabulary size (rows of `embed_tokens` and `lm_head`).
    pub vocab: u64,
    /// Dimension of one attention head, for config.json.
    pub head_dim: u64,
}

impl Architecture {
    /// Divides the hidden, intermediate and key/value widths by `scale` (rounding up) and
    /// replaces the layer count when `layers` is given. The vocabulary keeps its size.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a zero scale or zero layers.
    pub fn scaled(&self, scale: u64, layers: Option<u64>) -> Result<Architecture> {
        if scale == 0 {
            return Err(Error::InvalidParameter(
                "--scale must be at least 1 (1 keeps the preset's sizes)".into(),
            ));
        }
        if layers == Some(0) {
            return Err(Error::InvalidParameter(
                "--layers must be at least 1".into(),
            ));
        }
        let hidden = self.hidden.div_ceil(scale);
        let kv_dim = self.kv_dim.div_ceil(scale);
        Ok(Architecture {
            hidden,
            intermediate: self.intermediate.div_ceil(scale),
            kv_dim,
            layers: layers.unwrap_or(self.layers),
            vocab: self.vocab,
            // A head size that divides both widths keeps config.json consistent.
            head_dim: gcd(gcd(hidden, kv_dim), self.head_dim),
        })
    }

    /// Tensor names and shapes in the order Hugging Face writes a Llama checkpoint.
    pub fn tensors(&self) -> Vec<(String, Vec<u64>)> {
        let (h, i, kv) = (self.hidden, self.intermediate, self.kv_dim);
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab, h])];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![h, h]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, h]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        out.push(("lm_head.weight".to_string(), vec![self.vocab, h]));
        out
    }

    /// Total number of parameters.
    pub fn params(&self) -> u64 {
        self.tensors()
            .iter()
            .map(|(_, s)| s.iter().product::<u64>())
            .sum()
    }

    /// A `config.json` for `LlamaForCausalLM` with these sizes.
    pub fn config_json(&self, dtype: Dtype) -> serde_json::Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.hidden / self.head_dim,
            "num_key_value_heads": self.kv_dim / self.head_dim,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "hidden_act": "silu",
            "tie_word_embeddings": false,
            "torch_dtype": dtype.torch_name().unwrap_or("float32"),
        })
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// What [`generate`] writes.
#[derive(Clone, Debug)]
pub struct FamilyOptions {
    /// Tensor names and shapes.
    pub architecture: Architecture,
    /// Element type of every tensor: F32, F16 or BF16.
    pub dtype: Dtype,
    /// Fine-tuned variants besides the base.
    pub models: usize,
    /// Write one Fisher checkpoint per variant.
    pub fishers: bool,
    /// Write headers only and leave the data as holes that read as zeros.
    pub sparse: bool,
    /// Largest data size of one shard, in bytes.
    pub shard_size_bytes: u64,
    /// Seed of the value generator.
    pub seed: u64,
    /// Half-width of the uniform noise added to the base to make a variant.
    pub noise: f32,
    /// `fisher.examples` written into each Fisher file's metadata.
    pub fisher_examples: u64,
}

impl FamilyOptions {
    /// Default options: two variants with Fishers, dense data, 5 GB shards.
    pub fn new(architecture: Architecture, dtype: Dtype) -> FamilyOptions {
        FamilyOptions {
            architecture,
            dtype,
            models: 2,
            fishers: true,
            sparse: false,
            shard_size_bytes: crate::plan::DEFAULT_SHARD_SIZE_BYTES,
            seed: 0,
            noise: 2e-3,
            fisher_examples: 1000,
        }
    }

    /// Data bytes of one checkpoint.
    pub fn checkpoint_bytes(&self) -> u64 {
        self.architecture.params() * self.dtype.size_bytes() as u64
    }
}

/// The folders of a generated family.
#[derive(Clone, Debug)]
pub struct Family {
    /// The base model.
    pub base: PathBuf,
    /// The variants.
    pub models: Vec<PathBuf>,
    /// The variants' Fisher files, in the same order (empty without Fishers).
    pub fishers: Vec<PathBuf>,
}

impl Family {
    /// The folders a family generated into `root` with these options has, whether or not
    /// they exist yet.
    pub fn at(root: &Path, models: usize, fishers: bool) -> Family {
        Family {
            base: root.join("base"),
            models: (1..=models)
                .map(|m| root.join(format!("model-{m}")))
                .collect(),
            fishers: if fishers {
                (1..=models)
                    .map(|m| root.join(format!("fisher-{m}")))
                    .collect()
            } else {
                Vec::new()
            },
        }
    }
}

/// What one checkpoint of the family contains.
#[derive(Clone, Copy, Debug)]
enum Role {
    Base,
    Model(u64),
    Fisher(u64),
}

/// Writes a model family into `root`, which must not exist or be empty.
///
/// # Errors
/// [`Error::InvalidParameter`] for a non-float dtype or a non-empty `root`; [`Error::Io`]
/// for any failed write.
pub fn generate(root: &Path, options: &FamilyOptions) -> Result<Family> {
    if !matches!(options.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
        return Err(Error::InvalidParameter(format!(
            "synthetic checkpoints are F32, F16 or BF16, not {}",
            options.dtype
        )));
    }
    if options.shard_size_bytes == 0 {
        return Err(Error::InvalidParameter(
            "the shard size must be larger than 0".into(),
        ));
    }
    let not_empty = fs::read_dir(root).is_ok_and(|mut d| d.next().is_some());
    if not_empty {
        return Err(Error::InvalidParameter(format!(
            "{} exists and is not empty; choose a new folder or delete it",
            root.display()
        )));
    }
    let family = Family::at(root, options.models, options.fishers);
    let config = serde_json::to_vec_pretty(&options.architecture.config_json(options.dtype))
        .expect("JSON of numbers and strings");

    write_checkpoint(&family.base, options, Role::Base, Some(&config))?;
    for (m, path) in family.models.iter().enumerate() {
        write_checkpoint(path, options, Role::Model(m as u64 + 1), Some(&config))?;
    }
    for (m, path) in family.fishers.iter().enumerate() {
        write_checkpoint(path, options, Role::Fisher(m as u64 + 1), None)?;
    }
    Ok(family)
}

/// Splits tensors into shards of at most `limit` data bytes, in order; a tensor larger
/// than the limit gets a shard of its own.
fn shard_tensors(tensors: &[(String, Vec<u64>)], size: u64, limit: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut filled = 0u64;
    for (i, (_, shape)) in tensors.iter().enumerate() {
        let bytes = shape.iter().product::<u64>() * size;
        let current = shards.last_mut().expect("at least one shard");
        if !current.is_empty() && filled + bytes > limit {
            shards.push(vec![i]);
            filled = bytes;
        } else {
            current.push(i);
            filled += bytes;
        }
    }
    shards
}

fn write_checkpoint(
    dir: &Path,
    options: &FamilyOptions,
    role: Role,
    config: Option<&[u8]>,
) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| Error::io("create folder", dir, e))?;
    let tensors = options.architecture.tensors();
    let size = options.dtype.size_bytes() as u64;
    let shards = shard_tensors(&tensors, size, options.shard_size_bytes);
    let mut metadata = vec![("format".to_string(), "pt".to_string())];
    if let Role::Fisher(_) = role {
        metadata.push((
            "fisher.examples".to_string(),
            options.fisher_examples.to_string(),
        ));
        metadata.push(("fisher.kind".to_string(), "empirical".to_string()));
    }

    let mut weight_map = Vec::with_capacity(tensors.len());
    for (s, members) in shards.iter().enumerate() {
        let file_name = if shards.len() == 1 {
            SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", s + 1, shards.len())
        };
        let entries: Vec<(&str, Dtype, &[u64])> = members
            .iter()
            .map(|&i| {
                (
                    tensors[i].0.as_str(),
                    options.dtype,
                    tensors[i].1.as_slice(),
                )
            })
            .collect();
        let (header, offsets) = encode_header(&entries, &metadata);
        let path = dir.join(&file_name);
        let file = File::create(&path).map_err(|e| Error::io("create", &path, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&header)
            .map_err(|e| Error::io("write", &path, e))?;
        let data_bytes = offsets.last().map_or(0, |o| o.1);
        if options.sparse {
            let file = out
                .into_inner()
                .map_err(|e| Error::io("write", &path, e.into_error()))?;
            file.set_len(header.len() as u64 + data_bytes)
                .map_err(|e| Error::io("extend", &path, e))?;
        } else {
            for &i in members {
                write_tensor(&mut out, &path, options, role, i as u64, &tensors[i])?;
            }
            out.flush().map_err(|e| Error::io("write", &path, e))?;
        }
        for &i in members {
            weight_map.push((tensors[i].0.clone(), file_name.clone()));
        }
    }
    if shards.len() > 1 {
        let total = options.checkpoint_bytes();
        let path = dir.join(INDEX_FILE);
        fs::write(&path, encode_index(total, &weight_map))
            .map_err(|e| Error::io("write", &path, e))?;
    }
    if let Some(config) = config {
        let path = dir.join("config.json");
        fs::write(&path, config).map_err(|e| Error::io("write", &path, e))?;
    }
    Ok(())
}

/// Elements generated per parallel block.
const BLOCK_ELEMS: usize = 1 << 16;
/// Elements encoded per write.
const WRITE_ELEMS: usize = 1 << 23;

fn write_tensor(
    out: &mut impl Write,
    path: &Path,
    options: &FamilyOptions,
    role: Role,
    tensor: u64,
    (name, shape): &(String, Vec<u64>),
) -> Result<()> {
    let elems = shape.iter().product::<u64>();
    let is_norm = shape.len() == 1 || name.ends_with("norm.weight");
    let size = options.dtype.size_bytes();
    let mut buf = vec![0u8; WRITE_ELEMS.min(elems as usize) * size];
    let mut start = 0u64;
    while start < elems {
        let len = (WRITE_ELEMS as u64).min(elems - start) as usize;
        let bytes = &mut buf[..len * size];
        bytes
            .par_chunks_mut(BLOCK_ELEMS * size)
            .enumerate()
            .for_each(|(b, block)| {
                let first = start + (b * BLOCK_ELEMS) as u64;
                for (j, e) in block.chunks_exact_mut(size).enumerate() {
                    let v = value(options, role, tensor, is_norm, first + j as u64);
                    encode(options.dtype, v, e);
                }
            });
        out.write_all(bytes)
            .map_err(|e| Error::io("write", path, e))?;
        start += len as u64;
    }
    Ok(())
}

/// Value of element `index` of `tensor` in the checkpoint `role`.
#[inline]
fn value(options: &FamilyOptions, role: Role, tensor: u64, is_norm: bool, index: u64) -> f32 {
    let base = {
        let u = uniform(options.seed, 0, tensor, index);
        if is_norm {
            1.0 + (u - 0.5) * 0.1
        } else {
            (u - 0.5) * 0.04
        }
    };
    match role {
        Role::Base => base,
        Role::Model(m) => {
            base + (uniform(options.seed, 2 * m, tensor, index) - 0.5) * 2.0 * options.noise
        }
        Role::Fisher(m) => uniform(options.seed, 2 * m + 1, tensor, index) * 1e-3,
    }
}

/// Returns a uniform value in [0, 1) from a counter-based hash (SplitMix64's finaliser).
#[inline]
fn uniform(seed: u64, stream: u64, tensor: u64, index: u64) -> f32 {
    let z = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(stream.wrapping_mul(0xD1B5_4A32_D192_ED03))
        .wrapping_add(tensor.wrapping_mul(0x8CB9_2BA7_2F3D_8DD7))
        .wrapping_add(index);
    let z = crate::method::rng::mix(z);
    (z >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

#[inline]
fn encode(dtype: Dtype, v: f32, out: &mut [u8]) {
    match dtype {
        Dtype::BF16 => out.copy_from_slice(&crate::convert::f32_to_bf16_bits(v).to_le_bytes()),
        Dtype::F16 => out.copy_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes()),
        _ => out.copy_from_slice(&v.to_le_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_published_sizes() {
        // Parameter counts of the Llama 2 checkpoints on the Hugging Face hub.
        assert_eq!(Preset::Llama7b.architecture().params(), 6_738_415_616);
        assert_eq!(Preset::Llama13b.architecture().params(), 13_015_864_320);
        assert_eq!(Preset::Llama70b.architecture().params(), 68_976_648_192);
    }

    #[test]
    fn llama70b_uses_grouped_query_attention() {
        let tensors = Preset::Llama70b.architecture().tensors();
        let k = tensors
            .iter()
            .find(|(n, _)| n == "model.layers.0.self_attn.k_proj.weight")
            .expect("k_proj present");
        assert_eq!(k.1, vec![1024, 8192]);
    }

    #[test]
    fn scale_divides_widths() {
        let a = Preset::Llama70b.architecture().scaled(8, Some(2)).unwrap();
        assert_eq!((a.hidden, a.intermediate, a.kv_dim), (1024, 3584, 128));
        assert_eq!(a.layers, 2);
        assert_eq!(a.hidden % a.head_dim, 0);
        assert_eq!(a.kv_dim % a.head_dim, 0);
    }

    #[test]
    fn shards_respect_limit() {
        let tensors = vec![
            ("a".to_string(), vec![10]),
            ("b".to_string(), vec![10]),
            ("c".to_string(), vec![30]),
            ("d".to_string(), vec![5]),
        ];
        assert_eq!(
            shard_tensors(&tensors, 2, 40),
            vec![vec![0, 1], vec![2], vec![3]]
        );
    }
}

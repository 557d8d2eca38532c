//! Merge parameters whose value can depend on the tensor: a scalar, a gradient across
//! layers, or a list of name filters, as in mergekit configurations.

use std::collections::BTreeMap;

/// One parameter value before it is resolved for a tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum ParamValue {
    /// The same number for every tensor. Booleans are stored as 1.0 and 0.0.
    Scalar(f64),
    /// A gradient: values spread evenly from the first to the last layer and linearly
    /// interpolated in between, as mergekit does.
    Gradient(Vec<f64>),
    /// `(filter, value)` pairs tried in order; the first whose filter is a substring of the
    /// tensor name wins, and a pair without filter (or with `*`) matches every tensor.
    Filtered(Vec<(Option<String>, ParamValue)>),
}

/// The position of a tensor in the model, for gradients.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerPosition {
    /// The tensor's layer index (the number after `layers.` or `h.`), if it has one.
    pub layer: Option<u64>,
    /// Number of layers in the model.
    pub num_layers: u64,
}

impl ParamValue {
    /// Resolves the value for `tensor`. Returns `None` when no filter matches.
    ///
    /// A gradient is sampled at `t = layer / (num_layers - 1)` (`t = 1` for a single layer);
    /// tensors outside the layer stack take `t = 0` (embeddings, before the layers) or
    /// `t = 1` (everything else), so the embedding takes the first value and the head and
    /// final norm take the last. mergekit's planner uses the same positions.
    pub fn resolve(&self, tensor: &str, position: LayerPosition) -> Option<f64> {
        match self {
            ParamValue::Scalar(x) => Some(*x),
            ParamValue::Gradient(values) => Some(interpolate(values, gradient_t(tensor, position))),
            ParamValue::Filtered(entries) => {
                entries.iter().find_map(|(filter, value)| match filter {
                    Some(f) if f != "*" && !tensor.contains(f.as_str()) => None,
                    _ => value.resolve(tensor, position),
                })
            }
        }
    }
}

fn gradient_t(tensor: &str, position: LayerPosition) -> f64 {
    match position.layer {
        Some(layer) if position.num_layers > 1 => {
            (layer as f64 / (position.num_layers - 1) as f64).clamp(0.0, 1.0)
        }
        Some(_) => 1.0,
        None if is_embedding(tensor) => 0.0,
        None => 1.0,
    }
}

fn is_embedding(tensor: &str) -> bool {
    ["embed_tokens", "wte", "wpe", "embed_in", "word_embeddings"]
        .iter()
        .any(|k| tensor.contains(k))
}

/// Linear interpolation of evenly spaced `values` at `t` in [0, 1].
fn interpolate(values: &[f64], t: f64) -> f64 {
    match values.len() {
        0 => f64::NAN,
        1 => values[0],
        n => {
            let x = t * (n - 1) as f64;
            let i = (x.floor() as usize).min(n - 2);
            let frac = x - i as f64;
            values[i] * (1.0 - frac) + values[i + 1] * frac
        }
    }
}

/// Returns the layer index of a tensor name: the first integer path component after
/// `layers`, `h`, `layer`, `blocks` or `block`.
pub fn layer_index(tensor: &str) -> Option<u64> {
    let parts: Vec<&str> = tensor.split('.').collect();
    parts.windows(2).find_map(|w| {
        let container = matches!(w[0], "layers" | "h" | "layer" | "blocks" | "block");
        if container {
            w[1].parse().ok()
        } else {
            None
        }
    })
}

/// A set of named parameters, such as one model's `parameters:` block.
pub type ParamMap = BTreeMap<String, ParamValue>;

/// Every parameter of a merge: global ones, the base model's and each model's.
///
/// Lookup order for a model's parameter: the model's own value, then the global value.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MergeParams {
    /// The global `parameters:` block.
    pub global: ParamMap,
    /// The base model's `parameters:` block (used by `linear`, where the base is an input).
    pub base: ParamMap,
    /// Each model's `parameters:` block, in the order of the models.
    pub models: Vec<ParamMap>,
}

impl MergeParams {
    /// Resolves a global parameter for `tensor`.
    pub fn global(&self, key: &str, tensor: &str, position: LayerPosition) -> Option<f64> {
        self.global.get(key)?.resolve(tensor, position)
    }

    /// Resolves model `model`'s parameter for `tensor`, falling back to the global value.
    pub fn model(
        &self,
        model: usize,
        key: &str,
        tensor: &str,
        position: LayerPosition,
    ) -> Option<f64> {
        self.models
            .get(model)
            .and_then(|m| m.get(key))
            .and_then(|v| v.resolve(tensor, position))
            .or_else(|| self.global(key, tensor, position))
    }

    /// Resolves the base model's parameter for `tensor`, falling back to the global value.
    pub fn base(&self, key: &str, tensor: &str, position: LayerPosition) -> Option<f64> {
        self.base
            .get(key)
            .and_then(|v| v.resolve(tensor, position))
            .or_else(|| self.global(key, tensor, position))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FOUR_LAYERS: LayerPosition = LayerPosition {
        layer: None,
        num_layers: 4,
    };

    fn at(layer: u64) -> LayerPosition {
        LayerPosition {
            layer: Some(layer),
            num_layers: 4,
        }
    }

    #[test]
    fn gradient_interpolates_layers() {
        let g = ParamValue::Gradient(vec![0.0, 1.0]);
        assert_eq!(g.resolve("model.layers.0.mlp.weight", at(0)), Some(0.0));
        assert_eq!(g.resolve("model.layers.3.mlp.weight", at(3)), Some(1.0));
        let third = g.resolve("model.layers.1.mlp.weight", at(1)).unwrap();
        assert!((third - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(
            g.resolve("model.embed_tokens.weight", FOUR_LAYERS),
            Some(0.0)
        );
        assert_eq!(g.resolve("lm_head.weight", FOUR_LAYERS), Some(1.0));
    }

    #[test]
    fn filter_first_match_wins() {
        let v = ParamValue::Filtered(vec![
            (Some("self_attn".into()), ParamValue::Scalar(0.2)),
            (Some("attn".into()), ParamValue::Scalar(0.4)),
            (Some("*".into()), ParamValue::Scalar(0.9)),
        ]);
        assert_eq!(
            v.resolve("layers.0.self_attn.q_proj.weight", at(0)),
            Some(0.2)
        );
        assert_eq!(v.resolve("h.0.attn.c_attn.weight", at(0)), Some(0.4));
        assert_eq!(v.resolve("h.0.mlp.c_fc.weight", at(0)), Some(0.9));
    }

    #[test]
    fn layer_index_from_names() {
        assert_eq!(
            layer_index("model.layers.12.self_attn.q_proj.weight"),
            Some(12)
        );
        assert_eq!(layer_index("transformer.h.1.attn.c_attn.weight"), Some(1));
        assert_eq!(layer_index("lm_head.weight"), None);
    }
}

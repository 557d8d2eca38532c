//! Files written beside the weights: the base model's configuration and tokenizer files,
//! the resolved merge configuration and a short model card.

use std::fs;
use std::path::Path;

use serde_json::Value;

use crate::dtype::Dtype;
use crate::error::{Error, Result};

/// Names of the side files copied from the base model (or the chosen tokenizer source).
pub const SIDE_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
];

/// Returns true for side files matched by pattern rather than name: Python modules of
/// models with custom code and extra chat templates.
fn is_side_pattern(name: &str) -> bool {
    name.ends_with(".py") || (name.starts_with("chat_template") && name.ends_with(".jinja"))
}

/// Copies the side files of `from` into `to`.
///
/// `config.json` comes from `config_from` (the base model) and its `torch_dtype`/`dtype`
/// field is set to `out_dtype`; the tokenizer files come from `from`. Tied embeddings are
/// untied in the copied config when `untie` is set (the output contains a distinct head), and
/// `vocab_size` is set when a vocabulary policy changed the embedding rows.
///
/// # Errors
/// [`Error::Io`] if a copy or write fails.
pub fn copy_side_files(
    config_from: Option<&Path>,
    tokenizer_from: Option<&Path>,
    to: &Path,
    out_dtype: Option<Dtype>,
    untie: bool,
    vocab_size: Option<u64>,
) -> Result<Vec<String>> {
    let mut copied = Vec::new();
    if let Some(folder) = tokenizer_from {
        let entries = fs::read_dir(folder).map_err(|e| Error::io("list", folder, e))?;
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| {
                n != "config.json" && (SIDE_FILES.contains(&n.as_str()) || is_side_pattern(n))
            })
            .collect();
        names.sort();
        for name in names {
            let (src, dst) = (folder.join(&name), to.join(&name));
            fs::copy(&src, &dst).map_err(|e| Error::io("copy", &src, e))?;
            // Read-only inputs would otherwise give a read-only output.
            set_writable(&dst)?;
            copied.push(name);
        }
    }
    if let Some(folder) = config_from {
        let src = folder.join("config.json");
        if src.is_file() {
            let bytes = fs::read(&src).map_err(|e| Error::io("read", &src, e))?;
            let mut config: Value = serde_json::from_slice(&bytes)
                .map_err(|e| Error::Mismatch(format!("{}: invalid JSON: {e}", src.display())))?;
            update_config(&mut config, out_dtype, untie, vocab_size);
            let mut text = serde_json::to_vec_pretty(&config).expect("JSON value");
            text.push(b'\n');
            let dst = to.join("config.json");
            fs::write(&dst, text).map_err(|e| Error::io("write", &dst, e))?;
            copied.push("config.json".into());
        }
    }
    Ok(copied)
}

fn set_writable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644))
        .map_err(|e| Error::io("chmod", path, e))
}

fn update_config(
    config: &mut Value,
    out_dtype: Option<Dtype>,
    untie: bool,
    vocab_size: Option<u64>,
) {
    let Value::Object(map) = config else { return };
    if let Some(name) = out_dtype.and_then(Dtype::torch_name) {
        // transformers 4 writes `torch_dtype`, transformers 5 writes `dtype`.
        let mut updated = false;
        for key in ["torch_dtype", "dtype"] {
            if map.contains_key(key) {
                map.insert(key.into(), Value::from(name));
                updated = true;
            }
        }
        if !updated {
            map.insert("torch_dtype".into(), Value::from(name));
        }
    }
    if untie {
        map.insert("tie_word_embeddings".into(), Value::Bool(false));
    }
    if let Some(rows) = vocab_size {
        map.insert("vocab_size".into(), Value::from(rows));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_dtype_updated() {
        let mut c: Value = serde_json::json!({"dtype": "float32", "n_layer": 2});
        update_config(&mut c, Some(Dtype::BF16), false, Some(600));
        assert_eq!(c["dtype"], "bfloat16");
        assert_eq!(c["n_layer"], 2);
        assert_eq!(c["vocab_size"], 600);
    }
}

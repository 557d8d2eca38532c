//! Byte sizes with unit suffixes, as given on the command line.

use crate::error::{Error, Result};

/// Returns `singular` when `n` is 1 and `plural_form` otherwise, for messages that count
/// things.
pub fn plural(n: u64, singular: &'static str, plural_form: &'static str) -> &'static str {
    if n == 1 {
        singular
    } else {
        plural_form
    }
}

/// Parses a size in bytes: a number with an optional suffix `K`, `M`, `G` or `T` (powers
/// of 1000, as Hugging Face's `max_shard_size` uses), or `KiB`, `MiB`, `GiB`, `TiB`
/// (powers of 1024). A trailing `B` is allowed (`5GB`). Case-insensitive.
///
/// # Errors
/// [`Error::InvalidParameter`] naming the value for an unknown unit, a number that is not a
/// non-negative integer or decimal, or a size that overflows `u64`.
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let invalid = |why: &str| {
        Error::InvalidParameter(format!(
            "invalid size `{text}`: {why} (examples: 500M, 5G, 2GiB, 1048576)"
        ))
    };
    let value: f64 = number
        .parse()
        .map_err(|_| invalid("expected a number first"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return Err(invalid(&format!("unknown unit `{}`", unit.trim()))),
    };
    let bytes = value * multiplier as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(invalid("too large"));
    }
    Ok(bytes.round() as u64)
}

/// Formats bytes for people: `1.50 GB`, `312.0 MB`, `512 B` (powers of 1000).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("5G").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("64KB").unwrap(), 64_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5M").unwrap(), 1_500_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
    }

    #[test]
    fn bad_units_rejected() {
        assert!(parse_size("5X").is_err());
        assert!(parse_size("G5").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}

//! "Did you mean" suggestions for misspelled names.

/// Returns the candidate closest to `input` by Jaro-Winkler similarity, if any is close
/// enough (similarity above 0.8) to be a likely typo.
pub fn nearest<'a>(input: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let normalized = input.replace('-', "_").to_ascii_lowercase();
    candidates
        .iter()
        .map(|c| (strsim::jaro_winkler(&normalized, c), *c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_finds_typos() {
        let names = ["dare_ties", "ties", "task_arithmetic"];
        assert_eq!(nearest("dare-ties", &names), Some("dare_ties"));
        assert_eq!(nearest("task_arithmetc", &names), Some("task_arithmetic"));
        assert_eq!(nearest("zzz", &names), None);
    }
}

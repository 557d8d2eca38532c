//! The `gradmerge` command line.
//!
//! Exit codes: 0 on success, 1 when a merge or read fails, 2 for usage errors (bad flags,
//! invalid configuration or parameters).

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::main()
}

//! A process-wide interrupt flag, set by the binary's signal handler and polled by the
//! engine between batches of chunks.
//!
//! The first Ctrl-C (or SIGTERM) requests a stop of the merge, which removes its temporary
//! folder on the way out. A second one removes the registered temporary folder at once and
//! exits, for a merge stuck in a long write.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static CLEANUP: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Exit code after an interrupt, whether the merge stopped cleanly or a second interrupt
/// forced the exit: 128 + SIGINT, as shells report it.
pub const FORCED_EXIT_CODE: i32 = 130;

/// Marks the process as interrupted; the running merge stops at its next batch.
pub fn request() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// True once [`request`] has been called.
pub fn is_requested() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Handles one interrupt signal: the first requests a stop, the second removes the
/// registered temporary folder and exits with [`FORCED_EXIT_CODE`].
pub fn on_signal() {
    if !INTERRUPTED.swap(true, Ordering::SeqCst) {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "interrupted: stopping and removing the partial output (press Ctrl-C again to exit now)"
        );
        return;
    }
    if let Some(path) = CLEANUP.lock().ok().and_then(|mut p| p.take()) {
        let _ = std::fs::remove_dir_all(path);
    }
    std::process::exit(FORCED_EXIT_CODE);
}

/// Registers the temporary folder that a forced exit removes; `None` clears it.
pub fn set_cleanup(path: Option<PathBuf>) {
    if let Ok(mut slot) = CLEANUP.lock() {
        *slot = path;
    }
}

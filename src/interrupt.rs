//! A process-wide interrupt flag, set by the binary's signal handler and polled by the
//! engine between batches of chunks.

use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Marks the process as interrupted; the running merge stops at its next batch.
pub fn request() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// True once [`request`] has been called.
pub fn is_requested() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

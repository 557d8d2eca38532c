//! One input file: its validated header and access to its bytes by memory map or
//! positioned reads.
//!
//! # The memory-map risk
//! A mapped file that another process truncates while gradmerge reads it makes the kernel
//! send SIGBUS, which kills the process without an error message. This is inherent to
//! `mmap`. Use [`IoMode::Read`] (`--io read`) for inputs that may change during a merge and
//! for network filesystems, where positioned reads also behave better.

use std::borrow::Cow;
use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use memmap2::{Advice, Mmap, UncheckedAdvice};

use crate::error::{Error, Result};
use crate::format::{self, Header, TensorInfo};

/// The way tensor bytes are read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum IoMode {
    /// Memory-map each file (the default). Views borrow the mapping, so nothing is copied.
    #[default]
    Mmap,
    /// Positioned reads (`pread`) into owned buffers, for network filesystems and systems
    /// where mapping fails. Produces byte-identical results.
    Read,
}

/// One validated safetensors file.
///
/// Invariant: the header was validated against the file length, so every tensor's span
/// lies inside the file.
#[derive(Debug)]
pub struct Source {
    path: PathBuf,
    file: File,
    len_bytes: u64,
    header: Header,
    map: Option<Mmap>,
}

impl Source {
    /// Opens `path`, reads and validates its header, and maps it in [`IoMode::Mmap`].
    ///
    /// Only the header is read here; no tensor data is touched.
    ///
    /// # Errors
    /// The I/O and format errors of [`format::header`], each naming `path`.
    pub fn open(path: &Path, mode: IoMode) -> Result<Source> {
        let file = File::open(path).map_err(|e| open_error(path, e))?;
        let len_bytes = file
            .metadata()
            .map_err(|e| Error::io("stat", path, e))?
            .len();

        // Length prefix, then the JSON header.
        let mut prefix = [0u8; 64];
        let prefix_len = read_prefix(&file, &mut prefix).map_err(|e| Error::io("read", path, e))?;
        let header_len =
            format::header::parse_length_prefix(path, &prefix[..prefix_len], len_bytes)?;
        let mut json = vec![0u8; header_len as usize];
        file.read_exact_at(&mut json, 8)
            .map_err(|e| Error::io("read", path, e))?;
        let header = format::parse_header(path, &json, len_bytes)?;

        let map = match mode {
            IoMode::Mmap if len_bytes > 0 => Some(map_file(&file, path)?),
            _ => None,
        };
        Ok(Source {
            path: path.to_path_buf(),
            file,
            len_bytes,
            header,
            map,
        })
    }

    /// Returns the file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Returns the validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// File length in bytes.
    pub fn len_bytes(&self) -> u64 {
        self.len_bytes
    }

    /// Reads `range`, given in bytes relative to `tensor`'s data, borrowing the mapping in
    /// mmap mode and reading into an owned buffer otherwise.
    ///
    /// # Errors
    /// [`Error::Io`] if a positioned read fails or comes up short (the file shrank).
    ///
    /// # Panics
    /// If `range` is not inside the tensor's span.
    pub fn bytes(&self, tensor: &TensorInfo, range: Range<u64>) -> Result<Cow<'_, [u8]>> {
        assert!(range.start <= range.end, "reversed range {range:?}");
        assert!(
            range.end <= tensor.size_bytes(),
            "range {range:?} past the tensor"
        );
        let begin = self.header.data_start + tensor.data_offsets.0 + range.start;
        let end = begin + (range.end - range.start);
        match &self.map {
            Some(map) => Ok(Cow::Borrowed(&map[begin as usize..end as usize])),
            None => {
                let mut buf = vec![0u8; (end - begin) as usize];
                self.file
                    .read_exact_at(&mut buf, begin)
                    .map_err(|e| Error::io("read", &self.path, e))?;
                Ok(Cow::Owned(buf))
            }
        }
    }

    /// Drops the pages of an already consumed byte range (relative to `tensor`'s data) from
    /// this process's resident set. Does nothing in read mode.
    ///
    /// The released span is widened by [`RELEASE_MARGIN_BYTES`] on both sides. Pages are
    /// re-read from the page cache if touched again, so releasing a page that another
    /// thread still reads costs time but never changes a result.
    pub fn release(&self, tensor: &TensorInfo, range: Range<u64>) {
        let Some(map) = &self.map else { return };
        let page = page_size();
        // Widen the range on both sides: a fault maps more than the faulting page, which
        // re-maps pages of neighbouring ranges that were released already (chunks finish
        // out of order). Without the margin those pages stay resident, and RSS grows with
        // the number of chunks.
        let begin = (self.header.data_start + tensor.data_offsets.0 + range.start)
            .saturating_sub(RELEASE_MARGIN_BYTES);
        let end = self.header.data_start + tensor.data_offsets.0 + range.end + RELEASE_MARGIN_BYTES;
        let aligned_begin = begin / page * page;
        let aligned_end = end.div_ceil(page).saturating_mul(page).min(self.len_bytes);
        if aligned_end <= aligned_begin {
            return;
        }
        // SAFETY: the mapping is a read-only shared file mapping, so MADV_DONTNEED only
        // discards this process's page table entries. Later reads fault the same file
        // contents back in, so no slice into the mapping observes different bytes. The
        // range lies inside the mapping because `aligned_end` is capped at its length.
        let result = unsafe {
            map.unchecked_advise_range(
                UncheckedAdvice::DontNeed,
                aligned_begin as usize,
                (aligned_end - aligned_begin) as usize,
            )
        };
        if let Err(e) = result {
            log::debug!("madvise(DONTNEED) on {} failed: {e}", self.path.display());
        }
    }
}

fn open_error(path: &Path, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        Error::NotFound {
            path: path.to_path_buf(),
        }
    } else {
        Error::io("open", path, e)
    }
}

/// Reads up to `buf.len()` bytes from the start of the file.
fn read_prefix(mut file: &File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn map_file(file: &File, path: &Path) -> Result<Mmap> {
    // SAFETY: the mapping is read-only. If another process truncates the file while it is
    // mapped, reads past the new end raise SIGBUS, as documented on this module and on
    // `--io`. Another process that rewrites the file changes the bytes we read, the same
    // risk as for any reader of a file being rewritten.
    let map = unsafe { Mmap::map(file) }
        .map_err(|e| Error::io("mmap (retry with --io read)", path, e))?;
    if let Err(e) = map.advise(Advice::Sequential) {
        log::debug!("madvise(SEQUENTIAL) on {} failed: {e}", path.display());
    }
    Ok(map)
}

/// How far a release reaches past the consumed range on each side: 2 MiB.
///
/// A read fault on a file mapping maps more than one page. It maps up to
/// `fault_around_bytes` (64 KiB by default) of cached pages around the faulting address,
/// or a whole large folio of the page cache, which is up to 2 MiB on x86-64. On Linux
/// 6.18, with chunks of 64 Ki bf16 elements, a task arithmetic merge of 2 GB models
/// peaked at 294 MB RSS with a 64 KiB margin and at 19 MB with this one.
///
/// NOTE: measured on x86-64 only. Kernels with larger page-cache folios (64 KiB base
/// pages on arm64) can map more per fault, so RSS may then grow with small chunks.
pub const RELEASE_MARGIN_BYTES: u64 = 2 << 20;

/// Returns the system page size in bytes.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions and only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as u64
    } else {
        4096
    }
}

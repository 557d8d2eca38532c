//! The output side: an atomic output folder and the single writer thread that streams
//! shards into it.
//!
//! Every shard's header is known from the plan, so the writer writes it first and then
//! appends the data buffers it receives, in order, until the shard's planned size is
//! reached. The bytes in flight are bounded by the channel capacity times the chunk size.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

use crate::error::{Error, Result};

/// One output shard, as the writer thread receives it.
#[derive(Clone, Debug)]
pub struct ShardSpec {
    /// File name inside the output folder.
    pub file_name: String,
    /// The encoded header, length prefix included.
    pub header: Vec<u8>,
    /// Bytes of data that follow the header.
    pub data_bytes: u64,
}

/// A folder being written next to its final destination.
///
/// Invariant: until [`commit`](Self::commit) succeeds, the destination is untouched and
/// dropping this value removes the temporary folder.
#[derive(Debug)]
pub struct OutputDir {
    destination: PathBuf,
    temp: PathBuf,
    force: bool,
    committed: bool,
}

impl OutputDir {
    /// Checks the destination and creates the temporary folder beside it.
    ///
    /// `inputs` are the input files and folders; the destination may not be one of them
    /// or lie inside one. An existing non-empty destination is rejected unless `force`.
    ///
    /// # Errors
    /// [`Error::Destination`] for a rejected destination, [`Error::DiskSpace`] when the
    /// filesystem has less than `needed_bytes` free, [`Error::Io`] if the folder cannot be
    /// created.
    pub fn create(
        destination: &Path,
        force: bool,
        inputs: &[PathBuf],
        needed_bytes: u64,
    ) -> Result<OutputDir> {
        let destination = absolute(destination)?;
        if destination.file_name().is_none() || destination.ends_with("..") {
            return Err(Error::Destination {
                path: destination,
                detail: "does not name a folder (it ends in `..` or is the root); give the output folder's name".into(),
            });
        }
        let dangling = destination
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink())
            && !destination.exists();
        if dangling {
            let target = fs::read_link(&destination).unwrap_or_default();
            return Err(Error::Destination {
                path: destination,
                detail: format!(
                    "is a symbolic link to {}, which does not exist; create that folder or remove the link",
                    target.display()
                ),
            });
        }
        // Resolve `..` and symlinks now: the folders on the way may be renamed later (the
        // old output is moved aside), and a symlinked destination means its target.
        let destination = resolve(&destination);
        if destination.file_name().is_none() {
            return Err(Error::Destination {
                path: destination,
                detail: "is the root folder; give the output folder's name".into(),
            });
        }
        check_not_input(&destination, inputs)?;
        if let Ok(cwd) = std::env::current_dir() {
            if resolve(&cwd).starts_with(&destination) {
                return Err(Error::Destination {
                    path: destination,
                    detail: "is or contains the current folder, which the merge would replace; run gradmerge from another folder".into(),
                });
            }
        }
        if destination.exists() {
            let empty = destination.is_dir()
                && fs::read_dir(&destination)
                    .map_err(|e| Error::io("list", &destination, e))?
                    .next()
                    .is_none();
            if !destination.is_dir() {
                return Err(Error::Destination {
                    path: destination,
                    detail: "exists and is not a folder; choose another --out path".into(),
                });
            }
            if !empty && !force {
                return Err(Error::Destination {
                    path: destination,
                    detail: "already exists and is not empty; choose another --out path or pass --force to replace it".into(),
                });
            }
        }
        let parent = destination
            .parent()
            .ok_or_else(|| Error::Destination {
                path: destination.clone(),
                detail: "has no parent folder".into(),
            })?
            .to_path_buf();
        fs::create_dir_all(&parent).map_err(|e| Error::io("create folder", &parent, e))?;
        check_free_space(&parent, needed_bytes)?;

        let name = destination
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "output".into());
        let temp = parent.join(format!(".{name}.gradmerge-tmp-{}", std::process::id()));
        if temp.exists() {
            fs::remove_dir_all(&temp).map_err(|e| Error::io("remove", &temp, e))?;
        }
        fs::create_dir(&temp).map_err(|e| Error::io("create folder", &temp, e))?;
        crate::interrupt::set_cleanup(Some(temp.clone()));
        Ok(OutputDir {
            destination,
            temp,
            force,
            committed: false,
        })
    }

    /// Returns the temporary folder that receives the files.
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// Returns the final destination.
    pub fn destination(&self) -> &Path {
        &self.destination
    }

    /// Syncs the temporary folder and renames it to the destination, replacing an existing
    /// destination when `force` was given.
    ///
    /// # Errors
    /// [`Error::Io`] if a sync or rename fails; the temporary folder is then removed.
    pub fn commit(mut self) -> Result<PathBuf> {
        sync_dir(&self.temp)?;
        let mut old = None;
        if self.destination.exists() {
            debug_assert!(self.force || is_empty_dir(&self.destination));
            let trash = self.temp.with_extension("old");
            fs::rename(&self.destination, &trash)
                .map_err(|e| Error::io("rename", &self.destination, e))?;
            old = Some(trash);
        }
        fs::rename(&self.temp, &self.destination)
            .map_err(|e| Error::io("rename", &self.temp, e))?;
        self.committed = true;
        if let Some(parent) = self.destination.parent() {
            sync_dir(parent)?;
        }
        // The merge is in place now, so failing to delete the old folder is only a warning.
        if let Some(trash) = old {
            if let Err(e) = fs::remove_dir_all(&trash) {
                log::warn!(
                    "the replaced output was moved to {} but could not be removed ({e}); remove it yourself",
                    trash.display()
                );
            }
        }
        Ok(self.destination.clone())
    }
}

impl Drop for OutputDir {
    fn drop(&mut self) {
        crate::interrupt::set_cleanup(None);
        if !self.committed {
            if let Err(e) = fs::remove_dir_all(&self.temp) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    log::warn!("could not remove {}: {e}", self.temp.display());
                }
            }
        }
    }
}

fn is_empty_dir(path: &Path) -> bool {
    fs::read_dir(path)
        .map(|mut d| d.next().is_none())
        .unwrap_or(false)
}

/// Makes a path absolute without resolving symlinks of a path that does not exist yet.
fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).map_err(|e| Error::io("resolve", path, e))
}

/// Canonicalises the deepest existing ancestor and appends the rest.
fn resolve(path: &Path) -> PathBuf {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name.to_os_string());
                existing = parent.to_path_buf();
            }
            _ => break,
        }
    }
    let mut out = existing.canonicalize().unwrap_or(existing);
    for part in rest.into_iter().rev() {
        out.push(part);
    }
    out
}

/// Refuses a path that is an input, contains one, or lies inside an input folder, so that
/// no write can replace an input. Symlinks are resolved on both sides.
///
/// # Errors
/// [`Error::Destination`] naming the input.
pub fn check_not_input(destination: &Path, inputs: &[PathBuf]) -> Result<()> {
    let dest = resolve(destination);
    for input in inputs {
        let input = resolve(input);
        let inside_input_folder = input.is_dir() && dest.starts_with(&input);
        if inside_input_folder || input.starts_with(&dest) {
            return Err(Error::Destination {
                path: destination.to_path_buf(),
                detail: format!(
                    "is, contains or lies inside the input {}; write the output somewhere else",
                    input.display()
                ),
            });
        }
    }
    Ok(())
}

/// Returns the free bytes available to this user on the filesystem holding `path`.
pub fn free_space(path: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c =
        std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::Destination {
            path: path.to_path_buf(),
            detail: "contains a NUL byte".into(),
        })?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a valid NUL-terminated string, and `stat` points to writable memory of
    // the right type. statvfs writes the struct only on success, which is checked below.
    let rc = unsafe { libc::statvfs(c.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(Error::io("statvfs", path, std::io::Error::last_os_error()));
    }
    // SAFETY: statvfs returned 0, so it initialised the struct.
    let stat = unsafe { stat.assume_init() };
    // The field types differ between platforms (u32 on some 32-bit targets).
    #[allow(clippy::unnecessary_cast)]
    let (blocks, block_size) = (stat.f_bavail as u64, stat.f_frsize as u64);
    Ok(blocks.saturating_mul(block_size))
}

fn check_free_space(folder: &Path, needed_bytes: u64) -> Result<()> {
    let available = free_space(folder)?;
    if available < needed_bytes {
        return Err(Error::DiskSpace {
            path: folder.to_path_buf(),
            needed_bytes,
            available_bytes: available,
            missing_bytes: needed_bytes - available,
        });
    }
    Ok(())
}

fn sync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io("sync", path, e))
}

/// Totals reported by the writer thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteTotals {
    /// Bytes written, headers included.
    pub bytes: u64,
}

/// Starts the writer thread.
///
/// It writes each shard of `shards` into `folder` (or discards the bytes when `folder` is
/// `None`, the sink mode for benchmarks), taking data buffers from `data` in plan order and
/// handing each emptied buffer back through `recycle`. It stops early without error when
/// `data` is closed before all shards are complete, which the engine does after an error.
pub fn spawn_writer(
    folder: Option<PathBuf>,
    shards: Vec<ShardSpec>,
    data: Receiver<Vec<u8>>,
    recycle: Sender<Vec<u8>>,
) -> JoinHandle<Result<WriteTotals>> {
    std::thread::Builder::new()
        .name("gradmerge-writer".into())
        .spawn(move || write_shards(folder.as_deref(), &shards, &data, &recycle))
        .expect("spawning the writer thread")
}

fn write_shards(
    folder: Option<&Path>,
    shards: &[ShardSpec],
    data: &Receiver<Vec<u8>>,
    recycle: &Sender<Vec<u8>>,
) -> Result<WriteTotals> {
    let mut totals = WriteTotals::default();
    for shard in shards {
        let path = folder.map(|f| f.join(&shard.file_name));
        let mut file = match &path {
            Some(p) => Some(File::create(p).map_err(|e| Error::io("create", p, e))?),
            None => None,
        };
        let write_error =
            |e: std::io::Error| Error::io("write", path.clone().unwrap_or_default(), e);
        if let Some(f) = file.as_mut() {
            f.write_all(&shard.header).map_err(write_error)?;
        }
        totals.bytes += shard.header.len() as u64;

        let mut written = 0u64;
        while written < shard.data_bytes {
            let Ok(mut buf) = data.recv() else {
                return Ok(totals);
            };
            if let Some(f) = file.as_mut() {
                f.write_all(&buf).map_err(write_error)?;
            }
            written += buf.len() as u64;
            buf.clear();
            let _ = recycle.try_send(buf);
        }
        debug_assert_eq!(
            written, shard.data_bytes,
            "a buffer crossed a shard boundary"
        );
        if let (Some(f), Some(p)) = (file, &path) {
            f.sync_all().map_err(|e| Error::io("sync", p, e))?;
        }
        totals.bytes += written;
    }
    Ok(totals)
}

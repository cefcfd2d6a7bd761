//! # sluice-backend-fs
//!
//! [`FsCheckpointStorage`]: checkpoints and savepoints as plain files in a
//! directory on a local disk or a network mount — Flink's `file://`
//! checkpoint storage. A storage path is a file under the root:
//! `chk-7/running-sum-0.kst`, `chk-7/_metadata`,
//! `savepoints/savepoint-9-1a2b3c/_metadata`. There is no index and no lock
//! file: a directory of checkpoints can be copied, moved or archived with
//! `cp -r` or `tar`, and a savepoint moved that way still restores.
//!
//! ```
//! use sluice_backend_fs::FsCheckpointStorage;
//! use sluice_core::{Bytes, CheckpointId, CheckpointStorage, CheckpointStorageExt};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let dir = tempfile::tempdir().unwrap();
//! let storage = FsCheckpointStorage::open(dir.path().join("checkpoints")).unwrap();
//! storage.write_file("chk-1/sum-0.kst", Bytes::from_static(b"state")).await.unwrap();
//! storage.commit_metadata(CheckpointId(1), Bytes::from_static(b"{}")).await.unwrap();
//! assert!(dir.path().join("checkpoints/chk-1/_metadata").is_file());
//! assert_eq!(storage.read_range("chk-1/sum-0.kst", 1..4).await.unwrap(), Bytes::from_static(b"tat"));
//! assert_eq!(sluice_core::storage::latest_completed(&storage).await.unwrap(), Some(CheckpointId(1)));
//! # });
//! ```
//!
//! ## How a file is written
//!
//! A file is written under a temporary name in its own directory
//! (`.sluice-tmp-…`, created with `O_CREAT|O_EXCL`), synced, and then
//! published with `link(2)` ([`std::fs::hard_link`]), which fails if the
//! name exists: that is the atomic create-if-absent. Of two writers of one
//! path exactly one gets the name, the other [`Error::AlreadyExists`], and
//! a reader sees the whole file or nothing. The temporary name is removed
//! after the link.
//!
//! ## What is synced, and when
//!
//! - [`write_file`](CheckpointStorage::write_file): the file's data
//!   (`fdatasync`) before it gets its name, so a name never points at data
//!   that is not on disk. Its directory entry is not synced yet; the
//!   directory is remembered.
//! - [`commit_file`](CheckpointStorage::commit_file): the file (`fsync`),
//!   then every directory this handle created or published a file in since
//!   its last commit (the parent of each directory it created included),
//!   *before* the new name is linked; then the link, then the file's
//!   directory. So once the committed file (a checkpoint's `_metadata`) can
//!   survive a power cut, every file written before it through the same
//!   handle does too. A failure after the link is
//!   [`Error::Indeterminate`]: the file exists, its durability is unknown.
//! - [`delete_dir`](CheckpointStorage::delete_dir): `dir/_metadata` is
//!   removed and the directory synced before anything else goes, so a
//!   checkpoint never reappears without its files; the rest is not synced
//!   (files that come back after a power cut are an uncommitted left-over,
//!   which the job master discards at its next start).
//!
//! ## Temporary files
//!
//! Names starting with [`TEMP_PREFIX`] are reserved: such paths are refused,
//! and such files are never listed or read. A process killed while writing
//! leaves one behind; [`FsCheckpointStorage::open`] removes those older than
//! [`STALE_TEMP_AGE`], and [`delete_dir`](CheckpointStorage::delete_dir)
//! removes those in the directory it deletes.
//!
//! ## Requirements and caveats
//!
//! - Unix. The file system must support hard links (ext4, XFS, btrfs, ZFS,
//!   APFS, NFS; not FAT or exFAT).
//! - `link(2)` is atomic on a local file system. Over NFS a retransmitted
//!   `LINK` can answer "exists" for a link it made: that case is recognised
//!   (the name is our own file). Some NFS setups do not make `link` atomic
//!   between clients; there, [`Capabilities::atomic_create`] holds for
//!   writers on one client only — one job master per directory, which is
//!   what Sluice runs, is safe. `fsync` over NFS is only as durable as the
//!   server's export (`sync`).
//! - A path that leads outside the root through a symbolic link is refused;
//!   listing and deleting never follow symbolic links. This guards against
//!   mistakes, not against someone who can write into the root.
//! - Several processes may write into one root (their temporary names
//!   differ), but a commit syncs what its own handle wrote: each writer
//!   commits its own files.
#![warn(missing_docs)]

use async_trait::async_trait;
use bytes::Bytes;
use sluice_core::storage::{dir_prefix, validate_dir, validate_path, Capabilities, METADATA_FILE};
use sluice_core::{CheckpointStorage, Error, FileListing, FileUpload, Result};

mod upload;
use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

/// The prefix of temporary file names; paths with a segment that starts
/// with it are refused.
pub const TEMP_PREFIX: &str = ".sluice-tmp-";

/// How old a temporary file must be for [`FsCheckpointStorage::open`] to
/// remove it as the left-over of a killed writer (a writer publishes or
/// removes its temporary file within one write).
pub const STALE_TEMP_AGE: Duration = Duration::from_secs(60 * 60);

/// Checkpoint storage in a directory (see the [crate] documentation).
#[derive(Clone)]
pub struct FsCheckpointStorage {
    inner: Arc<Inner>,
}

struct Inner {
    /// The root, absolute (as given: for messages and addresses).
    root: PathBuf,
    /// The root with symbolic links resolved: every path must stay in it.
    real_root: PathBuf,
    read_only: bool,
    /// Directories with entries that are not synced yet.
    unsynced: Mutex<BTreeSet<PathBuf>>,
}

/// A write in progress: its temporary file in the target's directory.
struct Staged {
    tmp: PathBuf,
    file: File,
    dir: PathBuf,
    target: PathBuf,
}

impl std::fmt::Debug for FsCheckpointStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FsCheckpointStorage({})", self.inner.root.display())
    }
}

impl FsCheckpointStorage {
    /// Opens the storage in directory `root` for reading and writing,
    /// creating it (and missing parents) if needed, and removes temporary
    /// files older than [`STALE_TEMP_AGE`]. A `root` that is a file is
    /// refused with [`Error::Incompatible`].
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = absolute(root.as_ref())?;
        let (_, missing) = missing_dirs(&root)?;
        let created = create_missing(missing)?;
        let storage = Self::new(root, false)?;
        storage.inner.lock().extend(created);
        storage.inner.remove_stale_temp_files();
        Ok(storage)
    }

    /// Opens the existing storage in directory `root` read-only, for tools
    /// that only read (`sluice inspect`, `sluice checkpoints list`, the
    /// source of `sluice copy`). Nothing is created or removed: a missing
    /// root is [`Error::NotFound`] naming it, and writes fail with
    /// [`Error::Storage`].
    pub fn open_existing(root: impl AsRef<Path>) -> Result<Self> {
        let root = absolute(root.as_ref())?;
        match fs::metadata(&root) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Error::not_found(format!(
                "no such directory: {} (check the path; reading a checkpoint directory never creates one)",
                root.display()
            ))),
            Err(e) => Err(storage_error("opening", &root, e)),
            Ok(_) => Self::new(root, true),
        }
    }

    fn new(root: PathBuf, read_only: bool) -> Result<Self> {
        if !fs::metadata(&root)
            .map_err(|e| storage_error("opening", &root, e))?
            .is_dir()
        {
            return Err(Error::Incompatible {
                what: format!("checkpoint directory {}", root.display()),
                reason: "it is a file, not a directory (for a redb file write redb:PATH)".into(),
            });
        }
        let real_root = fs::canonicalize(&root).map_err(|e| storage_error("resolving", &root, e))?;
        Ok(FsCheckpointStorage {
            inner: Arc::new(Inner {
                root,
                real_root,
                read_only,
                unsynced: Mutex::new(BTreeSet::new()),
            }),
        })
    }

    /// The root directory (absolute).
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Whether the storage was opened read-only ([`open_existing`](Self::open_existing)).
    pub fn is_read_only(&self) -> bool {
        self.inner.read_only
    }

    /// Runs `f` on tokio's blocking pool: file I/O never blocks the runtime.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| Error::storage(format!("file I/O task of {}", self.describe()), e))?
    }
}

#[async_trait]
impl CheckpointStorage for FsCheckpointStorage {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn write_file(&self, path: &str, data: Bytes) -> Result<()> {
        let path = path.to_string();
        self.blocking(move |s| s.write(&path, &data, false)).await
    }

    async fn commit_file(&self, path: &str, data: Bytes) -> Result<()> {
        let path = path.to_string();
        self.blocking(move |s| s.write(&path, &data, true)).await
    }

    async fn read(&self, path: &str, range: Option<Range<u64>>) -> Result<Bytes> {
        let path = path.to_string();
        self.blocking(move |s| s.read(&path, range)).await
    }

    /// Appends each part to a temporary file beside the target; `complete`
    /// publishes it as `write_file` does. Memory holds one part at a time.
    async fn upload<'a>(&'a self, path: &str) -> Result<Box<dyn FileUpload + 'a>> {
        let path = path.to_string();
        let staged = self.blocking(move |s| s.stage(&path)).await?;
        Ok(Box::new(upload::FsUpload::new(self.inner.clone(), staged)))
    }

    async fn list_files(&self, dir: &str) -> Result<Vec<FileListing>> {
        let dir = dir.to_string();
        self.blocking(move |s| s.list_files(&dir)).await
    }

    async fn delete_file(&self, path: &str) -> Result<()> {
        let path = path.to_string();
        self.blocking(move |s| s.delete_file(&path)).await
    }

    async fn delete_dir(&self, dir: &str) -> Result<()> {
        let dir = dir.to_string();
        self.blocking(move |s| s.delete_dir(&dir)).await
    }

    /// `file:<root>/<dir>`, which the CLI reads back as the same directory
    /// (`file:<root>#<dir>` when the root holds a `#`).
    fn locate(&self, dir: &str) -> String {
        let root = self.inner.root.display().to_string();
        match dir {
            "" => self.describe(),
            _ if root.contains('#') => format!("file:{root}#{dir}"),
            _ => format!("file:{}/{dir}", root.trim_end_matches('/')),
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            atomic_create: true,
            durable: true,
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<PathBuf>> {
        self.unsynced.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn describe(&self) -> String {
        format!("file:{}", self.root.display())
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::storage(
                self.describe(),
                "the checkpoint directory was opened read-only (for inspecting, listing or copying from \
                 it); nothing was written",
            ));
        }
        Ok(())
    }

    /// The file system path of storage path (or directory) `path`.
    fn resolve(&self, path: &str) -> Result<PathBuf> {
        validate_path(path)?;
        if path.split('/').any(|s| s.starts_with(TEMP_PREFIX)) {
            return Err(Error::InvalidArgument {
                what: format!("storage path {path:?}"),
                reason: format!("names starting with {TEMP_PREFIX:?} are reserved for temporary files"),
            });
        }
        Ok(self.root.join(path))
    }

    /// Refuses `existing` if it resolves outside the root (a symbolic link);
    /// [`Error::NotFound`] if it does not exist.
    fn check_inside(&self, existing: &Path) -> Result<()> {
        let real = fs::canonicalize(existing).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Error::not_found(existing.display().to_string()),
            _ => storage_error("resolving", existing, e),
        })?;
        if real.starts_with(&self.real_root) {
            return Ok(());
        }
        Err(Error::InvalidArgument {
            what: existing.display().to_string(),
            reason: format!(
                "leads outside the storage root {} through a symbolic link",
                self.root.display()
            ),
        })
    }

    /// Writes `data` to `path` create-if-absent; `commit`: durably.
    fn write(&self, path: &str, data: &[u8], commit: bool) -> Result<()> {
        let mut staged = self.stage(path)?;
        let written = staged
            .file
            .write_all(data)
            .map_err(|e| storage_error("writing", &staged.tmp, e));
        match written {
            Ok(()) => self.finish(staged, commit),
            Err(e) => {
                drop(staged.file);
                let _ = fs::remove_file(&staged.tmp);
                Err(e)
            }
        }
    }

    /// Creates the temporary file a write of `path` fills (and the missing
    /// directories on the way).
    fn stage(&self, path: &str) -> Result<Staged> {
        self.writable()?;
        let target = self.resolve(path)?;
        let dir = target
            .parent()
            .ok_or_else(|| Error::not_found(target.display().to_string()))?
            .to_path_buf();
        let (existing, missing) = missing_dirs(&dir)?;
        if missing.contains(&self.root) {
            return Err(Error::not_found(format!(
                "the storage root {} (it was removed)",
                self.root.display()
            )));
        }
        self.check_inside(&existing)?;
        let created = create_missing(missing)?;
        self.lock().extend(created);
        let (tmp, file) = create_temp(&dir)?;
        Ok(Staged {
            tmp,
            file,
            dir,
            target,
        })
    }

    /// Syncs a filled temporary file and publishes it create-if-absent;
    /// the temporary file goes either way.
    fn finish(&self, staged: Staged, commit: bool) -> Result<()> {
        let Staged {
            tmp,
            file,
            dir,
            target,
        } = staged;
        let written = if commit { file.sync_all() } else { file.sync_data() }
            .map_err(|e| storage_error("writing", &tmp, e));
        drop(file);
        let published = written
            .and_then(|()| if commit { self.sync_unsynced() } else { Ok(()) })
            .and_then(|()| publish(&tmp, &target));
        let _ = fs::remove_file(&tmp);
        published?;
        if !commit {
            self.lock().insert(dir);
            return Ok(());
        }
        sync_dir(&dir).map_err(|e| Error::Indeterminate {
            what: format!("syncing the directory of {} (the file exists)", target.display()),
            source: e.into(),
        })
    }

    /// Syncs every directory with entries not synced yet (a directory
    /// removed since has nothing left to sync).
    fn sync_unsynced(&self) -> Result<()> {
        let dirs = std::mem::take(&mut *self.lock());
        for (i, dir) in dirs.iter().enumerate() {
            match sync_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    let error = storage_error("syncing directory", dir, e);
                    self.lock().extend(dirs.into_iter().skip(i));
                    return Err(error);
                }
            }
        }
        Ok(())
    }

    fn read(&self, path: &str, range: Option<Range<u64>>) -> Result<Bytes> {
        let full = self.resolve(path)?;
        let not_found = || Error::not_found(full.display().to_string());
        self.check_inside(&full)?;
        let mut file = File::open(&full).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => not_found(),
            _ => storage_error("opening", &full, e),
        })?;
        let meta = file.metadata().map_err(|e| storage_error("reading", &full, e))?;
        if !meta.is_file() {
            return Err(not_found());
        }
        let len = meta.len();
        let range = range.unwrap_or(0..len);
        let outside = || {
            let reason = format!(
                "range {}..{} is outside the file's {len} bytes",
                range.start, range.end
            );
            Error::corrupt(full.display().to_string(), reason)
        };
        if range.start > range.end || range.end > len {
            return Err(outside());
        }
        let size = usize::try_from(range.end - range.start).map_err(|_| outside())?;
        let mut buf = vec![0u8; size];
        file.seek(SeekFrom::Start(range.start))
            .and_then(|_| file.read_exact(&mut buf))
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => outside(),
                _ => storage_error("reading", &full, e),
            })?;
        Ok(Bytes::from(buf))
    }

    fn list_files(&self, dir: &str) -> Result<Vec<FileListing>> {
        validate_dir(dir, true)?;
        let base = match dir {
            "" => self.root.clone(),
            _ => self.resolve(dir)?,
        };
        match fs::symlink_metadata(&base) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(storage_error("listing", &base, e)),
            Ok(_) => self.check_inside(&base)?,
        }
        if !base.is_dir() {
            return Ok(Vec::new());
        }
        let mut entries = Vec::new();
        walk(&base, &dir_prefix(dir), &mut entries)?;
        let mut files: Vec<FileListing> = entries
            .into_iter()
            .filter(|e| e.kind == Kind::File)
            .map(|e| FileListing {
                path: e.rel,
                size: e.meta.len(),
            })
            .collect();
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(files)
    }

    /// Removes one file (never a directory or a symbolic link's target)
    /// and syncs its directory, so the deletion of a `_metadata` is durable.
    fn delete_file(&self, path: &str) -> Result<()> {
        self.writable()?;
        let file = self.resolve(path)?;
        match fs::symlink_metadata(&file) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(storage_error("deleting", &file, e)),
            Ok(m) if m.is_dir() => {
                return Err(Error::InvalidArgument {
                    what: file.display().to_string(),
                    reason: "is a directory, not a file".into(),
                })
            }
            Ok(_) => {}
        }
        if let Some(parent) = file.parent() {
            self.check_inside(parent)?;
        }
        match fs::remove_file(&file) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(storage_error("deleting", &file, e)),
        }
        match file.parent() {
            Some(parent) => sync_dir(parent).map_err(|e| storage_error("syncing directory", parent, e)),
            None => Ok(()),
        }
    }

    fn delete_dir(&self, dir: &str) -> Result<()> {
        self.writable()?;
        validate_dir(dir, false)?;
        let base = self.resolve(dir)?;
        match fs::symlink_metadata(&base) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(storage_error("deleting", &base, e)),
            Ok(m) => {
                self.check_inside(&base)?;
                if m.file_type().is_symlink() {
                    return Err(Error::InvalidArgument {
                        what: base.display().to_string(),
                        reason: "is a symbolic link; delete the directory it points to".into(),
                    });
                }
                if !m.is_dir() {
                    return Ok(());
                }
            }
        }
        // The metadata first, durably: the checkpoint stops existing
        // before any of its files goes.
        let metadata = base.join(METADATA_FILE);
        match fs::remove_file(&metadata) {
            Ok(()) => sync_dir(&base).map_err(|e| storage_error("syncing directory", &base, e))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(storage_error("deleting", &metadata, e)),
        }
        let mut entries = Vec::new();
        walk(&base, "", &mut entries)?;
        for e in entries {
            let removed = match e.kind {
                Kind::Dir => fs::remove_dir(&e.abs),
                _ => fs::remove_file(&e.abs),
            };
            match removed {
                Err(err) if err.kind() != io::ErrorKind::NotFound => {
                    return Err(storage_error("deleting", &e.abs, err))
                }
                _ => {}
            }
        }
        match fs::remove_dir(&base) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(storage_error("deleting", &base, e)),
            _ => Ok(()),
        }
    }

    /// Removes temporary files older than [`STALE_TEMP_AGE`] (best effort:
    /// a file that cannot be removed is left, and is never listed).
    fn remove_stale_temp_files(&self) {
        let mut entries = Vec::new();
        if walk(&self.root, "", &mut entries).is_err() {
            return;
        }
        let now = SystemTime::now();
        for e in entries.into_iter().filter(|e| e.kind == Kind::Temp) {
            let age = e.meta.modified().ok().and_then(|m| now.duration_since(m).ok());
            if age.is_some_and(|age| age >= STALE_TEMP_AGE) {
                let _ = fs::remove_file(&e.abs);
            }
        }
    }
}

fn absolute(root: &Path) -> Result<PathBuf> {
    std::path::absolute(root).map_err(|e| Error::InvalidArgument {
        what: format!("checkpoint directory {}", root.display()),
        reason: e.to_string(),
    })
}

fn storage_error(doing: &str, path: &Path, e: io::Error) -> Error {
    Error::storage(format!("{doing} {}", path.display()), e)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The nearest existing ancestor of `dir` (or `dir` itself) and the
/// directories below it down to `dir` that are missing, innermost first.
fn missing_dirs(dir: &Path) -> Result<(PathBuf, Vec<PathBuf>)> {
    let mut missing = Vec::new();
    let mut at = dir;
    loop {
        match fs::symlink_metadata(at) {
            Ok(_) => return Ok((at.to_path_buf(), missing)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(at.to_path_buf()),
            Err(e) => return Err(storage_error("looking up", at, e)),
        }
        at = at
            .parent()
            .ok_or_else(|| Error::not_found(dir.display().to_string()))?;
    }
}

/// Creates `missing` (innermost first, as [`missing_dirs`] returns them) and
/// returns the directories that got a new entry: the parent of each.
fn create_missing(missing: Vec<PathBuf>) -> Result<Vec<PathBuf>> {
    let mut changed = Vec::new();
    for dir in missing.into_iter().rev() {
        match fs::create_dir(&dir) {
            Ok(()) => changed.extend(dir.parent().map(Path::to_path_buf)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(storage_error("creating directory", &dir, e)),
        }
    }
    Ok(changed)
}

/// Creates a new temporary file for `name` in `dir` (`O_CREAT|O_EXCL`).
fn create_temp(dir: &Path) -> Result<(PathBuf, File)> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let stamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut attempts = 0;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!("{TEMP_PREFIX}{}-{stamp:x}-{n}", std::process::id()));
        match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(file) => return Ok((tmp, file)),
            // Another process's (another host's, or a left-over of a
            // process with our id): take the next name.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 64 => attempts += 1,
            Err(e) => return Err(storage_error("creating temporary file", &tmp, e)),
        }
    }
}

/// Gives the temporary file `tmp` the name `target`, unless it exists.
fn publish(tmp: &Path, target: &Path) -> Result<()> {
    match fs::hard_link(tmp, target) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => match same_file(tmp, target) {
            // A retransmitted NFS LINK answered "exists" for our own link.
            true => Ok(()),
            false => Err(Error::AlreadyExists {
                what: target.display().to_string(),
            }),
        },
        Err(e) => Err(storage_error("publishing", target, e)),
    }
}

#[cfg(unix)]
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::symlink_metadata(a), fs::symlink_metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_: &Path, _: &Path) -> bool {
    false
}

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    File,
    Temp,
    Dir,
    /// Symbolic links and special files: never followed, listed or read.
    Other,
}

struct Entry {
    abs: PathBuf,
    /// The storage path (for files under the walked directory).
    rel: String,
    kind: Kind,
    meta: fs::Metadata,
}

/// Every entry below `dir`, depth first, a directory after its contents;
/// symbolic links are not followed. `prefix` is the storage path of `dir`
/// with a trailing `/` (or empty for the root). Entries that vanish during
/// the walk are skipped, and so are names that are not storage paths.
fn walk(dir: &Path, prefix: &str, out: &mut Vec<Entry>) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(storage_error("listing", dir, e)),
    };
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(storage_error("listing", dir, e)),
        };
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if name.contains('\\') || (prefix.is_empty() && name == "lost+found") {
            continue;
        }
        let meta = match entry.metadata() {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(storage_error("listing", &entry.path(), e)),
        };
        let (abs, rel) = (entry.path(), format!("{prefix}{name}"));
        let kind = if meta.is_dir() {
            walk(&abs, &format!("{rel}/"), out)?;
            Kind::Dir
        } else if name.starts_with(TEMP_PREFIX) {
            Kind::Temp
        } else if meta.is_file() {
            Kind::File
        } else {
            Kind::Other
        };
        out.push(Entry { abs, rel, kind, meta });
    }
    Ok(())
}

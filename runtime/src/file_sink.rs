//! A transactional file sink (Flink's `FileSink`): rolling part files
//! written as hidden in-progress files and renamed to their final names on
//! commit; exactly-once through two-phase commit ([`crate::TwoPhaseCommitSink`]).
//!
//! In the output directory:
//! - `.part-<subtask>-<txn>-<n>.inprogress`: a part of an open or
//!   pre-committed transaction (hidden, not output yet);
//! - `part-<subtask>-<txn>-<n>`: committed output, one line per record.
//!
//! A commit renames every part of a transaction; a part whose final file
//! exists and whose in-progress file does not was committed already and is
//! skipped, so commits can be repeated after a failure. At start, the
//! in-progress files that no restored transaction names are removed.
//!
//! [`FileSink::at_least_once`] is the plain variant: visible files written
//! directly and flushed at every barrier; after a failure, replayed records
//! are written again (duplicates).

use crate::error::{Result, RuntimeError};
use crate::sink::{Sink, SinkWriter};
use crate::two_phase::{TransactionalWriter, TwoPhaseCommitSink};
use serde::{Deserialize, Serialize};
use sluice_core::CheckpointId;
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Formats a record as one line (without the newline).
pub type LineFormat<T> = Arc<dyn Fn(&T, &mut String) + Send + Sync>;

/// Where a [`FileSink`] can be made to fail, for fault-injection tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileSinkPoint {
    /// Before a pre-commit flushes the transaction.
    BeforePreCommit,
    /// After a pre-commit, before the checkpoint completes.
    AfterPreCommit,
    /// Before renaming part `n` of a transaction being committed (for
    /// `n > 0`, part of the transaction is committed already).
    CommitPart(usize),
    /// After a transaction was committed.
    AfterCommit,
}

/// Fails (returns an error, or panics) at chosen points.
pub type FileSinkHook = Arc<dyn Fn(u32, FileSinkPoint) -> Result<()> + Send + Sync>;

/// An exactly-once sink writing lines into rolling part files in a directory.
pub struct FileSink<T> {
    dir: PathBuf,
    format: LineFormat<T>,
    max_part_bytes: u64,
    hook: Option<FileSinkHook>,
}

impl<T> Clone for FileSink<T> {
    fn clone(&self) -> Self {
        FileSink {
            dir: self.dir.clone(),
            format: self.format.clone(),
            max_part_bytes: self.max_part_bytes,
            hook: self.hook.clone(),
        }
    }
}

/// A transaction of a [`FileSink`]: the parts it wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileTxn {
    /// The subtask that wrote it.
    pub subtask: u32,
    /// Its id (random, unique).
    pub id: String,
    /// Final names of its parts, in order.
    pub parts: Vec<String>,
}

/// Checks a transaction handle (it may come from a checkpoint): its id is
/// hexadecimal and part `n` is named `part-<subtask>-<id>-<n>`, so that no
/// name can point outside the sink's directory.
fn check_txn(txn: &FileTxn) -> std::result::Result<(), String> {
    let id_ok = !txn.id.is_empty() && txn.id.len() <= 64 && txn.id.bytes().all(|b| b.is_ascii_hexdigit());
    if !id_ok {
        return Err(format!(
            "file sink transaction id {:?} is not the hexadecimal id the sink writes",
            txn.id
        ));
    }
    for (n, name) in txn.parts.iter().enumerate() {
        let want = format!("part-{}-{}-{n}", txn.subtask, txn.id);
        if *name != want {
            return Err(format!(
                "file sink transaction {} names part {n} {name:?}, expected {want:?} (a part is a file of the \
                 sink's own directory)",
                txn.id
            ));
        }
    }
    Ok(())
}

fn in_progress(name: &str) -> String {
    format!(".{name}.inprogress")
}

fn io_error(what: impl Into<String>, e: std::io::Error) -> RuntimeError {
    RuntimeError::Storage(sluice_core::Error::storage(what, e))
}

impl<T> FileSink<T> {
    /// Writes `format(record)` lines into part files under `dir` (created
    /// if missing). Parts roll at 64 MiB.
    pub fn new(dir: impl Into<PathBuf>, format: impl Fn(&T, &mut String) + Send + Sync + 'static) -> Self {
        FileSink {
            dir: dir.into(),
            format: Arc::new(format),
            max_part_bytes: 64 << 20,
            hook: None,
        }
    }

    /// Rolls to a new part file once a part holds this many bytes.
    pub fn with_max_part_bytes(mut self, bytes: u64) -> Self {
        self.max_part_bytes = bytes.max(1);
        self
    }

    /// A test hook called at every [`FileSinkPoint`] with the subtask.
    pub fn with_fault_hook(mut self, hook: FileSinkHook) -> Self {
        self.hook = Some(hook);
        self
    }

    /// The at-least-once variant ([`Sink`]): no transactions.
    pub fn at_least_once(self) -> AtLeastOnceFileSink<T> {
        AtLeastOnceFileSink { inner: self }
    }
}

impl<T: Send + 'static> TwoPhaseCommitSink<T> for FileSink<T> {
    type Writer = FileSinkWriter<T>;

    fn open(&self, subtask: u32, _parallelism: u32) -> Result<FileSinkWriter<T>> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| io_error(format!("creating the sink directory {}", self.dir.display()), e))?;
        Ok(FileSinkWriter {
            sink: self.clone(),
            subtask,
            out: None,
            line: String::new(),
        })
    }
}

/// The writer of one subtask of a [`FileSink`].
pub struct FileSinkWriter<T> {
    sink: FileSink<T>,
    subtask: u32,
    /// The open part of the current transaction and its size.
    out: Option<(BufWriter<File>, u64, String)>,
    line: String,
}

impl<T> FileSinkWriter<T> {
    fn hook(&self, point: FileSinkPoint) -> Result<()> {
        match &self.sink.hook {
            Some(h) => h(self.subtask, point),
            None => Ok(()),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.sink.dir.join(name)
    }

    /// Flushes and syncs the open part, if any.
    fn close_part(&mut self) -> Result<()> {
        if let Some((mut w, _, name)) = self.out.take() {
            let what = || format!("part {} in {}", in_progress(&name), self.sink.dir.display());
            w.flush().map_err(|e| io_error(what(), e))?;
            w.get_ref().sync_all().map_err(|e| io_error(what(), e))?;
        }
        Ok(())
    }

    fn sync_dir(&self) -> Result<()> {
        File::open(&self.sink.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| {
                io_error(
                    format!("syncing the sink directory {}", self.sink.dir.display()),
                    e,
                )
            })
    }

    fn remove(&self, name: &str) -> Result<()> {
        match std::fs::remove_file(self.path(name)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error(format!("removing {}", self.path(name).display()), e)),
        }
    }
}

impl<T: Send + 'static> TransactionalWriter<T> for FileSinkWriter<T> {
    type Txn = FileTxn;

    fn begin(&mut self) -> Result<FileTxn> {
        Ok(FileTxn {
            subtask: self.subtask,
            id: format!("{:016x}", rand::random::<u64>()),
            parts: Vec::new(),
        })
    }

    fn write(&mut self, txn: &mut FileTxn, record: T) -> Result<()> {
        let roll = match &self.out {
            None => true,
            Some((_, bytes, _)) => *bytes >= self.sink.max_part_bytes,
        };
        if roll {
            self.close_part()?;
            let name = format!("part-{}-{}-{}", self.subtask, txn.id, txn.parts.len());
            let path = self.path(&in_progress(&name));
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| io_error(format!("creating {}", path.display()), e))?;
            txn.parts.push(name.clone());
            self.out = Some((BufWriter::with_capacity(64 << 10, file), 0, name));
        }
        self.line.clear();
        (self.sink.format)(&record, &mut self.line);
        self.line.push('\n');
        if let Some((w, bytes, name)) = self.out.as_mut() {
            w.write_all(self.line.as_bytes())
                .map_err(|e| io_error(format!("writing {}", in_progress(name)), e))?;
            *bytes += self.line.len() as u64;
        }
        Ok(())
    }

    fn pre_commit(&mut self, _txn: &mut FileTxn) -> Result<()> {
        self.hook(FileSinkPoint::BeforePreCommit)?;
        self.close_part()?;
        self.sync_dir()?;
        self.hook(FileSinkPoint::AfterPreCommit)
    }

    fn check_restored(&self, txn: &FileTxn) -> std::result::Result<(), String> {
        check_txn(txn)
    }

    fn commit(&mut self, txn: &FileTxn) -> Result<()> {
        check_txn(txn).map_err(|reason| {
            RuntimeError::Storage(sluice_core::Error::corrupt(
                self.sink.dir.display().to_string(),
                reason,
            ))
        })?;
        for (n, name) in txn.parts.iter().enumerate() {
            self.hook(FileSinkPoint::CommitPart(n))?;
            let (from, to) = (self.path(&in_progress(name)), self.path(name));
            match std::fs::rename(&from, &to) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if !to.exists() {
                        return Err(RuntimeError::Storage(sluice_core::Error::not_found(format!(
                            "part {name} of pre-committed transaction {} in {}: neither its in-progress nor its \
                             final file exists (was the directory changed by hand?)",
                            txn.id,
                            self.sink.dir.display()
                        ))));
                    }
                    // Committed already (a commit repeated after a failure).
                }
                Err(e) => return Err(io_error(format!("committing {}", from.display()), e)),
            }
        }
        self.sync_dir()?;
        self.hook(FileSinkPoint::AfterCommit)
    }

    fn abort(&mut self, txn: FileTxn) -> Result<()> {
        check_txn(&txn).map_err(|reason| {
            RuntimeError::Storage(sluice_core::Error::corrupt(
                self.sink.dir.display().to_string(),
                reason,
            ))
        })?;
        if self.out.as_ref().is_some_and(|(_, _, n)| txn.parts.contains(n)) {
            self.out = None;
        }
        for name in &txn.parts {
            self.remove(&in_progress(name))?;
        }
        Ok(())
    }

    fn recover(&mut self, restored: &[FileTxn], owns: &dyn Fn(u32) -> bool) -> Result<()> {
        for txn in restored {
            self.commit(txn)?;
        }
        // Parts of transactions no checkpoint holds: left by a failed attempt.
        let keep: HashSet<String> = restored
            .iter()
            .flat_map(|t| t.parts.iter().map(|p| in_progress(p)))
            .collect();
        let entries = std::fs::read_dir(&self.sink.dir).map_err(|e| {
            io_error(
                format!("listing the sink directory {}", self.sink.dir.display()),
                e,
            )
        })?;
        for entry in entries {
            let entry = entry.map_err(|e| io_error(format!("listing {}", self.sink.dir.display()), e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name
                .strip_prefix(".part-")
                .filter(|_| name.ends_with(".inprogress"))
            else {
                continue;
            };
            let subtask = rest.split('-').next().and_then(|s| s.parse::<u32>().ok());
            if subtask.is_some_and(owns) && !keep.contains(&name) {
                self.remove(&name)?;
            }
        }
        Ok(())
    }
}

/// The at-least-once variant of [`FileSink`]: each subtask writes a visible
/// file per attempt, flushed at every barrier.
pub struct AtLeastOnceFileSink<T> {
    inner: FileSink<T>,
}

impl<T: Send + 'static> Sink<T> for AtLeastOnceFileSink<T> {
    fn open(&self, subtask: u32, _parallelism: u32) -> Result<Box<dyn SinkWriter<T>>> {
        let dir = &self.inner.dir;
        std::fs::create_dir_all(dir)
            .map_err(|e| io_error(format!("creating the sink directory {}", dir.display()), e))?;
        let path = dir.join(format!("part-{subtask}-{:016x}-0", rand::random::<u64>()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io_error(format!("creating {}", path.display()), e))?;
        Ok(Box::new(PlainFileWriter {
            out: BufWriter::new(file),
            path,
            format: self.inner.format.clone(),
            line: String::new(),
        }))
    }
}

struct PlainFileWriter<T> {
    out: BufWriter<File>,
    path: PathBuf,
    format: LineFormat<T>,
    line: String,
}

impl<T: Send> SinkWriter<T> for PlainFileWriter<T> {
    fn write(&mut self, record: T) -> Result<()> {
        self.line.clear();
        (self.format)(&record, &mut self.line);
        self.line.push('\n');
        self.out
            .write_all(self.line.as_bytes())
            .map_err(|e| io_error(format!("writing {}", self.path.display()), e))
    }
    fn snapshot(&mut self, _checkpoint: CheckpointId) -> Result<()> {
        self.out
            .flush()
            .map_err(|e| io_error(format!("flushing {}", self.path.display()), e))
    }
    fn finish(&mut self) -> Result<()> {
        self.out
            .flush()
            .map_err(|e| io_error(format!("flushing {}", self.path.display()), e))
    }
}

/// The committed output of a file sink: every line of every visible part
/// file in `dir` (in-progress files are not output).
pub fn read_committed_lines(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut lines = Vec::new();
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("part-"))
        .map(|e| e.path())
        .collect();
    names.sort();
    for path in names {
        let text = std::fs::read_to_string(&path)?;
        lines.extend(text.lines().map(str::to_string));
    }
    Ok(lines)
}

//! Replayable sources with stored positions.
//!
//! A source is a set of *splits*; each split has a read position (an
//! offset) that is stored in every checkpoint and sought on restore. Split
//! `j` is read by subtask `j % parallelism`, so a source with more splits
//! than subtasks spreads them, and rescaling redistributes them.

use crate::error::{Result, RuntimeError};
use crate::operator::Collector;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;

/// A replayable source of records of type `T` (a factory of split readers).
pub trait Source<T>: Send + Sync + 'static {
    /// The number of splits. Fixed for a source, whatever the parallelism.
    fn num_splits(&self) -> u32;
    /// Opens split `split` positioned at `offset` (0 = the beginning).
    fn open_split(&self, split: u32, offset: u64) -> Result<Box<dyn SplitReader<T>>>;
    /// Records read per batch (default [`crate::channel::BATCH_SIZE`]).
    fn batch_size(&self) -> usize {
        crate::channel::BATCH_SIZE
    }
    /// A pause after every batch, to pace a source (tests, demos).
    fn pause(&self) -> Option<std::time::Duration> {
        None
    }
}

/// Reads one split.
pub trait SplitReader<T>: Send {
    /// Emits up to `max` records; returns `false` once the split is exhausted.
    fn read(&mut self, max: usize, out: &mut Collector<'_, T>) -> Result<bool>;
    /// The position after the last emitted record.
    fn offset(&self) -> u64;
}

/// A generator over the indices `0..count`, cut into contiguous splits; the
/// reference workload's source. The position is the next index.
pub struct SequenceSource<T> {
    count: u64,
    splits: u32,
    make: Arc<dyn Fn(u64) -> T + Send + Sync>,
    pacing: Option<(usize, std::time::Duration)>,
}

impl<T> SequenceSource<T> {
    /// Records `make(i)` for `i` in `0..count`, in `splits` splits.
    pub fn new(count: u64, splits: u32, make: impl Fn(u64) -> T + Send + Sync + 'static) -> Self {
        SequenceSource {
            count,
            splits: splits.max(1),
            make: Arc::new(make),
            pacing: None,
        }
    }

    /// Paces the source: batches of `batch` records with `pause` after each.
    pub fn paced(mut self, batch: usize, pause: std::time::Duration) -> Self {
        self.pacing = Some((batch.max(1), pause));
        self
    }

    fn bounds(&self, split: u32) -> (u64, u64) {
        let n = u128::from(self.count);
        let s = u128::from(self.splits);
        let j = u128::from(split);
        ((n * j / s) as u64, (n * (j + 1) / s) as u64)
    }
}

impl<T: Send + 'static> Source<T> for SequenceSource<T> {
    fn num_splits(&self) -> u32 {
        self.splits
    }

    fn batch_size(&self) -> usize {
        self.pacing.map(|p| p.0).unwrap_or(crate::channel::BATCH_SIZE)
    }

    fn pause(&self) -> Option<std::time::Duration> {
        self.pacing.map(|p| p.1)
    }

    fn open_split(&self, split: u32, offset: u64) -> Result<Box<dyn SplitReader<T>>> {
        let (start, end) = self.bounds(split);
        let next = if offset == 0 { start } else { offset };
        if next < start || next > end {
            return Err(RuntimeError::InvalidJob(format!(
                "sequence split {split} covers [{start}, {end}); stored position {offset} is outside it"
            )));
        }
        Ok(Box::new(SequenceReader {
            next,
            end,
            make: self.make.clone(),
        }))
    }
}

struct SequenceReader<T> {
    next: u64,
    end: u64,
    make: Arc<dyn Fn(u64) -> T + Send + Sync>,
}

impl<T: Send> SplitReader<T> for SequenceReader<T> {
    #[inline]
    fn read(&mut self, max: usize, out: &mut Collector<'_, T>) -> Result<bool> {
        let stop = self.end.min(self.next.saturating_add(max as u64));
        while self.next < stop {
            let i = self.next;
            self.next += 1;
            out.collect((self.make)(i))?;
        }
        Ok(self.next < self.end)
    }

    fn offset(&self) -> u64 {
        // Stored as an absolute index; 0 means "from the start" only for
        // split 0, whose start is 0 anyway.
        self.next
    }
}

/// An in-memory vector, for tests: element `k` belongs to split `k % splits`;
/// the position is the number of the split's elements already emitted.
pub struct VecSource<T> {
    data: Arc<Vec<T>>,
    splits: u32,
}

impl<T> VecSource<T> {
    /// A source over `data` in `splits` splits.
    pub fn new(data: Vec<T>, splits: u32) -> Self {
        VecSource {
            data: Arc::new(data),
            splits: splits.max(1),
        }
    }
}

impl<T: Clone + Send + Sync + 'static> Source<T> for VecSource<T> {
    fn num_splits(&self) -> u32 {
        self.splits
    }

    fn open_split(&self, split: u32, offset: u64) -> Result<Box<dyn SplitReader<T>>> {
        Ok(Box::new(VecReader {
            data: self.data.clone(),
            split,
            splits: self.splits,
            emitted: offset,
        }))
    }
}

struct VecReader<T> {
    data: Arc<Vec<T>>,
    split: u32,
    splits: u32,
    emitted: u64,
}

impl<T: Clone + Send + Sync> SplitReader<T> for VecReader<T> {
    fn read(&mut self, max: usize, out: &mut Collector<'_, T>) -> Result<bool> {
        for _ in 0..max {
            let idx = self.emitted * u64::from(self.splits) + u64::from(self.split);
            match self.data.get(idx as usize) {
                Some(v) => {
                    self.emitted += 1;
                    out.collect(v.clone())?;
                }
                None => return Ok(false),
            }
        }
        let next = self.emitted * u64::from(self.splits) + u64::from(self.split);
        Ok((next as usize) < self.data.len())
    }

    fn offset(&self) -> u64 {
        self.emitted
    }
}

/// The lines of text files, one split per file; the position is the byte
/// offset of the next line. A last line without a newline is emitted too.
/// Line endings (`\n`, `\r\n`) are stripped. Files are read with blocking
/// I/O in batches; use local files.
pub struct FileLinesSource {
    paths: Arc<Vec<PathBuf>>,
}

impl FileLinesSource {
    /// A source over `paths` (one split each).
    pub fn new(paths: Vec<PathBuf>) -> Self {
        FileLinesSource {
            paths: Arc::new(paths),
        }
    }
}

impl Source<String> for FileLinesSource {
    fn num_splits(&self) -> u32 {
        self.paths.len() as u32
    }

    fn open_split(&self, split: u32, offset: u64) -> Result<Box<dyn SplitReader<String>>> {
        let path = self
            .paths
            .get(split as usize)
            .ok_or_else(|| RuntimeError::InvalidJob(format!("file source has no split {split}")))?
            .clone();
        let io = |e: std::io::Error| {
            RuntimeError::Storage(sluice_core::Error::storage(
                format!("source file {}", path.display()),
                e,
            ))
        };
        let mut file = std::fs::File::open(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if offset > len {
            return Err(RuntimeError::InvalidJob(format!(
                "source file {} is {len} bytes, shorter than the stored position {offset}; was it truncated?",
                path.display()
            )));
        }
        file.seek(SeekFrom::Start(offset)).map_err(io)?;
        Ok(Box::new(FileLinesReader {
            reader: BufReader::new(file),
            offset,
            path,
            line: Vec::new(),
        }))
    }
}

struct FileLinesReader {
    reader: BufReader<std::fs::File>,
    offset: u64,
    path: PathBuf,
    line: Vec<u8>,
}

impl SplitReader<String> for FileLinesReader {
    fn read(&mut self, max: usize, out: &mut Collector<'_, String>) -> Result<bool> {
        for _ in 0..max {
            self.line.clear();
            let n = self.reader.read_until(b'\n', &mut self.line).map_err(|e| {
                RuntimeError::Storage(sluice_core::Error::storage(
                    format!("source file {}", self.path.display()),
                    e,
                ))
            })?;
            if n == 0 {
                return Ok(false);
            }
            self.offset += n as u64;
            let mut l: &[u8] = &self.line;
            if l.ends_with(b"\n") {
                l = &l[..l.len() - 1];
                if l.ends_with(b"\r") {
                    l = &l[..l.len() - 1];
                }
            }
            out.collect(String::from_utf8_lossy(l).into_owned())?;
        }
        Ok(true)
    }

    fn offset(&self) -> u64 {
        self.offset
    }
}

//! # sluice-backend-s3
//!
//! [`S3CheckpointStorage`]: Sluice checkpoints on Amazon S3 and
//! S3-compatible stores, through `aws-sdk-s3` and `aws-config`'s standard
//! credential and region chain (environment variables, profiles, instance
//! roles), with explicit overrides ([`S3Config`]).
//!
//! Layout under `s3://bucket/prefix/`: `chk-<id>/` per checkpoint holds its
//! state files and a `_metadata` object written last. A checkpoint exists if
//! and only if its `_metadata` exists.
//!
//! **Conditional writes.** Files and metadata are written create-if-absent.
//! Where the store honours `If-None-Match: *` (AWS S3, MinIO) that is one
//! atomic conditional PUT. Some stores ignore the header (Garage: a second
//! conditional PUT succeeds): [`S3CheckpointStorage::open`] detects this with
//! a probe, logs it, and then checks with a HEAD before the PUT. That is
//! correct with one writer per job directory (which the job master is), but
//! not against concurrent writers.
//!
//! Large files go up as multipart uploads with parallel parts (failed
//! uploads are aborted); reads are range GETs, so a restore reads only the
//! key-group sections a subtask owns.
//!
//! **Errors.** A failed write that may have taken effect (a timeout, a
//! connection failure after the request may have been sent, a 5xx, an
//! unreadable answer) is [`Error::Indeterminate`]: read back before
//! deciding. Failed reads, and writes the store rejected (3xx/4xx) or that
//! were never sent, are determinate. Messages name the bucket, the endpoint
//! and what to check, never credentials; the SDK's error is their source.
//! [`S3CheckpointStorage::open_read_only`] is for tools that only read: it
//! writes nothing, not even the probe.
//!
//! ```no_run
//! # async fn demo() -> sluice_core::Result<()> {
//! use sluice_backend_s3::{S3CheckpointStorage, S3Config};
//! let storage = S3CheckpointStorage::open(S3Config::from_url("s3://my-bucket/jobs/keyed-sum")?).await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod errors;
mod objects;
mod upload;

use async_trait::async_trait;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use bytes::Bytes;
use errors::{classify, determinate, Request, Target};
use sluice_core::metadata::SAVEPOINT_METADATA_FILE;
use sluice_core::storage::{dir_prefix, validate_dir, validate_path, Capabilities};
use sluice_core::{CheckpointStorage, Error, FileListing, FileUpload, Result};

use std::ops::Range;
use std::time::Duration;
use tracing::{info, warn};

/// Settings of an [`S3CheckpointStorage`]. Credentials are never part of it:
/// they come from the standard AWS chain.
#[derive(Debug, Clone)]
pub struct S3Config {
    /// The bucket.
    pub bucket: String,
    /// Key prefix of the job's directory (no leading or trailing `/`).
    pub prefix: String,
    /// Endpoint URL override (else `AWS_ENDPOINT_URL` or AWS's default).
    pub endpoint_url: Option<String>,
    /// Region override (else the AWS chain; `us-east-1` if none).
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), needed by most
    /// S3-compatible stores on 127.0.0.1.
    pub force_path_style: bool,
    /// Files larger than this go up as multipart uploads of parts this size.
    pub part_size: usize,
    /// Parts uploaded in parallel.
    pub upload_concurrency: usize,
    /// Bound on one attempt of a request.
    pub attempt_timeout: Duration,
    /// Bound on a request including retries.
    pub operation_timeout: Duration,
    /// Attempts per request (the SDK's standard retry, with backoff).
    pub max_attempts: u32,
}

impl S3Config {
    /// Defaults for `bucket` and `prefix`: path-style addressing, 16 MiB
    /// parts, 4 parallel parts, 3 attempts, 30 s per attempt, 120 s per
    /// operation.
    pub fn new(bucket: impl Into<String>, prefix: impl Into<String>) -> Self {
        S3Config {
            bucket: bucket.into(),
            prefix: prefix.into().trim_matches('/').to_string(),
            endpoint_url: None,
            region: None,
            force_path_style: true,
            part_size: 16 << 20,
            upload_concurrency: 4,
            attempt_timeout: Duration::from_secs(30),
            operation_timeout: Duration::from_secs(120),
            max_attempts: 3,
        }
    }

    /// Parses `s3://bucket/prefix`.
    pub fn from_url(url: &str) -> Result<Self> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| Error::InvalidArgument {
            what: format!("S3 location {url:?}"),
            reason: "must look like s3://bucket/prefix".into(),
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(Error::InvalidArgument {
                what: format!("S3 location {url:?}"),
                reason: "the bucket name is missing: s3://bucket/prefix".into(),
            });
        }
        Ok(S3Config::new(bucket, prefix))
    }
}

/// Checkpoint storage on S3.
#[derive(Clone)]
pub struct S3CheckpointStorage {
    client: Client,
    config: S3Config,
    endpoint: String,
    conditional_writes: bool,
    read_only: bool,
}

impl std::fmt::Debug for S3CheckpointStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "S3CheckpointStorage({})", self.describe())
    }
}

/// [`classify`] for a request of `s`.
fn map_sdk<E>(s: &S3CheckpointStorage, request: Request, what: &str, e: SdkError<E, HttpResponse>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let target = Target {
        bucket: &s.config.bucket,
        endpoint: &s.endpoint,
    };
    classify(&target, request, what, e)
}

impl S3CheckpointStorage {
    /// Connects, checks that the bucket is reachable with the credentials,
    /// and probes whether the store honours conditional writes.
    pub async fn open(config: S3Config) -> Result<Self> {
        let mut storage = Self::connect(config, false).await?;
        storage.conditional_writes = storage.probe_conditional_writes().await?;
        if storage.conditional_writes {
            info!(
                "{}: the store honours If-None-Match; commits are atomic conditional PUTs",
                storage.describe()
            );
        } else {
            warn!(
                "{}: the store ignores If-None-Match (a second conditional PUT succeeded); commits check with \
                 HEAD before PUT, which is safe with one writer per job directory",
                storage.describe()
            );
        }
        Ok(storage)
    }

    /// Connects and checks the bucket like [`open`](Self::open), for tools
    /// that only read (`sluice inspect`, `sluice checkpoints list`, the
    /// source of `sluice copy`): it writes nothing — no conditional-write
    /// probe, so read-only credentials suffice — and every write through
    /// the handle fails with [`Error::Storage`] without sending a request.
    pub async fn open_read_only(config: S3Config) -> Result<Self> {
        Self::connect(config, true).await
    }

    /// Whether the storage was opened with [`open_read_only`](Self::open_read_only).
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Refuses a write on a read-only handle.
    fn check_writable(&self, what: &str) -> Result<()> {
        if self.read_only {
            return Err(Error::storage(
                format!("{what} in {}", self.describe()),
                "the storage was opened read-only (for inspecting, listing or copying from it); nothing was \
                 written",
            ));
        }
        Ok(())
    }

    /// The client and the bucket check.
    async fn connect(config: S3Config, read_only: bool) -> Result<Self> {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .operation_attempt_timeout(config.attempt_timeout)
                    .operation_timeout(config.operation_timeout)
                    .connect_timeout(Duration::from_secs(5))
                    .build(),
            )
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(config.max_attempts));
        if let Some(region) = &config.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(url) = &config.endpoint_url {
            loader = loader.endpoint_url(url.clone());
        }
        let shared = loader.load().await;
        let mut builder =
            aws_sdk_s3::config::Builder::from(&shared).force_path_style(config.force_path_style);
        if shared.region().is_none() {
            builder = builder.region(aws_config::Region::new("us-east-1"));
        }
        let endpoint = config
            .endpoint_url
            .clone()
            .or_else(|| shared.endpoint_url().map(str::to_string))
            .unwrap_or_else(|| "the AWS S3 endpoint".into());
        let client = Client::from_conf(builder.build());
        let storage = S3CheckpointStorage {
            client,
            config,
            endpoint,
            conditional_writes: false,
            read_only,
        };
        storage
            .client
            .head_bucket()
            .bucket(&storage.config.bucket)
            .send()
            .await
            .map_err(|e| match map_sdk(&storage, Request::Read, "bucket check", e) {
                Error::NotFound { .. } => Error::NotFound {
                    what: format!(
                        "bucket {} at {} (create it, or check the bucket name)",
                        storage.config.bucket, storage.endpoint
                    ),
                },
                other => other,
            })?;
        Ok(storage)
    }

    /// Whether the store honours `If-None-Match: *` (found by the probe at open).
    pub fn conditional_writes(&self) -> bool {
        self.conditional_writes
    }

    /// The client, for tools that need more than the storage API.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The full key of a relative path.
    pub fn key(&self, path: &str) -> String {
        if self.config.prefix.is_empty() {
            path.to_string()
        } else {
            format!("{}/{path}", self.config.prefix)
        }
    }

    fn root(&self) -> String {
        self.key("")
    }

    async fn probe_conditional_writes(&self) -> Result<bool> {
        let key = self.key(&format!("_sluice_probe/{:016x}", rand::random::<u64>()));
        let put = || {
            self.client
                .put_object()
                .bucket(&self.config.bucket)
                .key(&key)
                .if_none_match("*")
                .body(ByteStream::from_static(b"probe"))
                .send()
        };
        // The probe object is ours alone and nobody reads it: whether a
        // failed probe PUT landed does not matter, so its failures are
        // determinate (open fails).
        put()
            .await
            .map_err(|e| determinate(map_sdk(self, Request::Write, "conditional-write probe", e)))?;
        let honoured = match put().await {
            Ok(_) => false,
            Err(e) => match map_sdk(self, Request::Write, "conditional-write probe", e) {
                Error::AlreadyExists { .. } => true,
                other => return Err(determinate(other)),
            },
        };
        let _ = self
            .client
            .delete_object()
            .bucket(&self.config.bucket)
            .key(&key)
            .send()
            .await;
        Ok(honoured)
    }

    async fn exists(&self, key: &str, what: &str) -> Result<bool> {
        match self
            .client
            .head_object()
            .bucket(&self.config.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) => match map_sdk(self, Request::Read, what, e) {
                Error::NotFound { .. } => Ok(false),
                other => Err(other),
            },
        }
    }
}

#[async_trait]
impl CheckpointStorage for S3CheckpointStorage {
    fn describe(&self) -> String {
        format!(
            "s3://{}/{} at {}",
            self.config.bucket, self.config.prefix, self.endpoint
        )
    }

    async fn write_file(&self, path: &str, data: Bytes) -> Result<()> {
        validate_path(path)?;
        self.check_writable(path)?;
        let key = self.key(path);
        // A failed PUT or CompleteMultipartUpload may have taken effect:
        // such failures stay `Indeterminate`.
        if data.len() > self.config.part_size {
            self.multipart(&key, data, path).await
        } else {
            self.put_new(&key, data, path).await
        }
    }

    /// Buffers one part (`S3Config::part_size`), then uploads part by part
    /// in a multipart upload; memory holds about one part per file.
    async fn upload<'a>(&'a self, path: &str) -> Result<Box<dyn FileUpload + 'a>> {
        validate_path(path)?;
        self.check_writable(path)?;
        Ok(Box::new(upload::S3Upload::new(
            self,
            self.key(path),
            path.to_string(),
        )))
    }

    async fn read(&self, path: &str, range: Option<Range<u64>>) -> Result<Bytes> {
        match range {
            Some(range) => self.get_range(path, range).await,
            None => {
                let out = self
                    .client
                    .get_object()
                    .bucket(&self.config.bucket)
                    .key(self.key(path))
                    .send()
                    .await
                    .map_err(|e| map_sdk(self, Request::Read, path, e))?;
                let body = out.body.collect().await.map_err(|e| Error::storage(path, e))?;
                Ok(body.into_bytes())
            }
        }
    }

    async fn commit_file(&self, path: &str, data: Bytes) -> Result<()> {
        validate_path(path)?;
        self.check_writable(path)?;
        // A completed PUT is durable in S3; failures that may have taken
        // effect are `Indeterminate`.
        self.put_new(&self.key(path), data, path).await
    }

    async fn list_files(&self, dir: &str) -> Result<Vec<FileListing>> {
        validate_dir(dir, true)?;
        let root = self.root();
        let mut files: Vec<FileListing> = self
            .list_objects(&self.key(&dir_prefix(dir)))
            .await?
            .into_iter()
            .filter_map(|(key, size)| {
                key.strip_prefix(&root).map(|p| FileListing {
                    path: p.to_string(),
                    size,
                })
            })
            .collect();
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(files)
    }

    async fn delete_file(&self, path: &str) -> Result<()> {
        validate_path(path)?;
        self.check_writable(path)?;
        let key = self.key(path);
        // S3 answers a DELETE of a missing key with success.
        self.client
            .delete_object()
            .bucket(&self.config.bucket)
            .key(&key)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| map_sdk(self, Request::Write, path, e))
    }

    async fn delete_dir(&self, dir: &str) -> Result<()> {
        validate_dir(dir, false)?;
        self.check_writable(dir)?;
        let meta = self.key(&format!("{dir}/{SAVEPOINT_METADATA_FILE}"));
        // The metadata first: the savepoint stops existing before its files go.
        self.client
            .delete_object()
            .bucket(&self.config.bucket)
            .key(&meta)
            .send()
            .await
            .map_err(|e| map_sdk(self, Request::Write, &meta, e))?;
        let prefix = self.key(&dir_prefix(dir));
        let keys = self.list_keys(&prefix).await?;
        self.delete_keys(keys, dir).await?;
        self.abort_incomplete_uploads(&prefix).await?;
        Ok(())
    }

    fn locate(&self, dir: &str) -> String {
        let key = self.key(dir);
        format!("s3://{}/{}", self.config.bucket, key.trim_end_matches('/'))
    }

    /// Create-if-absent is atomic only where the store honours
    /// `If-None-Match` (found by the probe at open); else a HEAD precedes
    /// the PUT, which is correct with one writer per job directory.
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            atomic_create: self.conditional_writes,
            durable: true,
        }
    }
}

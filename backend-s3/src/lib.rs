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
//! ```no_run
//! # async fn demo() -> sluice_core::Result<()> {
//! use sluice_backend_s3::{S3CheckpointStorage, S3Config};
//! let storage = S3CheckpointStorage::open(S3Config::from_url("s3://my-bucket/jobs/keyed-sum")?).await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

use async_trait::async_trait;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use aws_sdk_s3::Client;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use sluice_core::metadata::SAVEPOINT_METADATA_FILE;
use sluice_core::storage::{checkpoint_of_path, dir_prefix, validate_dir, validate_path};
use sluice_core::{CheckpointId, CheckpointListing, CheckpointStorage, Error, FileListing, Result};
use std::collections::BTreeMap;
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
}

impl std::fmt::Debug for S3CheckpointStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "S3CheckpointStorage({})", self.describe())
    }
}

/// How an S3 error maps to Sluice's, in the caller's terms. Never includes
/// credentials: only the bucket, the endpoint, the key and S3's error code.
fn map_sdk<E>(
    s: &S3CheckpointStorage,
    what: &str,
    e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let (bucket, endpoint) = (&s.config.bucket, &s.endpoint);
    match &e {
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            let code = se.err().code().unwrap_or("").to_string();
            match (code.as_str(), status) {
                ("NoSuchBucket", _) => Error::NotFound {
                    what: format!("bucket {bucket} at {endpoint} (create it, or check the bucket name)"),
                },
                ("NoSuchKey", _) | ("NotFound", _) | (_, 404) => Error::not_found(format!("{what} in s3://{bucket}")),
                ("PreconditionFailed", _) | (_, 412) => Error::AlreadyExists { what: format!("{what} in s3://{bucket}") },
                ("InvalidRange", _) | (_, 416) => {
                    Error::corrupt(what, "the object is shorter than the range read (truncated?)")
                }
                ("InvalidAccessKeyId", _) | ("SignatureDoesNotMatch", _) | ("AccessDenied", _) | (_, 401) | (_, 403) => {
                    Error::storage(
                        format!("{what} in bucket {bucket} at {endpoint}"),
                        format!(
                            "the endpoint rejected the credentials ({code}, HTTP {status}): check AWS_ACCESS_KEY_ID / \
                             AWS_SECRET_ACCESS_KEY or the profile, and the bucket's permissions"
                        ),
                    )
                }
                ("SlowDown", _) | ("Throttling", _) | (_, 429) | (_, 503) => Error::storage(
                    format!("{what} in bucket {bucket} at {endpoint}"),
                    format!("throttled by S3 ({code}, HTTP {status}) after retries"),
                ),
                _ => Error::storage(
                    format!("{what} in bucket {bucket} at {endpoint}"),
                    format!("{code} (HTTP {status}): {}", se.err().message().unwrap_or("")),
                ),
            }
        }
        SdkError::TimeoutError(_) => Error::Indeterminate {
            what: format!("{what} in bucket {bucket} at {endpoint}"),
            source: "timed out; the request may or may not have taken effect".into(),
        },
        SdkError::DispatchFailure(_) => Error::storage(
            format!("{what} in bucket {bucket}"),
            format!(
                "cannot reach the S3 endpoint {endpoint}: {}",
                DisplayErrorContext(&e)
            ),
        ),
        _ => Error::storage(
            format!("{what} in bucket {bucket} at {endpoint}"),
            DisplayErrorContext(&e).to_string(),
        ),
    }
}

/// A determinate failure: retried requests that certainly did not apply.
fn determinate(e: Error) -> Error {
    match e {
        Error::Indeterminate { what, source } => Error::Storage { what, source },
        other => other,
    }
}

impl S3CheckpointStorage {
    /// Connects, checks that the bucket is reachable with the credentials,
    /// and probes whether the store honours conditional writes.
    pub async fn open(config: S3Config) -> Result<Self> {
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
        let mut storage = S3CheckpointStorage {
            client,
            config,
            endpoint,
            conditional_writes: false,
        };
        storage
            .client
            .head_bucket()
            .bucket(&storage.config.bucket)
            .send()
            .await
            .map_err(|e| match map_sdk(&storage, "bucket check", e) {
                Error::NotFound { .. } => Error::NotFound {
                    what: format!(
                        "bucket {} at {} (create it, or check the bucket name)",
                        storage.config.bucket, storage.endpoint
                    ),
                },
                other => determinate(other),
            })?;
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
        put()
            .await
            .map_err(|e| determinate(map_sdk(self, "conditional-write probe", e)))?;
        let honoured = match put().await {
            Ok(_) => false,
            Err(e) => match map_sdk(self, "conditional-write probe", e) {
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
            Err(e) => match map_sdk(self, what, e) {
                Error::NotFound { .. } => Ok(false),
                other => Err(determinate(other)),
            },
        }
    }

    /// Create-if-absent PUT of one object.
    async fn put_new(&self, key: &str, data: Bytes, what: &str) -> Result<()> {
        if !self.conditional_writes && self.exists(key, what).await? {
            return Err(Error::AlreadyExists {
                what: format!("{what} in s3://{}", self.config.bucket),
            });
        }
        let mut req = self
            .client
            .put_object()
            .bucket(&self.config.bucket)
            .key(key)
            .body(ByteStream::from(data));
        if self.conditional_writes {
            req = req.if_none_match("*");
        }
        req.send().await.map(|_| ()).map_err(|e| map_sdk(self, what, e))
    }

    async fn multipart(&self, key: &str, data: Bytes, what: &str) -> Result<()> {
        if self.exists(key, what).await? {
            return Err(Error::AlreadyExists {
                what: format!("{what} in s3://{}", self.config.bucket),
            });
        }
        let bucket = &self.config.bucket;
        let created = self
            .client
            .create_multipart_upload()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| determinate(map_sdk(self, what, e)))?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| Error::storage(what, "the store returned no multipart upload id"))?
            .to_string();
        let part_size = self.config.part_size.max(5 << 20);
        let ranges: Vec<(i32, Range<usize>)> = (0..data.len())
            .step_by(part_size)
            .enumerate()
            .map(|(i, start)| (i as i32 + 1, start..(start + part_size).min(data.len())))
            .collect();
        let uploads = futures::stream::iter(ranges)
            .map(|(number, range)| {
                let body = ByteStream::from(data.slice(range));
                let upload_id = upload_id.clone();
                async move {
                    let out = self
                        .client
                        .upload_part()
                        .bucket(bucket)
                        .key(key)
                        .upload_id(upload_id)
                        .part_number(number)
                        .body(body)
                        .send()
                        .await
                        .map_err(|e| determinate(map_sdk(self, &format!("{what} part {number}"), e)))?;
                    Ok::<_, Error>(
                        CompletedPart::builder()
                            .part_number(number)
                            .set_e_tag(out.e_tag)
                            .build(),
                    )
                }
            })
            .buffer_unordered(self.config.upload_concurrency.max(1))
            .try_collect::<Vec<_>>()
            .await;
        let result = match uploads {
            Ok(mut parts) => {
                parts.sort_by_key(|p| p.part_number());
                let mut complete = self
                    .client
                    .complete_multipart_upload()
                    .bucket(bucket)
                    .key(key)
                    .upload_id(&upload_id)
                    .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build());
                if self.conditional_writes {
                    complete = complete.if_none_match("*");
                }
                complete
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| map_sdk(self, what, e))
            }
            Err(e) => Err(e),
        };
        if result.is_err() {
            if let Err(e) = self
                .client
                .abort_multipart_upload()
                .bucket(bucket)
                .key(key)
                .upload_id(&upload_id)
                .send()
                .await
            {
                warn!(
                    "could not abort the multipart upload of {what}: {}",
                    map_sdk(self, what, e)
                );
            }
        }
        result
    }

    /// Every object key under `prefix`, with pagination.
    async fn list_keys(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .list_objects(prefix)
            .await?
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }

    /// Every object (key, size) under `prefix`, with pagination.
    async fn list_objects(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let mut keys = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.config.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| determinate(map_sdk(self, "listing", e)))?;
            keys.extend(page.contents().iter().filter_map(|o| {
                o.key()
                    .map(|k| (k.to_string(), o.size().unwrap_or(0).max(0) as u64))
            }));
        }
        Ok(keys)
    }

    /// Aborts unfinished multipart uploads under `prefix` (left by a crash
    /// or a failed upload whose abort did not get through). Returns how many
    /// were aborted.
    pub async fn abort_incomplete_uploads(&self, prefix: &str) -> Result<usize> {
        let mut n = 0;
        let (mut key_marker, mut id_marker): (Option<String>, Option<String>) = (None, None);
        loop {
            let out = self
                .client
                .list_multipart_uploads()
                .bucket(&self.config.bucket)
                .prefix(prefix)
                .set_key_marker(key_marker.take())
                .set_upload_id_marker(id_marker.take())
                .send()
                .await
                .map_err(|e| determinate(map_sdk(self, "listing multipart uploads", e)))?;
            for u in out.uploads() {
                if let (Some(key), Some(id)) = (u.key(), u.upload_id()) {
                    self.client
                        .abort_multipart_upload()
                        .bucket(&self.config.bucket)
                        .key(key)
                        .upload_id(id)
                        .send()
                        .await
                        .map_err(|e| determinate(map_sdk(self, key, e)))?;
                    n += 1;
                }
            }
            if out.is_truncated() != Some(true) || out.next_key_marker().is_none() {
                return Ok(n);
            }
            key_marker = out.next_key_marker().map(str::to_string);
            id_marker = out.next_upload_id_marker().map(str::to_string);
        }
    }

    async fn delete_keys(&self, keys: Vec<String>, what: &str) -> Result<()> {
        for batch in keys.chunks(1000) {
            let objects = batch
                .iter()
                .map(|k| ObjectIdentifier::builder().key(k).build())
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| Error::storage(what, e))?;
            let delete = Delete::builder()
                .set_objects(Some(objects))
                .quiet(true)
                .build()
                .map_err(|e| Error::storage(what, e))?;
            let out = self
                .client
                .delete_objects()
                .bucket(&self.config.bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|e| determinate(map_sdk(self, what, e)))?;
            if let Some(err) = out.errors().first() {
                return Err(Error::storage(
                    what,
                    format!(
                        "could not delete {}: {}",
                        err.key().unwrap_or("?"),
                        err.code().unwrap_or("?")
                    ),
                ));
            }
        }
        Ok(())
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
        let key = self.key(path);
        let r = if data.len() > self.config.part_size {
            self.multipart(&key, data, path).await
        } else {
            self.put_new(&key, data, path).await
        };
        r.map_err(determinate)
    }

    async fn read_file(&self, path: &str) -> Result<Bytes> {
        let out = self
            .client
            .get_object()
            .bucket(&self.config.bucket)
            .key(self.key(path))
            .send()
            .await
            .map_err(|e| determinate(map_sdk(self, path, e)))?;
        let body = out.body.collect().await.map_err(|e| Error::storage(path, e))?;
        Ok(body.into_bytes())
    }

    async fn read_range(&self, path: &str, range: Range<u64>) -> Result<Bytes> {
        if range.start > range.end {
            return Err(Error::corrupt(
                path,
                format!("bad range {}..{}", range.start, range.end),
            ));
        }
        if range.start == range.end {
            // An empty read still checks that the object is long enough.
            let head = self
                .client
                .head_object()
                .bucket(&self.config.bucket)
                .key(self.key(path))
                .send()
                .await
                .map_err(|e| determinate(map_sdk(self, path, e)))?;
            let len = head.content_length().unwrap_or(0).max(0) as u64;
            if range.end > len {
                return Err(Error::corrupt(
                    path,
                    format!("range ends at {} beyond the object's {len} bytes", range.end),
                ));
            }
            return Ok(Bytes::new());
        }
        let out = self
            .client
            .get_object()
            .bucket(&self.config.bucket)
            .key(self.key(path))
            .range(format!("bytes={}-{}", range.start, range.end - 1))
            .send()
            .await
            .map_err(|e| determinate(map_sdk(self, path, e)))?;
        let bytes = out
            .body
            .collect()
            .await
            .map_err(|e| Error::storage(path, e))?
            .into_bytes();
        if bytes.len() as u64 != range.end - range.start {
            return Err(Error::corrupt(
                path,
                format!(
                    "asked for bytes {}..{}, got {}: the object is shorter than expected",
                    range.start,
                    range.end,
                    bytes.len()
                ),
            ));
        }
        Ok(bytes)
    }

    async fn commit_metadata(&self, id: CheckpointId, metadata: Bytes) -> Result<()> {
        let path = format!("{}/_metadata", id.dir());
        // Timeouts stay indeterminate: the job master reads back.
        self.put_new(&self.key(&path), metadata, &path).await
    }

    async fn read_metadata(&self, id: CheckpointId) -> Result<Bytes> {
        self.read_file(&format!("{}/_metadata", id.dir())).await
    }

    async fn list(&self) -> Result<Vec<CheckpointListing>> {
        let root = self.root();
        let mut found: BTreeMap<CheckpointId, bool> = BTreeMap::new();
        for key in self.list_keys(&root).await? {
            let rel = &key[root.len()..];
            if let Some(id) = checkpoint_of_path(rel) {
                let committed = rel.ends_with("/_metadata") && rel.matches('/').count() == 1;
                *found.entry(id).or_default() |= committed;
            }
        }
        Ok(found
            .into_iter()
            .map(|(id, committed)| CheckpointListing { id, committed })
            .collect())
    }

    async fn discard(&self, id: CheckpointId) -> Result<()> {
        let dir = self.key(&format!("{}/", id.dir()));
        let meta = self.key(&format!("{}/_metadata", id.dir()));
        // The metadata first: the checkpoint stops existing before its files go.
        self.client
            .delete_object()
            .bucket(&self.config.bucket)
            .key(&meta)
            .send()
            .await
            .map_err(|e| determinate(map_sdk(self, &meta, e)))?;
        let keys = self.list_keys(&dir).await?;
        self.delete_keys(keys, &dir).await?;
        self.abort_incomplete_uploads(&dir).await?;
        Ok(())
    }

    async fn commit_file(&self, path: &str, data: Bytes) -> Result<()> {
        validate_path(path)?;
        // A completed PUT is durable in S3; timeouts stay indeterminate.
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

    async fn delete_dir(&self, dir: &str) -> Result<()> {
        validate_dir(dir, false)?;
        let meta = self.key(&format!("{dir}/{SAVEPOINT_METADATA_FILE}"));
        // The metadata first: the savepoint stops existing before its files go.
        self.client
            .delete_object()
            .bucket(&self.config.bucket)
            .key(&meta)
            .send()
            .await
            .map_err(|e| determinate(map_sdk(self, &meta, e)))?;
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
}

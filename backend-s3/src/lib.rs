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

use async_trait::async_trait;
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use aws_sdk_s3::Client;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use sluice_core::metadata::SAVEPOINT_METADATA_FILE;
use sluice_core::storage::{dir_prefix, validate_dir, validate_path, Capabilities};
use sluice_core::{BoxError, CheckpointStorage, Error, FileListing, Result};

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

/// Whether a failed request may have changed the store. Reads (GET, HEAD,
/// List) never do; writes (PUT, CompleteMultipartUpload, DeleteObject(s))
/// may, unless the failure proves they were not processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    /// GET, HEAD, List: a failure is always determinate.
    Read,
    /// PUT, CompleteMultipartUpload, DeleteObject(s): a failure is
    /// determinate only if the request certainly had no effect.
    Write,
}

/// A failed S3 request: a one-line hint for people (bucket, endpoint, S3
/// error code, HTTP status, what to check; never credentials) over the
/// SDK's error, which stays reachable as the [`source`](std::error::Error::source).
#[derive(Debug)]
struct S3Failure {
    message: String,
    source: BoxError,
}

impl std::fmt::Display for S3Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for S3Failure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.source.as_ref())
    }
}

/// Where the failed request went, for the messages.
struct Target<'a> {
    bucket: &'a str,
    endpoint: &'a str,
}

/// The hint for an endpoint that cannot be reached.
const CHECK_ENDPOINT: &str =
    "check the endpoint (--s3-endpoint or AWS_ENDPOINT_URL) and that the server is up";

/// How an S3 error maps to Sluice's, in the caller's terms.
///
/// Determinate (`Storage`, `NotFound`, `AlreadyExists`, `Corrupt`): every
/// failure of a read; for a write, only what certainly had no effect — a
/// request the store answered with a 3xx or 4xx (rejected credentials,
/// validation, precondition: not processed), one that could not be built
/// (never sent), or one without usable credentials (never signed, never
/// sent). `Indeterminate`: a write that timed out, failed in dispatch (the
/// request may have been sent), got a 5xx (incl. 503 SlowDown after the
/// retries) or an unreadable response.
///
/// The source of `Storage` / `Indeterminate` is an [`S3Failure`] whose
/// source is the `SdkError`. Never includes credentials: only the bucket,
/// the endpoint, the object and S3's error code.
fn classify<E>(target: &Target<'_>, request: Request, what: &str, e: SdkError<E, HttpResponse>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let Target { bucket, endpoint } = *target;
    tracing::debug!(
        "S3 {what} in s3://{bucket} at {endpoint} failed: {}",
        DisplayErrorContext(&e)
    );
    let at = format!("{what} in s3://{bucket} at {endpoint}");
    let effect = "the request may or may not have taken effect: read back before deciding";
    let storage = |message: String, e: SdkError<E, HttpResponse>| Error::Storage {
        what: at.clone(),
        source: Box::new(S3Failure {
            message,
            source: Box::new(e),
        }),
    };
    let maybe = |message: String, e: SdkError<E, HttpResponse>| match request {
        Request::Read => storage(message, e),
        Request::Write => Error::Indeterminate {
            what: at.clone(),
            source: Box::new(S3Failure {
                message: format!("{message}; {effect}"),
                source: Box::new(e),
            }),
        },
    };
    if let SdkError::ServiceError(se) = &e {
        let status = se.raw().status().as_u16();
        let code = se.err().code().unwrap_or("").to_string();
        let s3_message = se.err().message().unwrap_or("").to_string();
        let label = if code.is_empty() {
            format!("HTTP {status}")
        } else {
            format!("{code}, HTTP {status}")
        };
        return match (code.as_str(), status) {
            ("NoSuchBucket", _) => Error::NotFound {
                what: format!("bucket {bucket} at {endpoint} (create it, or check the bucket name)"),
            },
            ("NoSuchKey", _) | ("NotFound", _) | (_, 404) => {
                Error::not_found(format!("{what} in s3://{bucket}"))
            }
            ("PreconditionFailed", _) | (_, 412) => Error::AlreadyExists {
                what: format!("{what} in s3://{bucket}"),
            },
            ("InvalidRange", _) | (_, 416) => {
                Error::corrupt(what, "the object is shorter than the range read (truncated?)")
            }
            ("InvalidAccessKeyId", _)
            | ("SignatureDoesNotMatch", _)
            | ("AccessDenied", _)
            | (_, 401)
            | (_, 403) => storage(
                format!(
                    "the endpoint rejected the credentials ({label}): check AWS_ACCESS_KEY_ID / \
                         AWS_SECRET_ACCESS_KEY or AWS_PROFILE, and the bucket's permissions"
                ),
                e,
            ),
            // Rejected before processing (3xx redirects, 4xx incl. 429): no effect.
            (_, 300..=499) => storage(
                if status == 429 || code == "SlowDown" || code == "Throttling" {
                    format!("throttled by S3 ({label}) after retries")
                } else {
                    format!("S3 refused the request ({label}): {s3_message}")
                },
                e,
            ),
            ("SlowDown", _) | (_, 503) => maybe(format!("throttled by S3 ({label}) after retries"), e),
            // 5xx, or an error inside a 200 (CompleteMultipartUpload).
            _ => maybe(format!("S3 failed ({label}): {s3_message}"), e),
        };
    }
    match &e {
        SdkError::ConstructionFailure(_) => {
            let cause = root_cause(&e).unwrap_or_default();
            storage(format!("the request could not be built, so it was not sent: {cause}"), e)
        }
        SdkError::DispatchFailure(_) if credentials_failed(&e) => storage(
            format!(
                "no usable AWS credentials for s3://{bucket}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, \
                 or AWS_PROFILE (a profile in ~/.aws/config), or run with an instance or container role"
            ),
            e,
        ),
        SdkError::TimeoutError(_) => maybe(format!("timed out; {CHECK_ENDPOINT}"), e),
        SdkError::DispatchFailure(_) => {
            let message = match root_cause(&e) {
                Some(cause) => format!("cannot reach the endpoint: {cause}; {CHECK_ENDPOINT}"),
                None => format!("cannot reach the endpoint; {CHECK_ENDPOINT}"),
            };
            maybe(message, e)
        }
        SdkError::ResponseError(_) => maybe(format!("the response of {endpoint} could not be read"), e),
        _ => maybe("the request failed".into(), e),
    }
}

/// Whether the request failed because no credentials could be resolved (it
/// was then never signed nor sent).
fn credentials_failed(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        if err.is::<CredentialsError>() {
            return true;
        }
        next = err.source();
    }
    false
}

/// The innermost cause of `e` (e.g. "Connection refused (os error 111)"),
/// if it is short enough for a one-line message.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let (mut last, mut depth) = (e, 0);
    while let Some(next) = last.source() {
        (last, depth) = (next, depth + 1);
    }
    let text = last.to_string();
    (depth > 0 && !text.is_empty() && !text.contains('\n') && text.len() <= 120).then_some(text)
}

/// A determinate failure. Used where a failed write changes nothing anyone
/// reads: the probe at open, the creation and the parts of a multipart
/// upload (only its completion makes the object exist), and aborts of
/// unfinished uploads.
fn determinate(e: Error) -> Error {
    match e {
        Error::Indeterminate { what, source } => Error::Storage { what, source },
        other => other,
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
        req.send()
            .await
            .map(|_| ())
            .map_err(|e| map_sdk(self, Request::Write, what, e))
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
            // An upload that is not completed is invisible (and aborted
            // below or by `discard`): determinate.
            .map_err(|e| determinate(map_sdk(self, Request::Write, what, e)))?;
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
                        // A part has no visible effect; only the completion does.
                        .map_err(|e| {
                            determinate(map_sdk(self, Request::Write, &format!("{what} part {number}"), e))
                        })?;
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
                    .map_err(|e| map_sdk(self, Request::Write, what, e))
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
                    map_sdk(self, Request::Write, what, e)
                );
            }
        }
        result
    }

    /// A ranged GET (a HEAD for an empty range, to check the length).
    async fn get_range(&self, path: &str, range: Range<u64>) -> Result<Bytes> {
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
                .map_err(|e| map_sdk(self, Request::Read, path, e))?;
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
            .map_err(|e| map_sdk(self, Request::Read, path, e))?;
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
            let page = page.map_err(|e| map_sdk(self, Request::Read, "listing", e))?;
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
        self.check_writable(prefix)?;
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
                .map_err(|e| map_sdk(self, Request::Read, "listing multipart uploads", e))?;
            for u in out.uploads() {
                if let (Some(key), Some(id)) = (u.key(), u.upload_id()) {
                    self.client
                        .abort_multipart_upload()
                        .bucket(&self.config.bucket)
                        .key(key)
                        .upload_id(id)
                        .send()
                        .await
                        // Aborting an unfinished upload changes no object.
                        .map_err(|e| determinate(map_sdk(self, Request::Write, key, e)))?;
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
                .map_err(|e| map_sdk(self, Request::Write, what, e))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_s3::error::{ConnectorError, ErrorMetadata};
    use aws_sdk_s3::operation::put_object::PutObjectError;
    use aws_sdk_s3::primitives::SdkBody;
    use std::error::Error as _;

    type PutError = SdkError<PutObjectError, HttpResponse>;
    /// Makes one failure of a test case.
    type Make = fn() -> PutError;

    const TARGET: Target<'static> = Target {
        bucket: "jobs",
        endpoint: "http://127.0.0.1:3900",
    };

    fn service(status: u16, code: &str) -> PutError {
        let err = PutObjectError::generic(ErrorMetadata::builder().code(code).message("said S3").build());
        let raw = HttpResponse::new(status.try_into().expect("a valid status"), SdkBody::empty());
        SdkError::service_error(err, raw)
    }

    fn refused() -> PutError {
        let io = std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused (os error 111)",
        );
        SdkError::dispatch_failure(ConnectorError::io(Box::new(io)))
    }

    fn timed_out() -> PutError {
        SdkError::timeout_error("operation timeout (all attempts including retries) occurred after 4s")
    }

    fn no_credentials() -> PutError {
        let cause = CredentialsError::not_loaded("no credentials found in chain");
        SdkError::dispatch_failure(ConnectorError::other(Box::new(cause), None))
    }

    fn unreadable() -> PutError {
        let raw = HttpResponse::new(200.try_into().expect("a valid status"), SdkBody::empty());
        SdkError::response_error("the body is not XML", raw)
    }

    fn never_built() -> PutError {
        SdkError::construction_failure("the key is missing")
    }

    fn kind(e: &Error) -> &'static str {
        match e {
            Error::Storage { .. } => "storage",
            Error::Indeterminate { .. } => "indeterminate",
            Error::AlreadyExists { .. } => "already exists",
            Error::NotFound { .. } => "not found",
            Error::Corrupt { .. } => "corrupt",
            _ => "other",
        }
    }

    /// Whether the error's source chain reaches an `SdkError`.
    fn chain_reaches_the_sdk_error(e: &Error) -> bool {
        let mut next = e.source();
        while let Some(err) = next {
            if err.is::<PutError>() {
                return true;
            }
            next = err.source();
        }
        false
    }

    #[test]
    fn write_failures_are_determinate_only_when_the_request_certainly_had_no_effect() {
        let cases: Vec<(&str, Make, &str)> = vec![
            (
                "HTTP 403 AccessDenied",
                || service(403, "AccessDenied"),
                "storage",
            ),
            (
                "HTTP 403 SignatureDoesNotMatch",
                || service(403, "SignatureDoesNotMatch"),
                "storage",
            ),
            (
                "HTTP 403 InvalidAccessKeyId",
                || service(403, "InvalidAccessKeyId"),
                "storage",
            ),
            ("HTTP 401", || service(401, ""), "storage"),
            (
                "HTTP 400 InvalidArgument",
                || service(400, "InvalidArgument"),
                "storage",
            ),
            (
                "HTTP 409 conflict",
                || service(409, "ConditionalRequestConflict"),
                "storage",
            ),
            ("HTTP 429", || service(429, "TooManyRequests"), "storage"),
            (
                "HTTP 301 redirect",
                || service(301, "PermanentRedirect"),
                "storage",
            ),
            (
                "HTTP 412",
                || service(412, "PreconditionFailed"),
                "already exists",
            ),
            ("HTTP 404", || service(404, "NoSuchKey"), "not found"),
            ("NoSuchBucket", || service(404, "NoSuchBucket"), "not found"),
            ("never built", never_built, "storage"),
            ("no credentials", no_credentials, "storage"),
            ("HTTP 500", || service(500, "InternalError"), "indeterminate"),
            ("HTTP 503 SlowDown", || service(503, "SlowDown"), "indeterminate"),
            (
                "an error in a 200",
                || service(200, "InternalError"),
                "indeterminate",
            ),
            ("timeout", timed_out, "indeterminate"),
            ("connection refused", refused, "indeterminate"),
            ("unreadable response", unreadable, "indeterminate"),
        ];
        for (name, make, expected) in cases {
            let e = classify(&TARGET, Request::Write, "chk-1/_metadata", make());
            assert_eq!(kind(&e), expected, "{name}: {e}");
        }
    }

    #[test]
    fn read_failures_are_always_determinate() {
        let cases: Vec<(&str, Make)> = vec![
            ("HTTP 500", || service(500, "InternalError")),
            ("HTTP 503 SlowDown", || service(503, "SlowDown")),
            ("timeout", timed_out),
            ("connection refused", refused),
            ("unreadable response", unreadable),
            ("HTTP 403", || service(403, "AccessDenied")),
        ];
        for (name, make) in cases {
            let e = classify(&TARGET, Request::Read, "chk-1/_metadata", make());
            assert_eq!(kind(&e), "storage", "{name}: {e}");
        }
        assert_eq!(
            kind(&classify(
                &TARGET,
                Request::Read,
                "x",
                service(416, "InvalidRange")
            )),
            "corrupt"
        );
    }

    #[test]
    fn storage_and_indeterminate_errors_keep_the_sdk_error_in_their_source_chain() {
        let makers: [Make; 6] = [
            || service(500, "InternalError"),
            || service(403, "AccessDenied"),
            timed_out,
            refused,
            no_credentials,
            unreadable,
        ];
        for request in [Request::Read, Request::Write] {
            for make in makers {
                let e = classify(&TARGET, request, "chk-1/_metadata", make());
                assert!(
                    matches!(e, Error::Storage { .. } | Error::Indeterminate { .. }),
                    "{e}"
                );
                assert!(
                    chain_reaches_the_sdk_error(&e),
                    "{request:?} {e}: the source chain lost the SdkError"
                );
            }
        }
    }

    #[test]
    fn messages_are_one_line_and_name_the_bucket_the_endpoint_and_what_to_check() {
        let e = classify(&TARGET, Request::Write, "chk-1/_metadata", refused());
        let text = e.to_string();
        assert!(!text.contains('\n'), "{text}");
        for needle in [
            "s3://jobs",
            "http://127.0.0.1:3900",
            "Connection refused",
            "--s3-endpoint",
            "AWS_ENDPOINT_URL",
            "may or may not have taken effect",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from: {text}");
        }
        let text = classify(&TARGET, Request::Read, "bucket check", no_credentials()).to_string();
        assert!(!text.contains('\n'), "{text}");
        for needle in [
            "no usable AWS credentials",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_PROFILE",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from: {text}");
        }
        assert!(
            !text.contains("no credentials found in chain"),
            "the chain belongs in the source: {text}"
        );
        let text = classify(
            &TARGET,
            Request::Write,
            "chk-1/_metadata",
            service(403, "AccessDenied"),
        )
        .to_string();
        assert!(
            text.contains("AccessDenied") && text.contains("HTTP 403") && text.contains("AWS_ACCESS_KEY_ID"),
            "{text}"
        );
        let text = classify(
            &TARGET,
            Request::Write,
            "chk-1/_metadata",
            service(503, "SlowDown"),
        )
        .to_string();
        assert!(text.contains("SlowDown") && text.contains("HTTP 503"), "{text}");
    }
}

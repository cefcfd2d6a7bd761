//! The object operations under the storage: create-if-absent PUTs (one
//! conditional PUT, or HEAD then PUT where the store ignores
//! `If-None-Match`), parallel multipart uploads (aborted on failure),
//! ranged GETs, paginated listing, batched deletion and the cleanup of
//! unfinished multipart uploads.

use crate::errors::{determinate, Request};
use crate::{map_sdk, S3CheckpointStorage};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use sluice_core::{Error, Result};
use std::ops::Range;
use tracing::warn;

impl S3CheckpointStorage {
    /// Create-if-absent PUT of one object.
    pub(crate) async fn put_new(&self, key: &str, data: Bytes, what: &str) -> Result<()> {
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

    /// A create-if-absent upload of `data` in parts of `part_size`, several
    /// in flight.
    pub(crate) async fn multipart(&self, key: &str, data: Bytes, what: &str) -> Result<()> {
        let upload_id = self.create_upload(key, what).await?;
        let part_size = self.config.part_size.max(5 << 20);
        let ranges: Vec<(i32, Range<usize>)> = (0..data.len())
            .step_by(part_size)
            .enumerate()
            .map(|(i, start)| (i as i32 + 1, start..(start + part_size).min(data.len())))
            .collect();
        let uploads = futures::stream::iter(ranges)
            .map(|(number, range)| self.upload_part(key, &upload_id, number, data.slice(range), what))
            .buffer_unordered(self.config.upload_concurrency.max(1))
            .try_collect::<Vec<_>>()
            .await;
        let result = match uploads {
            Ok(parts) => self.complete_upload(key, &upload_id, parts, what).await,
            Err(e) => Err(e),
        };
        if result.is_err() {
            self.abort_upload(key, &upload_id, what).await;
        }
        result
    }

    /// Starts a multipart upload of `key`, after checking it does not exist
    /// (the completion is conditional too where the store honours it).
    pub(crate) async fn create_upload(&self, key: &str, what: &str) -> Result<String> {
        if self.exists(key, what).await? {
            return Err(Error::AlreadyExists {
                what: format!("{what} in s3://{}", self.config.bucket),
            });
        }
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.config.bucket)
            .key(key)
            .send()
            .await
            // An upload that is not completed is invisible (and aborted
            // below or by `discard`): determinate.
            .map_err(|e| determinate(map_sdk(self, Request::Write, what, e)))?;
        Ok(created
            .upload_id()
            .ok_or_else(|| Error::storage(what, "the store returned no multipart upload id"))?
            .to_string())
    }

    /// Uploads part `number` of upload `upload_id`.
    pub(crate) async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
        what: &str,
    ) -> Result<CompletedPart> {
        let out = self
            .client
            .upload_part()
            .bucket(&self.config.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .body(ByteStream::from(body))
            .send()
            .await
            // A part has no visible effect; only the completion does.
            .map_err(|e| determinate(map_sdk(self, Request::Write, &format!("{what} part {number}"), e)))?;
        Ok(CompletedPart::builder()
            .part_number(number)
            .set_e_tag(out.e_tag)
            .build())
    }

    /// Completes upload `upload_id` from its parts (create-if-absent where
    /// the store honours `If-None-Match`).
    pub(crate) async fn complete_upload(
        &self,
        key: &str,
        upload_id: &str,
        mut parts: Vec<CompletedPart>,
        what: &str,
    ) -> Result<()> {
        parts.sort_by_key(|p| p.part_number());
        let mut complete = self
            .client
            .complete_multipart_upload()
            .bucket(&self.config.bucket)
            .key(key)
            .upload_id(upload_id)
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

    /// Aborts upload `upload_id` (a failure is logged: the clean-up of
    /// unfinished uploads at the next start takes it).
    pub(crate) async fn abort_upload(&self, key: &str, upload_id: &str, what: &str) {
        if let Err(e) = self
            .client
            .abort_multipart_upload()
            .bucket(&self.config.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
        {
            warn!(
                "could not abort the multipart upload of {what}: {}",
                map_sdk(self, Request::Write, what, e)
            );
        }
    }

    /// A ranged GET (a HEAD for an empty range, to check the length).
    pub(crate) async fn get_range(&self, path: &str, range: Range<u64>) -> Result<Bytes> {
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
    pub(crate) async fn list_keys(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .list_objects(prefix)
            .await?
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }

    /// Every object (key, size) under `prefix`, with pagination.
    pub(crate) async fn list_objects(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
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

    pub(crate) async fn delete_keys(&self, keys: Vec<String>, what: &str) -> Result<()> {
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

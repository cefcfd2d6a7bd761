//! A state file written in parts ([`CheckpointStorage::upload`]): buffered
//! up to one part (`S3Config::part_size`), then a multipart upload with a
//! part at a time; a file smaller than a part is one create-if-absent PUT.
//!
//! [`CheckpointStorage::upload`]: sluice_core::CheckpointStorage::upload

use crate::S3CheckpointStorage;
use async_trait::async_trait;
use aws_sdk_s3::types::CompletedPart;
use bytes::{Bytes, BytesMut};
use sluice_core::{FileUpload, Result};

/// An upload in progress. Dropped unfinished, its multipart upload (if
/// one was started) is aborted in the background, or by the clean-up of
/// unfinished uploads when the storage is next opened.
pub(crate) struct S3Upload<'a> {
    storage: &'a S3CheckpointStorage,
    key: String,
    path: String,
    pending: BytesMut,
    upload_id: Option<String>,
    parts: Vec<CompletedPart>,
}

impl<'a> S3Upload<'a> {
    pub(crate) fn new(storage: &'a S3CheckpointStorage, key: String, path: String) -> Self {
        S3Upload {
            storage,
            key,
            path,
            pending: BytesMut::new(),
            upload_id: None,
            parts: Vec::new(),
        }
    }

    fn part_size(&self) -> usize {
        self.storage.config.part_size.max(5 << 20)
    }

    /// Uploads the pending bytes as the next part (starting the multipart
    /// upload first if needed); on failure the upload is aborted.
    async fn flush_part(&mut self) -> Result<()> {
        let id = match &self.upload_id {
            Some(id) => id.clone(),
            None => {
                let id = self.storage.create_upload(&self.key, &self.path).await?;
                self.upload_id = Some(id.clone());
                id
            }
        };
        let body = self.pending.split().freeze();
        let number = self.parts.len() as i32 + 1;
        match self
            .storage
            .upload_part(&self.key, &id, number, body, &self.path)
            .await
        {
            Ok(part) => {
                self.parts.push(part);
                Ok(())
            }
            Err(e) => {
                self.upload_id = None;
                self.storage.abort_upload(&self.key, &id, &self.path).await;
                Err(e)
            }
        }
    }
}

#[async_trait]
impl FileUpload for S3Upload<'_> {
    async fn put(&mut self, data: Bytes) -> Result<()> {
        self.pending.extend_from_slice(&data);
        if self.pending.len() >= self.part_size() {
            self.flush_part().await?;
        }
        Ok(())
    }

    async fn complete(mut self: Box<Self>) -> Result<()> {
        if self.upload_id.is_none() && self.pending.len() < self.part_size() {
            let data = self.pending.split().freeze();
            return self.storage.put_new(&self.key, data, &self.path).await;
        }
        if !self.pending.is_empty() {
            self.flush_part().await?;
        }
        let Some(id) = self.upload_id.take() else {
            return Ok(());
        };
        let parts = std::mem::take(&mut self.parts);
        let result = self
            .storage
            .complete_upload(&self.key, &id, parts, &self.path)
            .await;
        if result.is_err() {
            self.storage.abort_upload(&self.key, &id, &self.path).await;
        }
        result
    }
}

impl Drop for S3Upload<'_> {
    fn drop(&mut self) {
        let Some(id) = self.upload_id.take() else { return };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (client, bucket, key) = (
            self.storage.client.clone(),
            self.storage.config.bucket.clone(),
            self.key.clone(),
        );
        rt.spawn(async move {
            let _ = client
                .abort_multipart_upload()
                .bucket(bucket)
                .key(key)
                .upload_id(id)
                .send()
                .await;
        });
    }
}

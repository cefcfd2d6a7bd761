//! # sluice-backend-s3
//!
//! **Not implemented yet.** This crate will hold `S3CheckpointStorage`, a
//! checkpoint storage on Amazon S3 and S3-compatible stores through
//! `aws-sdk-s3`; see the issue "S3 checkpoint storage". It deliberately
//! exports nothing today.
#![warn(missing_docs)]

//! Benchmarks of Sluice: the end-to-end benchmark's runs ([`e2e`]) and
//! report ([`report`]), incremental against full checkpoints
//! ([`incremental`]), state larger than memory ([`large`]); the binaries `e2e`, `keyed_sum`, `s3_storage`,
//! `backpressure` and the criterion bench `backends` use them.

pub mod e2e;
pub mod incremental;
pub mod large;
pub mod report;

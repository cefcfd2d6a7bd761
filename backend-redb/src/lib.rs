//! # sluice-backend-redb
//!
//! **Not implemented yet.** This crate will hold Sluice's embedded on-disk
//! state backend (larger-than-memory keyed state in a redb file) and a
//! checkpoint storage in a local redb file; see the issue "Embedded redb
//! backend". It deliberately exports nothing today, so nothing can depend on
//! a backend that does not work.
#![warn(missing_docs)]

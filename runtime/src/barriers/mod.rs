//! Barriers at a task with inputs: the alignment rules
//! ([`handler::BarrierHandler`], a pure state machine with exhaustive
//! ordering tests) and the bookkeeping around them
//! ([`tracker::Barriers`]: recording channel state, spilling).

pub(crate) mod handler;
pub(crate) mod tracker;

//! Conformance tests (to be written).

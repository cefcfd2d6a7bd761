//! Benchmarks of Sluice.

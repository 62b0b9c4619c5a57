//! Benchmarks for Drover (see BENCHMARKS.md); filled in by the fleet benchmark.

fn main() {}

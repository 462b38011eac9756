"""The benchmarks: one module per dataset kind, each turning its raw files into the common tables."""

"""Tools for kernel developers and operators: inspection, profiling, benchmarks."""

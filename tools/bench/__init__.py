"""Benchmarks: compare against a peer on the same machine in the same run and print ratios."""

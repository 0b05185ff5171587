"""Measured comparisons with peers; each bench_*.py prints ratios measured side by side in one run."""

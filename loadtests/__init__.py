"""Load tests and benchmarks: ``python -m loadtests.bench`` (``make bench``), see docs/benchmarks.md."""

"""The benchmark harness on a tiny load, so it cannot rot (bench/test_bench_smoke.py)."""

from bench.test_bench_smoke import test_bench_smoke, test_drain_smoke, test_inprocess_smoke  # noqa: F401

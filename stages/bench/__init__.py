"""Benchmark internals: workload and measurement loop, the torch decode engine, the vLLM worker."""

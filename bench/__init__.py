"""Benchmarks: python bench/run.py (service), bench/model_bench.py (model), bench/profile_service.py."""

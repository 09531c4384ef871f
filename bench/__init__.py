"""Benchmarks: the serving benchmark (`python -m bench`) and helpers."""

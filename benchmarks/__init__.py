"""Benchmarks of accum_jax against the other ways to accumulate gradients.

Run ``python -m benchmarks.run --help``. The models are in
:mod:`benchmarks.models`, the compared train steps in
:mod:`benchmarks.contenders`.
"""

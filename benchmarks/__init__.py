"""Benchmarks of baichuan_kernels (DESIGN.md §4): ``python -m benchmarks [op ...] --device cpu|cuda``.

One ``bench_<op>.py`` per op (providers, Baichuan 2 shapes, traffic model), the shared machinery in
``common.py``, committed results under ``results/`` and the README table from ``report.py``.
"""

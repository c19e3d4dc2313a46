"""Benchmarks for trio_observer: ``python benchmarks/run.py`` prints the table.

Not a test suite: nothing here asserts a timing. See ``docs/performance.md``.
"""

"""Synthetic backtest runs, for the demo, the tests and the benchmarks.

``seed`` (a deterministic, columnar generator of ``backtest_runs`` rows,
written to a store), ``campaigns`` (labelled research campaigns: config
families tried across environments), ``shapes`` (labelled runs shaped as
other teams' runs are, the reference's catalog among them) and ``demo``
(``metabatch demo``: the whole pipeline on an embedded DuckDB file).
"""

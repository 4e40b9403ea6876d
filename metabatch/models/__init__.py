"""Joint models: the registry, model files, fitting, and the encoders.

``registry`` (the ``joint_models`` table: ``fit``, ``registered``,
``list_models``, ``encoder_for``), ``modelfile`` (TOML model files),
``fitting`` (a v2 model's parameters from a sample of runs), ``branches``
(which paths and metrics say what was tried, where, and how it went, learnt
from the runs), ``groups`` (a sample's features in groups, and their
weights), ``explain`` (``models --explain``), ``kmeans``, and ``encoders/``:
v1 (the spec's, bit-exact) and v2 (fitted) behind one small interface,
``encoders/base.py``.

The registry's names are importable from here (``from metabatch.models
import fit``). They load on first use, so that importing an encoder does not
import the registry and its stores.
"""

from __future__ import annotations

import importlib


def __getattr__(name):
    # import_module, not `from . import registry`: that would ask this function for `registry`
    if not name.startswith("_"):
        registry = importlib.import_module(f"{__name__}.registry")
        if hasattr(registry, name):
            return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

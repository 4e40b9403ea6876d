"""Models: the registry of fitted models (``joint_models``) and the fit job.

- ``fit(runtime_url, historical_url, model_id, spec, selection)`` streams the
  selected runs, draws the fit's sample (``fit.RunSample``), fits a v2 model
  (``fit.fit_model``) and registers it; returns a ``FitSummary``. A registered
  id is never changed silently: ``refit=True`` replaces it and deletes its
  embeddings in the same transaction (they belong to the old fit).
- ``registered(url, model_id)`` / ``list_models(url)``: what the registry holds.
- ``encoder_for(...)``: the encoder a backfill uses for a model id: the
  registered one, else v1 (bit-exact with the spec), except the built-in
  ``joint-meta-config-env-v2``, fitted with the defaults on first use.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Callable

from ..pipeline.embed import DEFAULT_MODEL_ID, JOINT_TYPE, Weights
from .encoders.v1 import V1Encoder
from .encoders.v2 import V2Encoder, V2Model
from ..errors import BadInput, MetabatchError
from .explain import branch_summary
from .fitting import SAMPLE_RUNS, FitOptions, RunSample, fit_model
from .modelfile import BRANCHES, ModelSpec, parse_model_file
from ..stores import open_store
from ..stores.base import RunSelection
from ..urls import DatabaseURL

BUILTIN_V2 = "joint-meta-config-env-v2"
MAX_MODEL_ID = 64  # joint_embeddings.model_id is varchar(64)


@dataclass
class RegisteredModel:
    """A joint_models row."""

    model_id: str
    encoder: str
    model_file: str
    params: dict
    fitted_runs: int
    selection: dict
    fitted_at: dt.datetime | None
    content_hash: str
    _v2: V2Model | None = field(default=None, repr=False)

    @classmethod
    def from_row(cls, row: dict) -> "RegisteredModel":
        return cls(**{k: row[k] for k in ("model_id", "encoder", "model_file", "params", "fitted_runs", "selection", "fitted_at", "content_hash")})

    def as_row(self) -> dict:
        return {
            "model_id": self.model_id, "encoder": self.encoder, "model_file": self.model_file, "params": self.params,
            "fitted_runs": self.fitted_runs, "selection": self.selection, "content_hash": self.content_hash,
            "fitted_at": self.fitted_at.isoformat() if self.fitted_at else None,
        }

    def v2(self) -> V2Model:
        """The fitted v2 model (BadInput naming v2 when this one is v1)."""
        if self.encoder != "v2":
            raise BadInput(f"model `{self.model_id}` is a {self.encoder} model: this needs a v2 model", "fit one with `metabatch fit`")
        if self._v2 is None:
            self._v2 = V2Model.from_params(self.params)
        return self._v2

    @property
    def slices(self) -> dict[str, tuple[int, int]]:
        return self.v2().slices

    def encoder_for(self) -> V1Encoder | V2Encoder:
        if self.encoder == "v1":
            return V1Encoder(Weights(**self.params["weights"]), self.model_id)
        return V2Encoder(self.v2(), self.model_id)


def content_hash(encoder: str, model_file: str, params: dict) -> str:
    """SHA-256 of the model's encoder, file and parameters as canonical JSON."""
    text = json.dumps({"encoder": encoder, "model_file": model_file, "params": params}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_model_id(model_id: str) -> None:
    if not isinstance(model_id, str) or not model_id or len(model_id) > MAX_MODEL_ID:
        raise BadInput(f"a model id must be 1 to {MAX_MODEL_ID} characters, got {model_id!r}")


def registered(historical_url: DatabaseURL, model_id: str) -> RegisteredModel | None:
    """The registered model ``model_id``, or None (a v1 id, or no registry yet)."""
    store = open_store(historical_url, read_only=historical_url.scheme == "duckdb")
    try:
        row = store.read_model(model_id)
    finally:
        store.close()
    return RegisteredModel.from_row(row) if row else None


def list_models(historical_url: DatabaseURL) -> list[dict]:
    """Every registered model, by id: its row without the parameters, plus their size."""
    store = open_store(historical_url, read_only=historical_url.scheme == "duckdb")
    try:
        store.check_table("joint_embeddings")
        return store.list_models()
    finally:
        store.close()


# --------------------------------------------------------------------------
# fit


@dataclass
class FitSummary:
    model_id: str
    encoder: str
    runs_read: int = 0
    sample_runs: int = 0
    paths: dict[str, int] = field(default_factory=dict)  # branch -> paths in it
    branches: dict[str, list[str]] = field(default_factory=dict)  # branch -> its weightiest paths (explain.branch_summary)
    ignored_paths: int = 0
    reliability: dict[str, float] = field(default_factory=dict)  # branch -> fitted reliability (v2: outcome)
    embeddings_deleted: int = 0
    refit: bool = False
    content_hash: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "model_id": self.model_id, "encoder": self.encoder, "runs_read": self.runs_read,
            "sample_runs": self.sample_runs, "paths": self.paths, "branches": self.branches, "ignored_paths": self.ignored_paths,
            "reliability": {b: round(r, 4) for b, r in self.reliability.items()},
            "embeddings_deleted": self.embeddings_deleted, "refit": self.refit,
            "content_hash": self.content_hash, "seconds": round(self.seconds, 3),
        }


def fit(
    runtime_url: DatabaseURL,
    historical_url: DatabaseURL | None = None,
    model_id: str = BUILTIN_V2,
    spec: ModelSpec | None = None,
    selection: RunSelection = RunSelection(),
    refit: bool = False,
    batch_rows: int = 25_000,
    sample_runs: int = SAMPLE_RUNS,
    on_progress: Callable[[int, int | None], None] | None = None,
    options: FitOptions = FitOptions(),
    draw: Callable[..., RunSample] | None = None,
) -> FitSummary:
    """Fit ``spec`` (the defaults when None) on the selected runs and register it
    as ``model_id``; see the module docstring. ``options``: the fit's choices
    (``fit.FitOptions``; the retrieval benchmark compares them). ``draw``: how
    the sample is drawn (``draw_sample``'s arguments; ``distributed`` draws it
    shard by shard on a Ray cluster)."""
    started = time.perf_counter()
    historical_url = historical_url or runtime_url
    spec = spec or ModelSpec()
    check_model_id(model_id)
    summary = FitSummary(model_id, spec.encoder, refit=refit)
    history = open_store(historical_url)
    try:
        history.check_table("joint_embeddings")
        history.check_table("joint_models")
        existing = history.read_model(model_id)
        if existing is not None and not refit:
            raise MetabatchError(
                f"model `{model_id}` is already fitted ({existing['encoder']}, on {existing['fitted_runs']:,} runs,"
                f" {_when(existing['fitted_at'])}); a fitted model is never changed",
                "choose another --joint-model-id, or pass --refit to replace it and delete its embeddings",
            )
        if existing is None and not refit:
            written = history.count_embeddings(JOINT_TYPE, model_id)
            if written:
                raise MetabatchError(
                    f"model id `{model_id}` already has {written:,} embeddings (written as v1); a fit would change what they mean",
                    "choose another --joint-model-id, or pass --refit to delete them",
                )
        if spec.encoder == "v1":
            params = {"encoder": "v1", "weights": dict(spec.weights)}
        else:
            sample = (draw or draw_sample)(runtime_url, selection, batch_rows, sample_runs, on_progress)
            if not sample.runs:
                raise BadInput("no runs selected to fit on (runs need metrics_json; check --strategy-id, --start, --end)")
            model = fit_model(sample.table(), spec, sample.runs, options=options)
            params = model.params()
            summary.runs_read, summary.sample_runs, summary.ignored_paths = sample.runs, model.sample_runs, model.ignored_paths
            summary.reliability = dict(model.reliability)
            every = [*model.config_paths.values(), *model.metric_paths.values(), *model.window_paths.values()]
            summary.paths = {b: sum(1 for m in every if m.branch == b) for b in BRANCHES}
            summary.branches = branch_summary(model)
        model_file = spec.text or default_model_file(spec)
        row = {
            "model_id": model_id, "encoder": spec.encoder, "model_file": model_file, "params": params,
            "fitted_runs": summary.runs_read, "selection": selection_dict(selection),
            "content_hash": content_hash(spec.encoder, model_file, params),
        }
        summary.embeddings_deleted = history.save_model(row, JOINT_TYPE, replace=refit)
        summary.content_hash = row["content_hash"]
    finally:
        history.close()
    summary.seconds = time.perf_counter() - started
    return summary


def draw_sample(
    runtime_url: DatabaseURL,
    selection: RunSelection,
    batch_rows: int = 25_000,
    sample_runs: int = SAMPLE_RUNS,
    on_progress: Callable[[int, int | None], None] | None = None,
    count_total: bool = True,
) -> RunSample:
    """The fit's sample (``fit.RunSample``) of the selected runs, streamed from the
    runtime store. ``on_progress(runs_read, total)``; the total is counted first
    unless ``count_total`` is False."""
    from ..pipeline.read import read_runs

    sample = RunSample(sample_runs)
    runs = open_store(runtime_url)
    try:
        runs.check_table("backtest_runs")
        total = runs.count_runs(selection) if on_progress and count_total else None
        for batch in read_runs(runs, selection, batch_rows):
            sample.add(batch)
            if on_progress:
                on_progress(sample.runs, total)
    finally:
        runs.close()
    return sample


def selection_dict(selection: RunSelection) -> dict:
    return {
        "strategy_ids": list(selection.strategy_ids),
        "start": selection.start.isoformat() if selection.start else None,
        "end": selection.end.isoformat() if selection.end else None,
        "limit": selection.limit,
    }


def default_model_file(spec: ModelSpec) -> str:
    """The model file that says what ``spec`` holds (for a fit without a file)."""
    def strings(values):
        return "[" + ", ".join(json.dumps(v) for v in values) + "]"

    return (
        f'encoder = "{spec.encoder}"\n[paths]\nignore = {strings(spec.ignore)}\nenv = {strings(spec.env)}\n'
        f"env_metrics = {strings(spec.env_metrics)}\n[weights]\n"
        + "".join(f"{b} = {spec.weights[b]}\n" for b in BRANCHES)
    )


def _when(value) -> str:
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M")
    return str(value or "")


# --------------------------------------------------------------------------
# the encoder of a backfill


def encoder_for(
    runtime_url: DatabaseURL,
    historical_url: DatabaseURL,
    model_id: str = DEFAULT_MODEL_ID,
    weights: Weights = Weights(),
    weights_given: bool = False,
    selection: RunSelection = RunSelection(),
    draw: Callable[..., RunSample] | None = None,
) -> tuple[V1Encoder | V2Encoder, FitSummary | None]:
    """The encoder for ``model_id`` and, when the built-in v2 id was fitted now,
    that fit's summary. ``weights`` apply to unregistered (v1) ids only:
    ``weights_given`` with a registered model is a usage error. ``draw``: as
    for ``fit``."""
    check_model_id(model_id)
    model = registered(historical_url, model_id)
    fitted = None
    if model is None and model_id == BUILTIN_V2:
        fitted = fit(runtime_url, historical_url, model_id, ModelSpec(), selection, draw=draw)
        model = registered(historical_url, model_id)
    if model is None:
        return V1Encoder(weights, model_id), None
    if weights_given:
        raise BadInput(
            f"--w-config/--w-env/--w-outcome cannot change the fitted model `{model_id}`: its weights are part of it",
            "set them in the model file's [weights] and fit a new model id",
        )
    return model.encoder_for(), fitted


__all__ = ["BUILTIN_V2", "RegisteredModel", "FitSummary", "fit", "registered", "list_models", "encoder_for", "parse_model_file"]

"""Branches: which paths say what was tried (config), where (env) or how it went
(outcome), learnt from the fit's sample.

``learn_branches(model, values, leaves, n, con, options)`` sets ``branch``,
``how`` ("learned" or "prior") and ``figures`` of every path of a format-2
``V2Model`` that the model file does not declare (``how`` "declared"): the
config paths, the metrics and the run's own window.

The design of experiments behind it: a campaign tries many configs in each
environment, so the environment is *crossed* with the configs, while an id
derived from the strategy is *nested* in them (its value follows the config).
And the environment is *measured*: the figures over the run (regime,
stability, coverage...) are the same for every config tried there.

1. **The configs' clusters** ``C``: k-means of the config slices, every
   undeclared config path in the config branch, with the config weights
   fitted twice (see ``fit``): families of configs.
2. **The metrics' clusters** ``M``: k-means of the metric slices (the
   undeclared metrics and the declared env ones), read two ways: as they
   are, and with each metric weighed 1 / the sum of its squared correlations
   with the others (what several metrics measure together, a run's returns,
   Sharpe and drawdown, then counts about once and cannot hide the
   environment's figures; but figures that follow the same markets are
   correlated too, so the first view stays).
3. **Keys** (config paths and window keys), per feature group: its *env
   evidence*, the share of its entropy that ``M`` explains (it goes with the
   measured figures: the better of the two views), and its *config share*, the share of ``C``'s entropy
   that it explains once its own dimensions are left out of ``C``'s
   distances (``Clusters.without``: does it follow the configs, or did it
   only shape the clusters?). A key whose evidence exceeds its config share
   by ``KEY_MARGIN`` is env: a market tried with many configs, a backtest
   window; an id derived from the strategy, a hyperparameter or a seed is
   not. Keys that are not env stay config (a noise key then weighs ~0 there);
   a window key that is not env gives nothing (branch "none").
4. **The environments** ``E``: k-means of the env keys' slices. A metric is
   env when the environments explain at least ``METRIC_BETWEEN`` of its
   variance (intraclass correlation over ``E``) and at least
   ``METRIC_CONSISTENT`` of what (config cluster, environment) cells explain:
   it follows the environment whatever was tried there. A metric that
   follows config and environment together (Sharpe), the config alone
   (turnover) or nothing (luck) is outcome.
5. Steps 2 to 4 once more, ``M`` now the clusters of the env metrics alone.

Where the runs cannot tell (no env key is found, or there are no metrics),
v1's names decide (``modelfile.PRIOR_ENV``, ``PRIOR_ENV_METRICS``; ``how``
"prior"). The figures of each decision are stored with the path (``models
--explain`` prints them).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .encoders.v2 import PathModel, V2Model, _joined, row_means
from .groups import Clusters, Group, explained, explaining, groups_of, intraclass, set_weights, zero_constant_groups
from .modelfile import PRIOR_ENV, PRIOR_ENV_METRICS, matches

# a key is env when its env evidence exceeds its config share by this much
KEY_MARGIN = 0.2
# a metric is env when environments explain at least this share of its variance ...
METRIC_BETWEEN = 0.3
# ... and at least this share of what (config cluster, environment) cells explain
METRIC_CONSISTENT = 0.7
# the probes: config slices as the model's, env slices wider than the model's (fewer collisions)
_PROBE_SLICES = {"config": (0, 256), "env": (256, 384), "outcome": (384, 384)}


def learn_branches(model: V2Model, values: tuple, leaves: tuple, n: int, con, options) -> np.ndarray | None:
    """Sets the branch of every undeclared path of ``model`` (see the module docstring).
    ``values``: (config, metrics, window) values by path; ``leaves``: the same as
    leaves. Returns the sample runs' environments (clusters of the env keys),
    None where none were found."""
    config_values, metric_values, window_values = values
    keys = {p: m for p, m in model.config_paths.items() if not m.how}
    windows = {p: m for p, m in model.window_paths.items() if not m.how}
    metrics = {p: m for p, m in model.metric_paths.items() if not m.how}
    if not (keys or windows or metrics):
        return None
    configs = _config_clusters(model, config_values, leaves, n, con, options.rounds) if n >= 20 else None
    if configs is None:
        _by_names(model, keys, windows, metrics)
        return None
    key_groups = {p: groups_of(p, m, config_values[p], n) for p, m in keys.items()}
    key_groups.update({p: groups_of(p, m, window_values[p], n) for p, m in windows.items()})
    declared_keys = [p for p, m in [*model.config_paths.items(), *model.window_paths.items()] if m.branch == "env" and m.how == "declared"]
    declared_metrics = [p for p, m in model.metric_paths.items() if m.branch == "env" and m.how == "declared"]
    measured = [*metrics, *declared_metrics]
    key_figures: dict[str, dict] = {}
    found = None  # (env keys, metric figures, env metrics) of the last round that found environments
    for round_ in range(2):
        if not measured:
            break
        # the metrics read two ways (the first round): as they are, and with what
        # several measure together counted once; a key's evidence is the better
        views = [_env_probe(model, measured)]
        if round_ == 0:
            views.append(_env_probe(model, measured, _decorrelated(model, measured, metric_values, n)))
        figures = [c.labels for c in (Clusters(view, "env", leaves, n, con) for view in views) if c.labels is not None]
        if not figures:
            break
        key_figures = {p: _key_figures(p, groups, figures, configs, n) for p, groups in key_groups.items()}
        env_keys = [p for p, f in key_figures.items() if f["config_share"] is not None and f["env_evidence"] - f["config_share"] >= KEY_MARGIN]
        if not env_keys and not declared_keys:
            break
        environments = Clusters(_env_probe(model, [*env_keys, *declared_keys]), "env", leaves, n, con)
        if environments.labels is None:
            break
        metric_figures = {p: _metric_figures(m, metric_values[p], environments.labels, configs.labels, n) for p, m in metrics.items()}
        env_metrics = [p for p, f in metric_figures.items() if _follows_environment(f)]
        found = (env_keys, metric_figures, env_metrics, environments.labels)
        measured = [*env_metrics, *declared_metrics]
    if found is None:
        _by_names(model, keys, windows, metrics, key_figures)
        return None
    env_keys, metric_figures, env_metrics, environments = found
    for p, m in keys.items():
        m.branch, m.how, m.figures = ("env" if p in env_keys else "config"), "learned", key_figures.get(p, {})
    for p, m in windows.items():
        m.branch, m.how, m.figures = ("env" if p in env_keys else "none"), "learned", key_figures.get(p, {})
    for p, m in metrics.items():
        m.branch, m.how, m.figures = ("env" if p in env_metrics else "outcome"), "learned", metric_figures.get(p, {})
    if options.weigh_config == "clusters":
        _keep_config_weights(configs.model, model)
    return environments


def _keep_config_weights(probe: V2Model, model: V2Model) -> None:
    """The config weights the configs' clusters gave, on the paths that stay config
    (the fit refines them once more without the env paths)."""
    for path, m in model.config_paths.items():
        fitted = probe.config_paths.get(path)
        if m.branch != "config" or fitted is None:
            continue
        m.present = fitted.present
        for kind in ("number", "length", "string", "date"):
            if getattr(m, kind) is not None and getattr(fitted, kind) is not None:
                getattr(m, kind).weight = getattr(fitted, kind).weight


def _config_clusters(model: V2Model, config_values: dict, leaves: tuple, n: int, con, rounds: int) -> Clusters | None:
    """The clusters of the config slices with every config path (declared env
    ones aside) in the config branch, weighted as the fit weighs config paths
    (``rounds`` times); None when too few runs have a config."""
    probe = V2Model({"config": 1.0, "env": 0.0, "outcome": 0.0}, {}, {}, model.patterns, slices=dict(_PROBE_SLICES), format=model.format)
    probe.config_paths = {p: _at_weight_one(m, "config") for p, m in model.config_paths.items() if m.branch == "config"}
    groups = [g for p, m in probe.config_paths.items() for g in groups_of(p, m, config_values[p], n)]
    zero_constant_groups(probe, groups)
    clusters = None
    for _ in range(max(1, rounds)):
        clusters = Clusters(probe, "config", leaves, n, con)
        if clusters.labels is None:
            return None
        set_weights(probe.config_paths, groups, explained(groups, clusters.labels, n))
    return clusters


def _env_probe(model: V2Model, paths: list[str], weights: dict[str, float] | None = None) -> V2Model:
    """A model that encodes only ``paths`` (config paths, metrics or window keys),
    in a wide env slice, each feature group at weight 1 (or ``weights[path]``)."""
    probe = V2Model({"config": 0.0, "env": 1.0, "outcome": 0.0}, {}, {}, model.patterns, slices=dict(_PROBE_SLICES), format=model.format)
    for path in paths:
        for source, target in ((model.config_paths, probe.config_paths), (model.metric_paths, probe.metric_paths), (model.window_paths, probe.window_paths)):
            if path in source:
                target[path] = _at_weight_one(source[path], "env", (weights or {}).get(path, 1.0))
    probe._defaults = _GivesNothing()  # metrics the probe does not hold: nothing, not defaults
    return probe


class _GivesNothing(dict):
    def get(self, key, default=None):
        return PathModel("none")


def _at_weight_one(m: PathModel, branch: str, weight: float = 1.0) -> PathModel:
    """A copy of a path model in ``branch`` with each of its feature groups at
    weight 1 (or ``weight``)."""
    def unit(group):
        return None if group is None else dataclasses.replace(group, weight=weight)

    return PathModel(branch, weight * float(m.present > 0), unit(m.number), unit(m.length), unit(m.string), unit(m.date))


def _decorrelated(model: V2Model, metrics: list[str], metric_values: dict, n: int) -> dict[str, float]:
    """Per metric, 1 / the sum of its squared (rank) correlations with the metrics
    (itself included): what several metrics measure together (a run's returns,
    its Sharpe, its drawdown) counts about once in the metrics' clusters, as one
    independent figure does."""
    columns = []
    for key in metrics:
        m, values = model.metric_paths[key], metric_values[key]
        column = np.full(n, np.nan)
        if m.number is not None and values.numbers:
            held, x, _ = row_means(_joined(values.number_rows, np.int64), m.number.transform(_joined(values.numbers, np.float64)), n)
            column[held] = x
        columns.append(column)
    if len(columns) < 2:
        return {}
    # ranks: robust to values near the float limit; a missing value takes the middle rank
    x = np.array([_ranks(c) for c in columns]).T
    spread = x.std(axis=0)
    usable = spread > 0
    weights = {}
    if usable.sum() >= 2:
        correlation = np.corrcoef(x[:, usable].T)
        for key, weight in zip(np.asarray(metrics)[usable].tolist(), (1.0 / (correlation**2).sum(axis=1)).tolist()):
            weights[key] = float(weight)
    return weights


def _ranks(column: np.ndarray) -> np.ndarray:
    """Ranks (0..1) of the finite values, 0.5 for the others."""
    out = np.full(len(column), 0.5)
    fine = np.flatnonzero(np.isfinite(column))
    if len(fine) > 1:
        out[fine[np.argsort(column[fine], kind="stable")]] = np.arange(len(fine)) / (len(fine) - 1)
    return out


def _key_figures(path: str, groups: list[Group], figures: list[np.ndarray], configs: Clusters, n: int) -> dict:
    """The env evidence (the best over the metrics' clusterings ``figures``) and
    config share of a key's most telling group (the one whose evidence most
    exceeds its share). The config share is measured only where the evidence
    could make the key env (it costs a pass over the runs)."""
    best = {"group": None, "env_evidence": 0.0, "config_share": None}
    for g in groups:
        evidence = max(float(explained([g], labels, n)[0]) for labels in figures)
        share = None
        if evidence >= KEY_MARGIN:
            dims = configs.slots(path, g.kind) if path in configs.model.config_paths else np.zeros(0, np.int64)
            share = round(float(explaining(g, configs.without(dims), n)), 4)
        margin = evidence - (share or 0.0)
        if best["group"] is None or margin > best["env_evidence"] - (best["config_share"] or 0.0):
            best = {"group": g.kind, "env_evidence": round(evidence, 4), "config_share": share}
    return best


def _metric_figures(m: PathModel, values, environments: np.ndarray, configs: np.ndarray, n: int) -> dict:
    """The shares of a metric's variance between environments and between (config
    cluster, environment) cells."""
    if m.number is None or not values.numbers:
        return {"between_env": 0.0, "between_config_env": 0.0}
    held, x, _ = row_means(_joined(values.number_rows, np.int64), m.number.transform(_joined(values.numbers, np.float64)), n)
    finite = np.isfinite(x)
    held, x = held[finite], x[finite]
    cells = configs[held] * (int(environments.max()) + 1) + environments[held]
    between = intraclass(x, environments[held]) if len(held) > 2 else None
    within_cells = intraclass(x, cells) if len(held) > 2 else None
    return {"between_env": round(float(between or 0.0), 4), "between_config_env": round(float(within_cells or 0.0), 4)}


def _follows_environment(figures: dict) -> bool:
    between, cells = figures["between_env"], figures["between_config_env"]
    return between >= METRIC_BETWEEN and between >= METRIC_CONSISTENT * cells


def _by_names(model, keys, windows, metrics, key_figures=None) -> None:
    """The runs cannot tell: v1's names decide."""
    key_figures = key_figures or {}
    for p, m in keys.items():
        m.branch, m.how, m.figures = ("env" if matches(p, PRIOR_ENV) else "config"), "prior", key_figures.get(p, {})
    for p, m in windows.items():
        m.branch, m.how, m.figures = "none", "prior", key_figures.get(p, {})
    for p, m in metrics.items():
        m.branch, m.how = ("env" if matches(p, PRIOR_ENV_METRICS) else "outcome"), "prior"


__all__ = ["learn_branches", "KEY_MARGIN", "METRIC_BETWEEN", "METRIC_CONSISTENT"]

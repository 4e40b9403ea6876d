"""The Meta-Orchestrator's workflows over the joint space of a snapshot.

``space`` (a model's vectors and runs, opened from a snapshot or the
database), ``environments`` (which runs share an environment, at which
level), ``suggest`` (configs that did well near a run or an environment),
``cluster`` (clusters of runs by config, env or outcome) and ``landscape``
(a map of the clusters as an HTML page or a picture).
"""

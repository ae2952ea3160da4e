"""The ensemble of a sweep's heads: greedy forward selection with replacement (Caruana et al., 2004).

A sweep already holds every head's probabilities on the selection split (``val``, or
out of fold on train: ``cv``, ``holdout``), so an ensemble costs almost nothing:

- **Candidates**: the heads tied with the most accurate one on the selection split
  (:func:`featurecache.sweep.leaderboard.rank`; a head pruned on a sample is never tied),
  each with the probabilities it will give: after its temperature when the run is
  calibrated. Restricting the ensemble to the tied heads is what won on held-out test
  images (``bench/selection.py``): it resolves a tie the selection split cannot.
- **Selection**: start from the :data:`INIT` heads of lowest log-loss, then add, with
  replacement, the head that lowers the log-loss of the average most, until the
  ensemble has :data:`ROUNDS` votes; a head's weight is its share of the votes. The
  initialisation with the best few and the log-loss objective (smooth, unlike accuracy)
  are the safeguards against fitting the selection rows' noise; with replacement, a
  head that helps is weighted up instead of a poor one being added.
- **An honest score**: the weights that are saved are chosen on all selection rows, so
  their score there would flatter them. The ensemble's selection score comes instead
  from 2-fold cross-fitting: the selection rows are split in two stratified halves,
  weights are chosen on one half and predict the other, both ways. Its accuracy,
  interval, tie mark and gap on the selection split are those of these predictions,
  which no weight saw; the other splits (``test``) are predicted with the saved weights.
  (The members' temperatures were fitted on all selection rows: one number per head.)

The ensemble enters the leaderboard as one entry, ``ensemble``, with its members and
weights. :func:`featurecache.sweep.leaderboard.selection_key` ranks it first when its
cross-fitted score is tied with the most accurate head's (or better); when it is
significantly worse, the most accurate head wins. Its files are its ``head.json`` alone; the members
are the run's own head folders (:mod:`featurecache.sweep.runs`), and
:class:`featurecache.heads.mixture.WeightedMixture` predicts with them.
"""

from __future__ import annotations

import time

import numpy as np

from ..heads import head_type
from ..heads.mixture import mix
from ..metrics import EPS, classification_metrics, tempered
from .calibration import calibrate_entries, head_temperature
from .leaderboard import ENSEMBLE, rank

ROUNDS = 20  # votes of the greedy selection
INIT = 3  # heads of lowest log-loss the selection starts from
FOLDS = 2  # halves of the selection rows for the honest score
METHOD = (f"greedy forward selection with replacement (Caruana et al., 2004): {ROUNDS} votes, starting from "
          f"the {INIT} heads of lowest log-loss, minimizing the log-loss of the average")
SCORED = f"{FOLDS}-fold cross-fitting on the selection split: weights chosen on one half score the other"


def greedy_weights(probas: list, y, rounds: int = ROUNDS, init: int = INIT) -> np.ndarray:
    """Weights (summing to 1) of the members of ``probas`` (each N x C) chosen by greedy forward
    selection with replacement on labels ``y``; ties go to the earlier member."""
    y = np.asarray(y, dtype=np.int64)
    rows = np.arange(len(y))
    truth = np.stack([np.asarray(p, dtype=np.float64)[rows, y] for p in probas])  # members x N
    losses = -np.log(np.clip(truth, EPS, 1.0)).mean(axis=1)
    counts = np.zeros(len(probas))
    counts[np.argsort(losses, kind="stable")[:max(1, min(init, len(probas)))]] = 1
    total = counts @ truth
    while counts.sum() < rounds:
        votes = counts.sum() + 1
        trial = -np.log(np.clip((total[None, :] + truth) / votes, EPS, 1.0)).mean(axis=1)
        best = int(np.argmin(trial))
        counts[best] += 1
        total += truth[best]
    return counts / counts.sum()


def _halves(y: np.ndarray, seed: int) -> list:
    """Two stratified halves of the selection rows (plain halves when a class has a single row)."""
    from sklearn.model_selection import KFold, StratifiedKFold

    counts = np.bincount(y)
    splitter = StratifiedKFold if counts[counts > 0].min() >= FOLDS else KFold
    return list(splitter(n_splits=FOLDS, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


def cross_fitted(probas: list, y, seed: int = 0) -> np.ndarray:
    """The ensemble's probabilities on the selection rows, each row predicted by weights chosen without it."""
    y = np.asarray(y, dtype=np.int64)
    out = np.zeros(np.asarray(probas[0]).shape, dtype=np.float64)
    for chosen_on, scored in _halves(y, seed):
        weights = greedy_weights([p[chosen_on] for p in probas], y[chosen_on])
        out[scored] = mix([p[scored] for p in probas], weights)
    return out


def _candidates(entries: list[dict]) -> list[dict]:
    """The heads tied with the most accurate one (fitted on their rows: a pruned head is never tied)."""
    return [e for e in entries if e.get("tied") and e.get("status") != "pruned" and e["head"] != ENSEMBLE]


def _entry(members: list[dict], weights: np.ndarray, probas: dict, labels: dict, classes: list, seconds: float) -> dict:
    """The leaderboard entry of the ensemble (``probas``: its probabilities per split)."""
    split = members[0]["selection_split"]
    order = list(members[0]["metrics"])
    metrics = {s: classification_metrics(labels[s], probas[s], classes) for s in order}
    used = [(m, w) for m, w in zip(members, weights) if w > 0]
    return {"head": ENSEMBLE, "params": {"members": {m["head"]: round(float(w), 4) for m, w in used}},
            "members": [{"head": m["head"], "weight": float(w), "temperature": head_temperature(m)} for m, w in used],
            "transferable": all(head_type(m["head"].partition(":")[0]).transferable for m, _ in used),
            "selection_split": split, "selection_accuracy": metrics[split]["accuracy"], "metrics": metrics,
            "fit_seconds": round(seconds, 4), "status": "fitted", "reason": "",
            "rows": max((m["rows"] for m, _ in used if m.get("rows")), default=None),  # what its members learnt from
            "ensemble": {"method": METHOD, "scored": SCORED}}


def add_ensemble(entries: list[dict], probas: dict, labels: dict, classes: list, seed: int = 0,
                 calibrate: bool = False) -> list[dict]:
    """``entries`` (ranked) with the ensemble of the heads tied with the most accurate one added and ranked
    again (:func:`featurecache.sweep.leaderboard.rank`); ``entries`` as they are when fewer than two heads are
    tied.

    ``probas``: head spec -> evaluation -> probabilities (``cv``: out of fold); ``labels``: evaluation -> labels.
    The ensemble's probabilities are added to ``probas`` under :data:`ENSEMBLE`. ``calibrate``: fit the
    ensemble's own temperature on its cross-fitted selection probabilities, as the heads have theirs.
    """
    started = time.perf_counter()
    members = _candidates(entries)
    if len(members) < 2:
        return entries
    split = members[0]["selection_split"]
    heads = [{s: tempered(p, head_temperature(m)) for s, p in probas[m["head"]].items()} for m in members]
    weights = greedy_weights([t[split] for t in heads], labels[split])
    if np.count_nonzero(weights) < 2:
        return entries
    used = np.flatnonzero(weights)
    own = {s: mix([heads[i][s] for i in used], weights[used]) for s in heads[0]}
    applied = float(np.mean(own[split].argmax(axis=1) == np.asarray(labels[split])))
    own[split] = cross_fitted([t[split] for t in heads], labels[split], seed)
    probas[ENSEMBLE] = own
    entry = _entry(members, weights, own, labels, classes, time.perf_counter() - started)
    # what the saved weights give on the rows that chose them: not a score, but what a network made of them reproduces
    entry["ensemble"]["saved_weights_accuracy"] = {split: applied}
    if calibrate:
        calibrate_entries([entry], probas, labels)
    return rank([*entries, entry], probas, labels)

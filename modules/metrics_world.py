"""Attribute accuracy of generated world images: did the picture get what the prompt asked for?

The one attribute scorer of the suite (in-loop validation, ``experiments.evaluate`` and the
scoreboard all use it). A world generation prompt asks for groups of objects, one group per
(shape, colour) with its count, and positions / sizes when the prompt states them
(``requested_groups``). The reference classifier reads a scene back from each image
(``classifier.predict_attributes``: ``{"objects": [{shape, colour, size, position}], ...}``) and
``check_scene`` compares, per attribute:

    object    every requested (shape, colour) is present
    count     ... with the requested count
    position  ... at the requested positions (only when the prompt states them)
    size      ... with the requested sizes (only when the prompt states them)
    exact     no unrequested object either (reported, not part of ``all`` / ``mean``)
    colour    every requested colour is on some object, whatever its shape (reported only)
    shape     every requested shape is there, whatever its colour (reported only)
    all       every requested attribute right

``colour`` and ``shape`` against ``object`` measure binding: a generator that draws the right
colours and the right shapes but pairs them at random scores high on both and low on ``object``.

``WorldAttributeAccuracy`` accumulates these as summed tensor states, so it gathers across
processes like every other torchmetrics metric. ``compute()`` gives the accuracy of each
attribute over the prompts that request it, and ``mean``: the average over every requested
attribute of every prompt (the scoreboard's ``gen_attribute_accuracy``).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch
from torch import Tensor
from torchmetrics import Metric

from datamodules.world import POSITIONS

# Attributes check_scene reports, in state order; only _IN_MEAN are averaged in ``mean``.
ATTRIBUTES = ("object", "count", "position", "size", "exact", "colour", "shape", "all")
_IN_MEAN = ("object", "count", "position", "size")


def requested_groups(rec: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """What a world generation record asks for: one group per (shape, colour) with its count,
    and positions / sizes when the prompt states them (``rec["checks"]``)."""
    checks = rec.get("checks") or {}
    groups: Dict[tuple, Dict[str, Any]] = {}
    for o in rec["scene"]["objects"]:
        g = groups.setdefault((o["shape"], o["colour"]), {"shape": o["shape"], "colour": o["colour"], "count": 0,
                                                          "positions": [], "sizes": []})
        g["count"] += 1
        g["positions"].append(o["position"])
        g["sizes"].append(o["size"])
    out = []
    for g in groups.values():
        if not checks.get("position"):
            g.pop("positions")
        if not checks.get("size"):
            g.pop("sizes")
        out.append(g)
    return out


def check_scene(groups: Sequence[Mapping[str, Any]], predicted: Mapping[str, Any]) -> Dict[str, bool]:
    """Per-attribute correctness of one predicted scene against the requested groups (see the
    module docstring); keys ``position`` / ``size`` only where some group requests them."""
    objs = predicted.get("objects", [])
    res: Dict[str, bool] = {}
    present, count, pos, size = [], [], [], []
    for g in groups:
        mine = [o for o in objs if o["shape"] == g["shape"] and o["colour"] == g["colour"]]
        present.append(len(mine) > 0)
        count.append(len(mine) == g["count"])
        if "positions" in g:
            pos.append(sorted(o["position"] for o in mine) == sorted(g["positions"]))
        if "sizes" in g:
            size.append(sorted(o["size"] for o in mine) == sorted(g["sizes"]))
    res["object"] = all(present)
    res["count"] = all(count)
    if pos:
        res["position"] = all(pos)
    if size:
        res["size"] = all(size)
    res["exact"] = len(objs) == sum(g["count"] for g in groups) and res["count"]
    res["all"] = all(v for k, v in res.items() if k != "exact")
    res["colour"] = {g["colour"] for g in groups} <= {o["colour"] for o in objs}
    res["shape"] = {g["shape"] for g in groups} <= {o["shape"] for o in objs}
    return res


class WorldAttributeAccuracy(Metric):
    """``update(predicted_scenes, requested_groups)``; ``compute() -> {attribute: accuracy,
    "mean": ..., "n": prompts}``, attributes nobody requested left out."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        a = len(ATTRIBUTES)
        self.add_state("correct_A", torch.zeros(a, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("requested_A", torch.zeros(a, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("num_prompts", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predicted: Sequence[Mapping[str, Any]], groups: Sequence[Sequence[Mapping[str, Any]]]) -> None:
        if len(predicted) != len(groups):
            raise ValueError(f"{len(predicted)} predicted scenes for {len(groups)} prompts; the classifier "
                             f"must return one scene per image")
        correct_A = torch.zeros(len(ATTRIBUTES), dtype=torch.long)
        requested_A = torch.zeros_like(correct_A)
        for g, p in zip(groups, predicted):
            for k, v in check_scene(g, p).items():
                i = ATTRIBUTES.index(k)
                requested_A[i] += 1
                correct_A[i] += int(v)
        self.correct_A += correct_A.to(self.correct_A.device)
        self.requested_A += requested_A.to(self.requested_A.device)
        self.num_prompts += len(groups)

    def compute(self) -> Dict[str, Tensor]:
        if int(self.num_prompts) == 0:
            raise RuntimeError("WorldAttributeAccuracy.compute() called before any update()")
        out = {k: self.correct_A[i].double() / self.requested_A[i].double()
               for i, k in enumerate(ATTRIBUTES) if int(self.requested_A[i]) > 0}
        idx = [ATTRIBUTES.index(k) for k in _IN_MEAN]
        out["mean"] = self.correct_A[idx].sum().double() / self.requested_A[idx].sum().clamp(min=1).double()
        out["n"] = self.num_prompts.clone()
        return out


def predict_scenes(classifier: Any, images: Tensor, batch: int = 64) -> List[Mapping[str, Any]]:
    """The classifier's reading of ``images`` (N, 3, H, W) in [0, 1], one scene per image."""
    out: List[Mapping[str, Any]] = []
    for i in range(0, len(images), batch):
        out.extend(classifier.predict_attributes(images[i:i + batch]))
    return out


def score_scenes(predicted: Sequence[Mapping[str, Any]], groups: Sequence[Sequence[Mapping[str, Any]]]) -> Dict[str, float]:
    """Predicted scenes scored against their requested groups: ``{attribute: accuracy, "mean": ...}``."""
    metric = WorldAttributeAccuracy(sync_on_compute=False)  # one process's images (evaluation runs on rank 0)
    metric.update(predicted, groups)
    return {k: float(v) for k, v in metric.compute().items() if k != "n"}


def requested_objects(groups: Sequence[Mapping[str, Any]]) -> int:
    """How many objects a prompt asks for (the sum of its groups' counts)."""
    return sum(int(g["count"]) for g in groups)


def scores_by_objects(predicted: Sequence[Mapping[str, Any]],
                      groups: Sequence[Sequence[Mapping[str, Any]]]) -> Dict[str, Dict[str, float]]:
    """``score_scenes`` per number of requested objects: ``{"1": {..., "prompts": n}, "2": ...}``.
    Where generation fails by scene complexity (a one-object prompt against a three-object one),
    which the pooled mean hides."""
    by: Dict[int, List[int]] = {}
    for i, g in enumerate(groups):
        by.setdefault(requested_objects(g), []).append(i)
    return {str(n): {**score_scenes([predicted[i] for i in ix], [groups[i] for i in ix]), "prompts": float(len(ix))}
            for n, ix in sorted(by.items())}


def prompt_counts(predicted: Sequence[Mapping[str, Any]],
                  groups: Sequence[Sequence[Mapping[str, Any]]]) -> Tuple[Tensor, Tensor, Tensor]:
    """Per prompt: (attributes right, attributes requested) among those averaged in ``mean``, and
    1 where every requested attribute is right (``all``); three (N,) tensors."""
    right, asked, all_ok = [], [], []
    for g, p in zip(groups, predicted):
        res = check_scene(g, p)
        right.append(sum(int(res[k]) for k in _IN_MEAN if k in res))
        asked.append(sum(1 for k in _IN_MEAN if k in res))
        all_ok.append(int(res["all"]))
    as_t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return as_t(right), as_t(asked), as_t(all_ok)


def bootstrap_ci(num_N: Tensor, den_N: Tensor, reps: int = 2000, seed: int = 0, level: float = 0.95) -> List[float]:
    """Percentile bootstrap interval of ``sum(num) / sum(den)`` with the N prompts resampled (the
    pooled attribute accuracy is a ratio of sums: prompts ask for 1-8 attributes, so a binomial
    interval over prompts or over attributes would be wrong either way)."""
    n = len(num_N)
    if n == 0:
        return [float("nan"), float("nan")]
    g = torch.Generator().manual_seed(seed)
    idx_RN = torch.randint(0, n, (reps, n), generator=g)
    ratio_R = num_N[idx_RN].sum(1) / den_N[idx_RN].sum(1).clamp(min=1)
    lo, hi = torch.quantile(ratio_R, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=ratio_R.dtype))
    return [round(float(lo), 4), round(float(hi), 4)]


def attribute_scores(classifier: Any, images: Tensor, groups: Sequence[Sequence[Mapping[str, Any]]],
                     batch: int = 64) -> Dict[str, Any]:
    """The classifier's reading of ``images`` (N, 3, H, W) in [0, 1] scored against ``groups``
    (one classifier pass): ``{attribute: accuracy, "mean": ..., "by_objects": scores_by_objects,
    "mean_ci95": [lo, hi], "all_ci95": [lo, hi]}``, the accuracies as floats; the intervals are
    bootstraps over the prompts. The one scorer of generated and reference images."""
    predicted = predict_scenes(classifier, images, batch)
    right, asked, all_ok = prompt_counts(predicted, groups)
    return {**score_scenes(predicted, groups), "by_objects": scores_by_objects(predicted, groups),
            "mean_ci95": bootstrap_ci(right, asked), "all_ci95": bootstrap_ci(all_ok, torch.ones_like(all_ok))}


# --------------------------------------------------------------------------- editing
# An edit (datamodules/world_edit.py) turns a source scene into a target scene. Both are read
# per position (a world scene has at most one object per position, and the classifier one slot
# per position): every (position, attribute) fact of the target is either an *edit* fact (it
# differs from the source: the edited attribute; a moved or added object's shape, colour and
# size at its new place; "empty" where an object was removed or moved away) or a *keep* fact
# (equal in both: every other attribute of every object, and "empty" where both are empty, so a
# hallucinated object costs preservation). Per image: ``edit`` = every edit fact holds,
# ``preservation`` = the share of keep facts that hold, ``success`` = both complete.

EDIT_ATTRIBUTES = ("shape", "colour", "size")


def position_slots(scene: Mapping[str, Any]) -> Dict[str, Tuple[str, str, str]]:
    """{position: (shape, colour, size)} of a scene or a classifier reading."""
    out: Dict[str, Tuple[str, str, str]] = {}
    for o in scene.get("objects", []):
        if o["position"] in out:
            raise ValueError(f"two objects at position {o['position']!r}: a world scene holds one per position")
        out[o["position"]] = (o["shape"], o["colour"], o["size"])
    return out


def edit_facts(source: Mapping[str, Any], target: Mapping[str, Any]) -> Tuple[List[tuple], List[tuple]]:
    """(edit facts, keep facts) of a source -> target edit; a fact is (position, attribute,
    value) with attribute in shape / colour / size, or (position, "empty", None)."""
    s, t = position_slots(source), position_slots(target)
    edit: List[tuple] = []
    keep: List[tuple] = []
    for p in POSITIONS:
        if p not in t:
            (keep if p not in s else edit).append((p, "empty", None))
            continue
        for k, a in enumerate(EDIT_ATTRIBUTES):
            same = p in s and s[p][k] == t[p][k]
            (keep if same else edit).append((p, a, t[p][k]))
    return edit, keep


def _holds(fact: tuple, slots: Mapping[str, Tuple[str, str, str]]) -> bool:
    p, a, v = fact
    if a == "empty":
        return p not in slots
    return p in slots and slots[p][EDIT_ATTRIBUTES.index(a)] == v


def check_edit(source: Mapping[str, Any], target: Mapping[str, Any], predicted: Mapping[str, Any]) -> Dict[str, Any]:
    """One edited image's reading against its source and target scenes: ``edit`` (bool),
    ``preservation`` (share of keep facts), ``success`` and the fact counts."""
    edit, keep = edit_facts(source, target)
    if not edit:
        raise ValueError("source and target scenes are equal: not an edit")
    slots = position_slots(predicted)
    kept = sum(_holds(f, slots) for f in keep)
    ok = all(_holds(f, slots) for f in edit)
    pres = kept / len(keep) if keep else 1.0
    return {"edit": ok, "preservation": pres, "success": ok and kept == len(keep), "n_edit": len(edit),
            "n_keep": len(keep)}


def edit_scores(predicted: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """Edited images' readings scored against their ``edit`` records (``source_scene`` -> ``scene``):
    ``{edit, preservation, success, n, <each>_ci95, by_op: {op: {edit, preservation, success, n}}}``,
    the accuracies as means over images (edit accuracy, preservation accuracy, both), the intervals
    bootstraps over the images."""
    if len(predicted) != len(records):
        raise ValueError(f"{len(predicted)} predicted scenes for {len(records)} edit records")
    if not records:
        raise ValueError("edit_scores needs at least one record")
    rows = []
    for p, r in zip(predicted, records):
        if "source_scene" not in r or "scene" not in r:
            raise ValueError(f"record {r.get('id', '?')} has no source_scene / scene: not a world edit record "
                             f"(datamodules/world_edit.py)")
        rows.append(((r.get("edit") or {}).get("op", "?"), check_edit(r["source_scene"], r["scene"], p)))

    def mean(rs):
        n = len(rs)
        return {"edit": sum(c["edit"] for _, c in rs) / n, "preservation": sum(c["preservation"] for _, c in rs) / n,
                "success": sum(c["success"] for _, c in rs) / n, "n": n}

    def ci(key):  # percentile bootstrap over the images (bootstrap_ci)
        v = torch.tensor([float(c[key]) for _, c in rows], dtype=torch.float64)
        return bootstrap_ci(v, torch.ones_like(v))

    ops = sorted({op for op, _ in rows})
    return {**mean(rows), **{f"{k}_ci95": ci(k) for k in ("edit", "preservation", "success")},
            "by_op": {op: mean([x for x in rows if x[0] == op]) for op in ops}}


def edit_accuracy(classifier: Any, images: Tensor, records: Sequence[Mapping[str, Any]], batch: int = 64) -> Dict[str, Any]:
    """The reference classifier's reading of edited ``images`` (N, 3, H, W) in [0, 1] scored
    against their world edit records (``edit_scores``)."""
    return edit_scores(predict_scenes(classifier, images, batch), records)

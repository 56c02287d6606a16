"""Attribute accuracy of generated world images: did the picture get what the prompt asked for?

A generation prompt of the embedded world requests some attributes, e.g.
``{"shape": "circle", "colour": "red", "count": 2}`` (absent keys are not requested). A
classifier reads the attributes back from each generated image; here the classifier is any
callable ``images -> list[dict]`` (one dict of predicted attribute values per image), so the
world's reference classifier, built elsewhere, plugs in without this file knowing it.

Values compare as canonical strings (``str(v).strip().lower()``): ``2`` equals ``"2"``, ``"Red"``
equals ``"red"``. A requested attribute the classifier did not predict counts as wrong.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

AttributeClassifier = Callable[[Tensor], List[Mapping[str, Any]]]
DEFAULT_WORLD_ATTRIBUTES = ("shape", "colour", "size", "position", "count")


def _canon(value: Any) -> str:
    return str(value).strip().lower()


class WorldAttributeAccuracy(Metric):
    """Per-attribute accuracy and "every requested attribute correct" accuracy.

    ``update(images, requested)`` runs ``classifier`` (given at construction) on the images;
    ``update_predictions(predicted, requested)`` takes classifier outputs directly.
    ``compute() -> dict``: ``{attr: accuracy}`` over prompts that requested ``attr`` (NaN when
    none did), ``"all"``: fraction of prompts with every requested attribute right, and
    ``"n"``: number of prompts. States are tensors summed across processes.

    ``attributes`` fixes the attribute names (state sizes must agree across processes); a
    requested key outside it raises, which catches typos such as "color" for "colour".
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        classifier: Optional[AttributeClassifier] = None,
        attributes: Sequence[str] = DEFAULT_WORLD_ATTRIBUTES,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if len(set(attributes)) != len(attributes) or not attributes:
            raise ValueError(f"attributes must be distinct and non-empty, got {list(attributes)}")
        self.classifier = classifier
        self.attributes = list(attributes)
        a = len(self.attributes)
        self.add_state("correct_A", torch.zeros(a, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("requested_A", torch.zeros(a, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("all_correct", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("num_prompts", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: Tensor, requested: Sequence[Mapping[str, Any]]) -> None:
        if self.classifier is None:
            raise RuntimeError(
                "WorldAttributeAccuracy was built without a classifier: pass classifier= or call "
                "update_predictions(predicted, requested)"
            )
        self.update_predictions(self.classifier(images), requested)

    def update_predictions(
        self, predicted: Sequence[Mapping[str, Any]], requested: Sequence[Mapping[str, Any]]
    ) -> None:
        if len(predicted) != len(requested):
            raise ValueError(
                f"{len(predicted)} classifier predictions for {len(requested)} prompts; the "
                f"classifier must return one dict per image"
            )
        index = {name: i for i, name in enumerate(self.attributes)}
        correct_A = torch.zeros(len(self.attributes), dtype=torch.long)
        requested_A = torch.zeros_like(correct_A)
        all_correct = 0
        for i, (pred, req) in enumerate(zip(predicted, requested)):
            unknown = [k for k in req if k not in index]
            if unknown:
                raise KeyError(
                    f"prompt {i} requests unknown attribute(s) {unknown}; known: {self.attributes} "
                    f"(set WorldAttributeAccuracy(attributes=...))"
                )
            ok_all = True
            for key, want in req.items():
                ok = key in pred and _canon(pred[key]) == _canon(want)
                requested_A[index[key]] += 1
                correct_A[index[key]] += int(ok)
                ok_all &= ok
            all_correct += int(ok_all)
        self.correct_A += correct_A.to(self.correct_A.device)
        self.requested_A += requested_A.to(self.requested_A.device)
        self.all_correct += all_correct
        self.num_prompts += len(requested)

    def compute(self) -> Dict[str, Tensor]:
        if int(self.num_prompts) == 0:
            raise RuntimeError("WorldAttributeAccuracy.compute() called before any update()")
        acc_A = self.correct_A.double() / self.requested_A.double()  # 0/0 -> NaN: not requested
        out = {name: acc_A[i] for i, name in enumerate(self.attributes)}
        out["all"] = self.all_correct.double() / self.num_prompts.double()
        out["n"] = self.num_prompts.clone()
        return out


def world_attribute_accuracy(
    images: Tensor,
    requested: Sequence[Mapping[str, Any]],
    classifier: AttributeClassifier,
    attributes: Optional[Sequence[str]] = None,
) -> Dict[str, float]:
    """One-shot version: ``{attr: accuracy, ..., "all": accuracy, "n": count}`` as floats.

    ``attributes`` defaults to the keys seen in ``requested``; attributes nobody requested are
    left out (not NaN).
    """
    if attributes is None:
        attributes = sorted({k for r in requested for k in r})
    metric = WorldAttributeAccuracy(classifier, attributes=attributes or DEFAULT_WORLD_ATTRIBUTES)
    metric.update(images, requested)
    result = {k: float(v) for k, v in metric.compute().items()}
    return {k: v for k, v in result.items() if not (isinstance(v, float) and math.isnan(v))}

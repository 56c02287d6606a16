"""Reference classifier family: the embedded world's stand-in for Inception / CLIP scoring.

Trained in stage 0 on rendered world scenes; used as the FID/IS feature extractor for the world
(pooled features for FID, logits for IS) and to check generated images' attributes (shape,
colour, count, position) against their prompts.

Factorisation (``world_cnn``). A world scene puts 1-3 objects on distinct coarse positions
(left/right/top/bottom/centre; ``datamodules/world.py`` never puts two objects on one position),
so a scene is exactly described by five *slots*, one per position, each either empty or holding
one (shape, colour, size) object. The classifier predicts per slot:

    what_P   (5, 25): 0 = empty, 1 + class_label(shape, colour) otherwise (24 world classes)
    size_P   (5, 2):  small / large (only trained where the slot holds an object)

Counts per (shape, colour), positions and the whole scene follow from the slots, so one small
network answers every attribute a generation prompt can request.

Input convention: float images in [0, 1], (N, 3, H, W), RGB, H = W = ``cfg.image_size`` (other
sizes work: the trunk ends in an adaptive pool); the network normalises internally. uint8
images (0..255) are accepted and scaled.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from datamodules.world import COLOURS, NUM_CLASSES, POSITIONS, SHAPES, SIZES, class_label
from modules.components.registry import ComponentConfig, Registry

CLASSIFIERS = Registry("classifier")

NUM_SLOTS = len(POSITIONS)  # one slot per coarse position
NUM_WHAT = 1 + NUM_CLASSES  # empty + 24 (shape, colour) classes
IGNORE_INDEX = -100


@dataclass
class ClassifierConfig(ComponentConfig):
    family: ClassVar[str] = "classifier"
    name: str = "world_cnn"
    image_size: int = 64
    width: int = 32  # channels of the first conv; doubled per stride-2 stage
    num_stages: int = 4
    feature_dim: int = 128  # pooled feature width (the FID feature)


def scene_targets(scene: Mapping[str, Any]) -> Dict[str, Tensor]:
    """A world scene description -> per-slot training targets.

    Returns ``{"what": (5,) long, "size": (5,) long}``; ``size`` is ``IGNORE_INDEX`` on empty
    slots. Raises on two objects at one position (not a world scene).
    """
    what = torch.zeros(NUM_SLOTS, dtype=torch.long)
    size = torch.full((NUM_SLOTS,), IGNORE_INDEX, dtype=torch.long)
    for obj in scene["objects"]:
        p = POSITIONS.index(obj["position"])
        if what[p] != 0:
            raise ValueError(f"scene has two objects at position {obj['position']!r}; the world "
                             f"classifier assumes one object per position")
        what[p] = 1 + class_label(obj["shape"], obj["colour"])
        size[p] = SIZES.index(obj["size"])
    return {"what": what, "size": size}


def describe_slots(what_P: Sequence[int], size_P: Sequence[int]) -> Dict[str, Any]:
    """Slot predictions of one image -> a scene-like attribute dict (see ``predict_attributes``)."""
    objects: List[Dict[str, Any]] = []
    for p, w in enumerate(what_P):
        w = int(w)
        if w == 0:
            continue
        label = w - 1
        objects.append({
            "shape": SHAPES[label // len(COLOURS)],
            "colour": COLOURS[label % len(COLOURS)],
            "size": SIZES[int(size_P[p])],
            "position": POSITIONS[p],
        })
    pair_counts: Dict[str, int] = {}
    for o in objects:
        key = f"{o['colour']} {o['shape']}"
        pair_counts[key] = pair_counts.get(key, 0) + 1
    out: Dict[str, Any] = {"objects": objects, "num_objects": len(objects), "pair_counts": pair_counts}
    if objects:
        # Flat keys describe the most frequent (shape, colour) pair (first in slot order on a
        # tie): for a one-pair prompt ("draw two red circles") they are exactly what was asked.
        top = max(pair_counts, key=lambda k: pair_counts[k])
        first = next(o for o in objects if f"{o['colour']} {o['shape']}" == top)
        out.update(shape=first["shape"], colour=first["colour"], size=first["size"],
                   position=first["position"], count=pair_counts[top])
    else:
        out["count"] = 0
    return out


def slot_loss(logits: Mapping[str, Tensor], targets: Mapping[str, Tensor], size_weight: float = 0.5) -> Dict[str, Tensor]:
    """Per-slot cross-entropies: ``logits`` (what (B, 5, 25), size (B, 5, 2)); ``targets`` as
    ``scene_targets`` stacked over the batch. Returns loss, what, size."""
    what = F.cross_entropy(logits["what"].flatten(0, 1).float(), targets["what"].flatten())
    size_t = targets["size"].flatten()
    if bool((size_t != IGNORE_INDEX).any()):
        size = F.cross_entropy(logits["size"].flatten(0, 1).float(), size_t, ignore_index=IGNORE_INDEX)
    else:
        size = logits["size"].sum() * 0.0
    return {"loss": what + size_weight * size, "what": what, "size": size}


class WorldCNN(nn.Module):
    """Small strided CNN with per-slot heads. ~0.6M parameters at the defaults.

    ``features(x) -> (N, feature_dim)``: the FID feature (post-ReLU penultimate layer).
    ``logits(x) -> {"class": (N, 24), "what": (N, 5, 25), "size": (N, 5, 2)}``: ``class`` is
    the log of the class distribution pooled over occupied slots (the object's class for a
    one-object image); it is the IS head (``gen_metrics.is_heads: [class]``).
    ``predict_attributes(x) -> list[dict]``: see ``describe_slots``.
    """

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        if cfg.num_stages < 1 or cfg.width < 1 or cfg.feature_dim < 1:
            raise ValueError(f"classifier: num_stages, width and feature_dim must be >= 1, got {cfg}")
        self.cfg = cfg
        layers: List[nn.Module] = []
        c_in = 3
        for s in range(cfg.num_stages):
            c_out = cfg.width * 2 ** s
            # A stride-2 conv then a stride-1 conv: BatchNorm (not GroupNorm) because it is
            # several times faster on CPU and the network is always evaluated in eval mode.
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            ]
            c_in = c_out
        self.trunk = nn.Sequential(*layers)
        # Keep a 4x4 map (not a global pool): slots are positions, so the head needs to know where.
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(c_in * 16, cfg.feature_dim)
        self.head_what = nn.Linear(cfg.feature_dim, NUM_SLOTS * NUM_WHAT)
        self.head_size = nn.Linear(cfg.feature_dim, NUM_SLOTS * len(SIZES))
        self.num_features = cfg.feature_dim
        self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1), persistent=False)

    def _prep(self, x_N3HW: Tensor) -> Tensor:
        if x_N3HW.dim() != 4 or x_N3HW.shape[1] != 3:
            raise ValueError(f"world classifier expects (N, 3, H, W) images in [0, 1], got {tuple(x_N3HW.shape)}")
        if x_N3HW.dtype == torch.uint8:
            x_N3HW = x_N3HW.float() / 255.0
        # [0, 1] -> roughly zero-mean unit-ish range
        return (x_N3HW.to(self.fc.weight.dtype) - self.mean) * 4.0

    def features(self, x_N3HW: Tensor) -> Tensor:
        h = self.pool(self.trunk(self._prep(x_N3HW)))
        return F.relu(self.fc(h.flatten(1)))

    def slot_logits(self, x_N3HW: Tensor) -> Dict[str, Tensor]:
        f_ND = self.features(x_N3HW)
        return self.heads(f_ND)

    def heads(self, f_ND: Tensor) -> Dict[str, Tensor]:
        n = f_ND.shape[0]
        return {
            "what": self.head_what(f_ND).view(n, NUM_SLOTS, NUM_WHAT),
            "size": self.head_size(f_ND).view(n, NUM_SLOTS, len(SIZES)),
        }

    @staticmethod
    def class_log_probs(what_NPW: Tensor) -> Tensor:
        """(N, 5, 25) slot logits -> (N, 24) log class distribution pooled over slots.

        p(class) = sum_p P(slot p = class) / sum_p P(slot p occupied): for one object, its
        class; for several, the mixture of their classes.
        """
        prob = what_NPW.float().softmax(-1)
        mass_NC = prob[..., 1:].sum(1)
        return (mass_NC / mass_NC.sum(-1, keepdim=True).clamp_min(1e-12)).clamp_min(1e-12).log()

    def logits(self, x_N3HW: Tensor) -> Dict[str, Tensor]:
        out = self.slot_logits(x_N3HW)
        out["class"] = self.class_log_probs(out["what"])
        return out

    def forward(self, x_N3HW: Tensor) -> Dict[str, Tensor]:
        return self.slot_logits(x_N3HW)

    def loss(self, logits: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        return slot_loss(logits, targets)

    @torch.no_grad()
    def predict_slots(self, x_N3HW: Tensor) -> Dict[str, Tensor]:
        out = self.slot_logits(x_N3HW)
        return {"what": out["what"].argmax(-1), "size": out["size"].argmax(-1)}

    @torch.no_grad()
    def predict_attributes(self, images: Tensor) -> List[Dict[str, Any]]:
        """Images (N, 3, H, W) in [0, 1] -> one scene-like dict per image:

        ``objects``: [{shape, colour, size, position}] in slot order; ``num_objects``;
        ``pair_counts``: {"red circle": 2, ...}; flat ``shape``/``colour``/``size``/
        ``position``/``count`` of the most frequent pair (``count`` 0 and no other flat key
        when nothing is detected). Runs in eval mode and restores the previous mode.
        """
        was_training = self.training
        self.eval()
        try:
            slots = self.predict_slots(images)
        finally:
            self.train(was_training)
        what, size = slots["what"].cpu().tolist(), slots["size"].cpu().tolist()
        return [describe_slots(w, s) for w, s in zip(what, size)]


@CLASSIFIERS.register("world_cnn")
def build_world_cnn(cfg: ClassifierConfig) -> WorldCNN:
    return WorldCNN(cfg)


def build_classifier(cfg: ClassifierConfig) -> nn.Module:
    """Build the classifier ``cfg.name`` selects (``world_cnn``)."""
    return CLASSIFIERS.build(cfg)

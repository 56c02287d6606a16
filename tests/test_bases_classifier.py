"""The world reference classifier (modules/components/classifier.py): targets, read-back, and the
interfaces evaluation uses (FID/IS extractor protocol, attribute accuracy)."""
from __future__ import annotations


import pytest
import torch

from modules.components.classifier import (
    CLASSIFIERS, IGNORE_INDEX, NUM_SLOTS, NUM_WHAT, ClassifierConfig, build_classifier, describe_slots,
    scene_targets, slot_loss,
)


def _scene(*objs):
    return {"objects": [dict(zip(("shape", "colour", "size", "position"), o)) for o in objs]}


def test_registered_and_unknown_name_lists_choices():
    assert "world_cnn" in CLASSIFIERS.names()
    with pytest.raises(KeyError, match="world_cnn"):
        build_classifier(ClassifierConfig(name="nope"))


def test_scene_targets_roundtrip_through_describe_slots():
    from datamodules.world import class_label

    scene = _scene(("circle", "red", "large", "left"), ("circle", "red", "small", "top"), ("cross", "blue", "small", "centre"))
    t = scene_targets(scene)
    assert t["what"].tolist() == [1 + class_label("circle", "red"), 0, 1 + class_label("circle", "red"), 0,
                                  1 + class_label("cross", "blue")]
    assert t["size"].tolist() == [1, IGNORE_INDEX, 0, IGNORE_INDEX, 0]
    d = describe_slots(t["what"].tolist(), [max(s, 0) for s in t["size"].tolist()])
    assert d["num_objects"] == 3
    assert d["pair_counts"] == {"red circle": 2, "blue cross": 1}
    # flat keys describe the most frequent pair: what a one-pair prompt asks for
    assert (d["shape"], d["colour"], d["count"], d["position"], d["size"]) == ("circle", "red", 2, "left", "large")
    assert [o["position"] for o in d["objects"]] == ["left", "top", "centre"]


def test_scene_targets_rejects_two_objects_at_one_position():
    with pytest.raises(ValueError, match="two objects"):
        scene_targets(_scene(("circle", "red", "large", "left"), ("square", "blue", "small", "left")))


def test_empty_prediction_has_count_zero():
    d = describe_slots([0] * NUM_SLOTS, [0] * NUM_SLOTS)
    assert d["count"] == 0 and d["objects"] == [] and "shape" not in d


def test_shapes_and_input_convention():
    torch.manual_seed(0)
    clf = build_classifier(ClassifierConfig(width=8, feature_dim=32)).eval()
    x = torch.rand(4, 3, 64, 64)
    assert clf.features(x).shape == (4, 32) and clf.num_features == 32
    lg = clf.logits(x)
    assert lg["what"].shape == (4, NUM_SLOTS, NUM_WHAT) and lg["size"].shape == (4, NUM_SLOTS, 2)
    # "class" is a log distribution over the 24 world classes (the IS head)
    torch.testing.assert_close(lg["class"].exp().sum(-1), torch.ones(4))
    # uint8 images are scaled to [0, 1]: same result as the float image
    x8 = (x * 255).round().to(torch.uint8)
    torch.testing.assert_close(clf.features(x8), clf.features(x8.float() / 255))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        clf.features(torch.rand(4, 64, 64))
    # predict_attributes restores the training mode it found
    clf.train()
    clf.predict_attributes(x)
    assert clf.training


def test_slot_loss_ignores_size_of_empty_slots():
    logits = {"what": torch.zeros(2, NUM_SLOTS, NUM_WHAT), "size": torch.randn(2, NUM_SLOTS, 2) * 50}
    tg = {"what": torch.zeros(2, NUM_SLOTS, dtype=torch.long), "size": torch.full((2, NUM_SLOTS), IGNORE_INDEX)}
    out = slot_loss(logits, tg)
    assert float(out["size"]) == 0.0
    torch.testing.assert_close(out["what"], torch.log(torch.tensor(float(NUM_WHAT))))


def _world_batch(n: int, seed: int = 0):
    from datamodules.world import make_sample

    imgs, scenes = [], []
    for i in range(n):
        rec, png = make_sample(seed, "train", "class", i)
        import io

        import numpy as np
        from PIL import Image

        imgs.append(torch.from_numpy(np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))).permute(2, 0, 1))
        scenes.append(rec["scene"])
    return torch.stack(imgs).float() / 255, scenes


def test_trains_on_world_scenes_and_reads_them_back():
    """A few hundred steps on 64 one-object scenes: the read-back matches the scene."""
    from modules.metrics import attribute_scores, requested_groups

    torch.manual_seed(0)
    x, scenes = _world_batch(64)
    tg = {k: torch.stack([scene_targets(s)[k] for s in scenes]) for k in ("what", "size")}
    clf = build_classifier(ClassifierConfig(width=8, feature_dim=64))
    opt = torch.optim.AdamW(clf.parameters(), lr=3e-3)
    for _ in range(80):
        loss = slot_loss(clf(x), tg)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    # the prompt states shape, colour and position of the one object (count 1)
    requested = [requested_groups({"scene": s, "checks": {"position": True}}) for s in scenes]
    acc = attribute_scores(clf, x, requested)
    assert acc["all"] > 0.9, acc


def test_serves_as_fid_is_extractor():
    from modules.metrics_generation import GenMetricsConfig, build_feature_extractor

    clf = build_classifier(ClassifierConfig(width=8, feature_dim=32))
    ext = build_feature_extractor(GenMetricsConfig(extractor="world", is_heads=["class"]), world_classifier=clf)
    feats, logits = ext.features_and_logits(torch.rand(3, 3, 64, 64))
    assert feats.shape == (3, 32) and logits.shape == (3, 24)

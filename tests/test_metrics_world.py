"""World attribute accuracy: requested prompt attributes vs what a classifier reads back."""
import math

import pytest
import torch

from modules.metrics import WorldAttributeAccuracy, world_attribute_accuracy

REQUESTED = [
    {"shape": "circle", "colour": "red", "count": 2, "position": "left"},
    {"shape": "square", "colour": "blue"},
    {"shape": "triangle"},
    {"colour": "Green", "count": 1},
]
# What a classifier "sees" in the four images.
PREDICTED = [
    {"shape": "circle", "colour": "red", "count": "2", "position": "left", "size": "small"},
    {"shape": "square", "colour": "green", "count": 1},
    {"shape": "circle", "colour": "red"},
    {"colour": "green"},  # no count predicted -> wrong
]


def classifier_over(predictions):
    seen = []

    def classify(images):
        seen.append(images.shape[0])
        return predictions[: images.shape[0]]

    classify.seen = seen
    return classify


def test_per_attribute_and_all_correct():
    images = torch.zeros(4, 3, 8, 8)
    clf = classifier_over(PREDICTED)
    out = world_attribute_accuracy(images, REQUESTED, clf)
    assert clf.seen == [4]
    assert out["shape"] == pytest.approx(2 / 3)  # circle ok, square ok, triangle wrong
    assert out["colour"] == pytest.approx(2 / 3)  # red ok, blue wrong, Green == green
    assert out["count"] == pytest.approx(1 / 2)  # 2 == "2"; missing prediction is wrong
    assert out["position"] == 1.0
    assert out["all"] == pytest.approx(1 / 4)
    assert out["n"] == 4
    assert "size" not in out  # never requested


def test_metric_accumulates_and_reports_unrequested_as_nan():
    metric = WorldAttributeAccuracy(classifier_over(PREDICTED))
    metric.update(torch.zeros(2, 3, 8, 8), REQUESTED[:2])
    metric.update_predictions(PREDICTED[2:], REQUESTED[2:])
    out = metric.compute()
    assert out["all"].item() == pytest.approx(1 / 4)
    assert out["shape"].item() == pytest.approx(2 / 3)
    assert math.isnan(out["size"].item())
    assert int(out["n"]) == 4


def test_errors_name_the_problem():
    metric = WorldAttributeAccuracy()
    with pytest.raises(KeyError, match="color"):
        metric.update_predictions([{"color": "red"}], [{"color": "red"}])
    with pytest.raises(ValueError, match="one dict per image"):
        metric.update_predictions([{}], REQUESTED[:2])
    with pytest.raises(RuntimeError, match="without a classifier"):
        metric.update(torch.zeros(1, 3, 8, 8), REQUESTED[:1])

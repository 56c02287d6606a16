"""World attribute accuracy: requested prompt groups vs the scene a classifier reads back.

One scorer (modules/metrics_world.py) for the loop, experiments.evaluate and the scoreboard."""
import pytest
import torch

from modules.evaluation import report_metrics
from modules.metrics import (WorldAttributeAccuracy, attribute_scores, check_scene, requested_groups,
                             requested_objects, scores_by_objects)


def obj(shape, colour, position="left", size="small"):
    return {"shape": shape, "colour": colour, "position": position, "size": size}


# Four prompts as world records: what they ask for (scene + which attributes the text states).
RECORDS = [
    {"scene": {"objects": [obj("circle", "red", "left"), obj("circle", "red", "right")]}, "checks": {"position": True}},
    {"scene": {"objects": [obj("square", "blue")]}, "checks": {}},
    {"scene": {"objects": [obj("triangle", "green", size="large")]}, "checks": {"size": True}},
    {"scene": {"objects": [obj("cross", "black"), obj("circle", "red", "top")]}, "checks": {}},
]
REQUESTED = [requested_groups(r) for r in RECORDS]
# What a classifier "sees" in the four images.
PREDICTED = [
    {"objects": [obj("circle", "red", "left"), obj("circle", "red", "right")]},   # all right
    {"objects": [obj("square", "green")]},                                         # wrong colour
    {"objects": [obj("triangle", "green", size="small")]},                         # wrong size
    {"objects": [obj("cross", "black"), obj("circle", "red"), obj("circle", "red", "top")]},  # count 2 != 1
]


def test_groups_and_checks():
    assert REQUESTED[0] == [{"shape": "circle", "colour": "red", "count": 2, "positions": ["left", "right"]}]
    assert "positions" not in REQUESTED[1][0] and "sizes" in REQUESTED[2][0]
    assert check_scene(REQUESTED[0], PREDICTED[0]) == {"object": True, "count": True, "position": True,
                                                       "exact": True, "all": True, "colour": True, "shape": True}
    r1 = check_scene(REQUESTED[1], PREDICTED[1])  # a green square for a blue one: shape right, colour not
    assert r1["object"] is False and r1["shape"] is True and r1["colour"] is False
    assert check_scene(REQUESTED[2], PREDICTED[2]) == {"object": True, "count": True, "size": False,
                                                       "exact": True, "all": False, "colour": True, "shape": True}
    r3 = check_scene(REQUESTED[3], PREDICTED[3])
    assert r3["object"] and not r3["count"] and not r3["exact"] and not r3["all"]


def test_colour_and_shape_without_binding():
    # a red circle and a blue square asked for; a blue circle and a red square drawn: both colours
    # and both shapes are there, neither object is
    asked = requested_groups({"scene": {"objects": [obj("circle", "red"), obj("square", "blue")]}, "checks": {}})
    r = check_scene(asked, {"objects": [obj("circle", "blue"), obj("square", "red")]})
    assert r["colour"] and r["shape"] and not r["object"] and not r["all"]


def test_metric_per_attribute_mean_and_accumulation():
    m = WorldAttributeAccuracy()
    m.update(PREDICTED[:1], REQUESTED[:1])
    m.update(PREDICTED[1:], REQUESTED[1:])
    out = {k: float(v) for k, v in m.compute().items()}
    assert out["object"] == pytest.approx(3 / 4) and out["count"] == pytest.approx(2 / 4)
    assert out["position"] == 1.0 and out["size"] == 0.0  # each over the one prompt requesting it
    assert out["all"] == pytest.approx(1 / 4) and out["exact"] == pytest.approx(2 / 4)
    # mean over every requested attribute: object 3/4 + count 2/4 + position 1/1 + size 0/1 -> 6/10
    assert out["mean"] == pytest.approx(6 / 10) and out["n"] == 4


def test_attribute_scores_runs_the_classifier_in_batches():
    seen = []

    class Clf:
        def predict_attributes(self, images):
            seen.append(images.shape[0])
            return PREDICTED[sum(seen) - images.shape[0]: sum(seen)]

    out = attribute_scores(Clf(), torch.zeros(4, 3, 8, 8), REQUESTED, batch=3)
    assert seen == [3, 1] and out["mean"] == pytest.approx(6 / 10) and "n" not in out
    assert out["by_objects"] == scores_by_objects(PREDICTED, REQUESTED)  # the same single classifier pass


def test_scores_by_number_of_requested_objects():
    assert [requested_objects(g) for g in REQUESTED] == [2, 1, 1, 2]
    by = scores_by_objects(PREDICTED, REQUESTED)
    assert list(by) == ["1", "2"] and by["1"]["prompts"] == 2 and by["2"]["prompts"] == 2
    # one object: prompt 1 wrong colour (object/count false), prompt 2 wrong size -> object 1/2,
    # count 1/2, size 0/1: mean 2/5
    assert by["1"]["object"] == pytest.approx(1 / 2) and "position" not in by["1"]
    assert by["1"]["mean"] == pytest.approx(2 / 5)
    # two objects: prompt 0 all right, prompt 3 count wrong -> object 2/2, count 1/2, position 1/1
    assert by["2"]["count"] == pytest.approx(1 / 2) and by["2"]["mean"] == pytest.approx(4 / 5)
    # the report's flattening names each part (MLflow metrics, in-loop val/...)
    flat = report_metrics({"gen_attribute_accuracy": 0.6, "gen_attr_by_objects": by}, "eval/")
    assert flat["eval/gen_attr_objects2_mean"] == pytest.approx(4 / 5) and flat["eval/gen_attr_objects1_mean"] == pytest.approx(2 / 5)
    assert "eval/gen_attr_objects1_prompts" not in flat  # the rest stays in the report JSON


def test_errors_name_the_problem():
    m = WorldAttributeAccuracy()
    with pytest.raises(ValueError, match="one scene per image"):
        m.update(PREDICTED[:1], REQUESTED[:2])
    with pytest.raises(RuntimeError, match="before any update"):
        WorldAttributeAccuracy().compute()

"""VQA accuracy equals the lmms-eval VQAv2 scorer (its test vectors in tests/fixtures/) and EvalAI's rules.

The 2-process gather test lives in test_metrics_distributed.py (one spawn for all metrics).
"""
import json
import statistics

import pytest
import torch

from modules.metrics import (
    ExactMatchAccuracy,
    VQAAccuracy,
    exact_match,
    normalize_vqa_answer,
    vqa_accuracy,
)

from tests.conftest import FIXTURES, require_fixture

VECTORS = FIXTURES / "vqav2_scoring_vectors.json"


def load_cases():
    return json.loads(require_fixture(VECTORS).read_text())["cases"]


def test_every_shared_vector_matches_exactly():
    cases = load_cases()
    assert len(cases) == 400
    wrong = []
    for i, c in enumerate(cases):
        norm = normalize_vqa_answer(c["prediction"])
        acc = vqa_accuracy(c["prediction"], c["answers"])
        if norm != c["normalized_prediction"] or acc != c["accuracy"] or not isinstance(acc, float):
            wrong.append((i, c["prediction"], norm, acc, c["normalized_prediction"], c["accuracy"]))
    assert not wrong, f"{len(wrong)} cases differ from the lmms-eval scorer, first: {wrong[:3]}"


def test_metric_over_uneven_batches_equals_mean_of_vectors():
    cases = load_cases()
    metric = VQAAccuracy()
    for start, stop in [(0, 7), (7, 150), (150, 151), (151, 400)]:
        chunk = cases[start:stop]
        metric.update([c["prediction"] for c in chunk], [c["answers"] for c in chunk])
    value = metric.compute()
    assert value.dtype == torch.float64
    expected = statistics.mean(c["accuracy"] for c in cases)
    assert abs(value.item() - expected) < 1e-12
    metric.reset()
    # torchmetrics warns about compute-before-update too; ours raises so a miswired eval fails.
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="before any update"):
        metric.compute()


def test_kept_scores_are_the_per_question_vectors():
    cases = load_cases()
    metric = VQAAccuracy(keep_scores=True)
    for start, stop in [(0, 3), (3, 200), (200, 400)]:
        chunk = cases[start:stop]
        metric.update([c["prediction"] for c in chunk], [c["answers"] for c in chunk])
    kept = metric.per_sample()
    assert kept.dtype == torch.float64 and kept.tolist() == [c["accuracy"] for c in cases]
    assert abs(kept.mean().item() - metric.compute().item()) < 1e-12
    metric.reset()
    assert metric.per_sample().numel() == 0
    with pytest.raises(RuntimeError, match="keep_scores=True"):
        VQAAccuracy().per_sample()


@pytest.mark.parametrize(
    "n_matching, expected",
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_leave_one_out_min_matches_over_three(n_matching, expected):
    answers = ["red"] * n_matching + ["blue", "green"] * 5
    answers = answers[:10]
    assert vqa_accuracy("Red.", answers) == expected


def test_reference_quirks_are_kept():
    # All ten stripped answers identical: the reference compares them raw (not lower-cased).
    assert vqa_accuracy("yes", ["Yes"] * 10) == 0.0
    assert vqa_accuracy("yes", ["Yes"] * 9 + ["yes"]) == 1.0  # not identical: both normalised
    assert vqa_accuracy("Yes", [" yes\n"] * 10) == 1.0  # strip + newline handling still applies
    # Punctuation next to a space is deleted, otherwise it becomes a space.
    assert normalize_vqa_answer("red/white") == "red white"
    assert normalize_vqa_answer("red / white") == "red white"
    # A digit-comma-digit group makes every mark disappear without a space (word_tokenize has
    # already removed commas from predictions, so only answers can show this).
    assert vqa_accuracy("3000", ["3,000", "3,000", "3,000", "4"] + ["x"] * 6) == 0.9
    # Decimal points survive, other periods go; number words, articles, contractions.
    assert normalize_vqa_answer("The 1.5 m. pole") == "1.5 m pole"
    assert normalize_vqa_answer("Two dogs") == "2 dogs"
    assert normalize_vqa_answer("none") == "0"
    assert normalize_vqa_answer("an apple") == "apple"
    assert normalize_vqa_answer("dont know") == "don't know"
    assert normalize_vqa_answer("it's") == "it 's"
    # At most 32 periods are removed (the reference passes re.UNICODE as the count).
    assert normalize_vqa_answer("." * 40) == "." * 8


def test_single_answer_is_normalised_exact_match():
    assert vqa_accuracy("Two", ["2"]) == 1.0
    assert vqa_accuracy("the circle", ["circle"]) == 1.0
    assert vqa_accuracy("square", ["circle"]) == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        vqa_accuracy("x", [])


def test_exact_match_accuracy():
    metric = ExactMatchAccuracy()
    metric.update(
        ["Yes", "the red one", "3", "left"], ["yes", "red one", "three", ["right", "Left."]]
    )
    metric.update(["no"], ["yes"])
    assert metric.compute().item() == pytest.approx(4 / 5)
    assert exact_match("a Circle!", "circle") == 1.0
    with pytest.raises(ValueError, match="2 predictions but 1"):
        metric.update(["a", "b"], ["a"])


def test_evaluate_vqa_scores_once_for_mean_interval_and_types():
    """evaluate_vqa's per-type means, overall mean and intervals all come from one scoring of each
    answer (VQAAccuracy(keep_scores=True)); checked against vqa_accuracy on a stub model."""
    from modules.config import EvalConfig
    from modules.evaluation import evaluate_vqa

    cases = load_cases()[:40]
    samples = [{"key": str(i), "images": [None],
                "record": {"messages": [{"role": "user", "content": f"q{i}"}], "answers": c["answers"],
                           "question_type": "color" if i % 3 else "count"}}
               for i, c in enumerate(cases)]

    class Stub:  # with the image: the scorer's recorded prediction; blind (no image): "no"
        def answer(self, images, qs, max_new_tokens=0):
            return [cases[int(q[1:])]["prediction"] if im is not None else "no" for im, q in zip(images, qs)]

    samples = [{**s, "images": ["img"]} for s in samples]
    out = evaluate_vqa(Stub(), samples, EvalConfig(batch_size=7, blind_baseline=True))
    want = [c["accuracy"] for c in cases]
    blind = [vqa_accuracy("no", c["answers"]) for c in cases]
    assert abs(out["vqa_blind_baseline"] - statistics.mean(blind)) < 1e-12
    assert abs(out["vqa_accuracy"] - statistics.mean(want)) < 1e-12
    for t in ("color", "count"):
        sub = [w for i, w in enumerate(want) if (t == "color") == bool(i % 3)]
        assert abs(out["vqa_per_type"][t] - statistics.mean(sub)) < 1e-12
    lo, hi = out["vqa_accuracy_ci95"]
    assert lo <= out["vqa_accuracy"] <= hi and hi - lo > 0

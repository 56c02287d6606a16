"""eval.best_of: N draws per prompt, the model's own understanding keeps one (modules/self_verify.py)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from datamodules.world import (CAPTION_PROMPTS, COLOURS, GEN_FORMS, SHAPES, VQA_SUFFIX, describe_request, implied_questions,
                               make_sample, parse_prompt, question_candidates)
from modules.config import EvalConfig
from modules.evaluation import evaluate_generation, generate_for
from modules.metrics_world import requested_groups
from modules.scoring import loglikelihood
from modules.self_verify import draw_seed, pick_best, pick_summary, prompt_questions, understanding_scores
from modules.vargpt import VARGPT
from tests.tiny import tiny_model_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    return VARGPT(tiny_model_config(tmp_path_factory.mktemp("tiny"))).eval()


def _gen_records(n: int, split: str = "val"):
    return [make_sample(7, split, "gen", i, size=32)[0] for i in range(n)]


def _prompt(rec) -> str:
    return next(m["content"] for m in rec["messages"] if m["role"] == "user")


def _key(groups):
    return sorted((g["shape"], g["colour"], g["count"], tuple(sorted(g.get("positions", ())))) for g in groups)


@pytest.mark.parametrize("split", ["train", "val", "test", "heldout"])
def test_parse_prompt_reads_back_what_every_world_prompt_asks_for(split):
    """The words alone give the scorer's requested groups: shapes, colours, counts, and the
    positions exactly when the prompt states them (sizes where one is written for the group)."""
    for rec in _gen_records(150, split):
        groups = requested_groups(rec)
        parsed = parse_prompt(_prompt(rec))
        assert _key(parsed) == _key(groups), (_prompt(rec), parsed, groups)
        for p in parsed:
            if "size" in p:  # written only when all of the group share it
                g = next(g for g in groups if (g["shape"], g["colour"]) == (p["shape"], p["colour"]))
                assert set(g.get("sizes", [p["size"]])) == {p["size"]}


@pytest.mark.parametrize("split", ["val", "test"])
def test_describe_request_gives_back_the_description_each_prompt_was_written_from(split):
    for rec in _gen_records(150, split):
        p = _prompt(rec)
        d = describe_request(parse_prompt(p))
        assert any(p == f.format(d=d) for f in GEN_FORMS), (p, d)


def test_parse_prompt_on_free_text():
    assert parse_prompt("Please design a drawing of a butterfly on a flower.") == []
    assert parse_prompt("An image of two large Blue crosses at the top and at the bottom, and a green circle") == [
        {"shape": "cross", "colour": "blue", "count": 2, "size": "large", "positions": ["top", "bottom"]},
        {"shape": "circle", "colour": "green", "count": 1}]


def test_implied_questions_are_training_questions_with_the_scene_answers():
    """Every implied question is one the world's VQA data asks about that scene (same wording,
    suffix included) with the same answer; positions only when the prompt states them."""
    all_pairs = [(s, c) for s in SHAPES for c in COLOURS]
    seen_position = seen_no_position = 0
    for rec in _gen_records(60):
        scene = rec["scene"]
        truth = {q: a for qt in ("colour", "shape", "count", "position", "exist")
                 for q, a in question_candidates(scene, qt, all_pairs)}
        qs = implied_questions(requested_groups(rec))
        assert qs and all(q.endswith(f" {VQA_SUFFIX}") for q, _ in qs)
        for q, a in qs:
            bare = q[: -len(VQA_SUFFIX) - 1]
            assert truth.get(bare) == a, (rec["messages"][0]["content"], bare, a, truth.get(bare))
        asks_where = any(q.startswith("Where is") for q, _ in qs)
        if rec["checks"]["position"]:
            seen_position += asks_where
        else:
            assert not asks_where, "a prompt without positions fixes no position"
            seen_no_position += 1
        n_objects = len(scene["objects"])
        assert ("How many objects are there? " + VQA_SUFFIX, str(n_objects)) in qs
    assert seen_position and seen_no_position  # both kinds of prompt were checked


def test_prompt_questions_refuse_prompts_without_world_objects():
    got = prompt_questions(["Draw a red circle.", "two blue squares on the left and at the top"])
    assert got[0] == implied_questions(parse_prompt("a red circle")) + [(CAPTION_PROMPTS[0], "There is a red circle.")]
    assert got[1][-1] == (CAPTION_PROMPTS[0], "There is two blue squares on the left and at the top.")
    assert got[1][:-1] == implied_questions(parse_prompt("two blue squares on the left and at the top"))
    with pytest.raises(ValueError, match=r"val-gen-000001 names no world object: 'Draw a cat.'.*eval.best_of=1, infer --best-of 1"):
        prompt_questions(["Draw a red circle.", "Draw a cat."], ["val-gen-000000", "val-gen-000001"])


def test_pick_best_takes_the_highest_score_first_on_ties():
    draws = [torch.full((3, 2), float(k)) for k in range(3)]
    scores = torch.tensor([[0.0, 5.0, 1.0], [2.0, 5.0, -1.0], [1.0, 4.0, 0.5]])
    images, pick = pick_best(draws, scores)
    assert pick.tolist() == [1, 0, 0]
    assert images[:, 0].tolist() == [1.0, 0.0, 0.0]
    assert pick_summary(pick, 3) == pytest.approx({"draw0": 2 / 3, "draw1": 1 / 3, "draw2": 0.0})
    with pytest.raises(ValueError, match="scores of shape"):
        pick_best(draws, scores[:2])


def test_understanding_scores_sum_the_answers_log_probabilities(tiny):
    from torchvision.transforms.functional import to_pil_image

    torch.manual_seed(1)
    images = torch.rand(2, 3, 32, 32)
    questions = [[("How many objects are there?", "2"), ("Is there a red circle in the image?", "yes")],
                 [("What colour is the square?", "blue")]]
    got = understanding_scores(tiny, images, questions, batch_size=2)
    pil = [to_pil_image(im) for im in images]
    ref = [sum(r.logprob for r in loglikelihood(tiny, [pil[i]] * len(qs), [q for q, _ in qs], [a for _, a in qs]))
           for i, qs in enumerate(questions)]
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64), atol=1e-4, rtol=1e-5)
    # a different image changes the judgement: the score reads the picture
    assert not torch.allclose(understanding_scores(tiny, images.flip(0), questions), got)


def test_best_of_keeps_one_of_its_draws_and_draw_zero_is_the_single_draw_protocol(tiny):
    recs = _gen_records(3)
    samples = [{"record": r, "key": f"k{i}", "url": "u"} for i, r in enumerate(recs)]
    prompts = [_prompt(r) for r in recs]
    e1 = EvalConfig(batch_size=2, cfg=1.5, top_k=50, prompt_gain_samples=0)
    e3 = replace(e1, best_of=3)
    one = evaluate_generation(tiny, samples, e1)
    three = evaluate_generation(tiny, samples, e3)
    draws = [generate_for(tiny, prompts, replace(e1, seed=draw_seed(e1.seed, k))) for k in range(3)]
    torch.testing.assert_close(draws[0], one["gen_images"])  # draw 0 = best_of 1
    assert not torch.allclose(draws[0], draws[1])  # the draws differ
    scores = torch.stack([understanding_scores(tiny, d, prompt_questions(prompts), 2) for d in draws])
    want = scores.argmax(0)
    for i in range(3):
        torch.testing.assert_close(three["gen_images"][i], draws[int(want[i])][i])
    kept = three["gen_best_of_kept"]
    assert set(kept) == {"draw0", "draw1", "draw2"} and sum(kept.values()) == pytest.approx(1.0)
    assert "gen_best_of_kept" not in one


def test_best_of_on_prompts_without_world_objects_is_refused(tiny):
    samples = [{"record": {"messages": [{"role": "user", "content": t}]}, "key": f"k{i}", "url": "u"}
               for i, t in enumerate(["Draw a red circle.", "A photo of a dog."])]
    with pytest.raises(ValueError, match="k1 names no world object.*eval.best_of=1"):
        evaluate_generation(tiny, samples, EvalConfig(batch_size=2, best_of=2, prompt_gain_samples=0))


def test_loglikelihood_runs_the_vision_tower_once_per_distinct_image(tiny, monkeypatch):
    """Requests that show the same image object share one vision pass, and score exactly as
    requests given separate copies of it."""
    from PIL import Image

    img = Image.new("RGB", (32, 32), (200, 30, 30))
    copies = [img.copy() for _ in range(3)]
    ctx = ["What colour is the circle?", "How many objects are there?", "Is there a red circle in the image?"]
    ans = ["red", "1", "yes"]
    calls = []
    real = tiny.image_features
    monkeypatch.setattr(tiny, "image_features", lambda px: calls.append(len(px)) or real(px))
    shared = loglikelihood(tiny, [img] * 3, ctx, ans, batch_size=3)
    assert calls == [1]
    separate = loglikelihood(tiny, copies, ctx, ans, batch_size=3)
    assert calls == [1, 3]
    for a, b in zip(shared, separate):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5) and a.is_greedy == b.is_greedy

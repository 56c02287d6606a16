"""modules/scoring.py: the log-likelihood of continuations and lmms-eval's generation settings
(no lmms-eval needed: these run in every CI)."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from modules.scoring import (ContinuationScore, GenerationSettings, answer_batch, encode_continuation,
                             generation_settings, loglikelihood, shared_prefix, truncate_at)
from modules.vargpt import VARGPT
from tests.tiny import tiny_model_config, und_sample


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    torch.manual_seed(0)
    return VARGPT(tiny_model_config(tmp_path_factory.mktemp("scoring"))).eval()


def _img(c):
    return Image.new("RGB", (32, 32), c)


def test_loglikelihood_with_eos_is_the_training_text_loss(net):
    """include_eos=True scores exactly the tokens the training forward supervises."""
    samples = [und_sample("a", "What colour is the circle?", "red", (200, 30, 30)),
               und_sample("b", "How many objects are there?", "two circles", (30, 30, 200))]
    batch = net.collator()(samples)
    with torch.no_grad():
        loss = net(batch)["loss_text_per_sample"]
    got = loglikelihood(net, [s["images"][0] for s in samples],
                        ["What colour is the circle?", "How many objects are there?"], ["red", "two circles"],
                        include_eos=True)
    for g, l in zip(got, loss):
        assert isinstance(g, ContinuationScore)
        assert g.mean_nll == pytest.approx(float(l), rel=1e-5, abs=1e-5)


def test_loglikelihood_does_not_depend_on_the_batch(net):
    images = [_img((200, 30, 30)), None, _img((30, 200, 30)), None]
    ctxs = ["What colour is the circle?", "Is there a blue triangle?", "Where is the red cross? Answer with a single word.", "Hi"]
    conts = ["red", "yes", "on the left", "no"]
    together = loglikelihood(net, images, ctxs, conts, batch_size=4)
    alone = [loglikelihood(net, [i], [c], [t], batch_size=1)[0] for i, c, t in zip(images, ctxs, conts)]
    for a, b in zip(together, alone):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4) and a.n_tokens == b.n_tokens
        assert a.is_greedy == b.is_greedy


def test_shared_prefix_is_the_common_start_of_rows_that_show_the_same_image():
    # (ids, positions of the scored tokens); rows 0-2 show image "a", row 3 image "b"
    encs = [([1, 2, 3, 4, 5, 9], [5]), ([1, 2, 3, 4, 6, 9], [5]), ([1, 2, 3, 7, 7, 9, 9], [6]), ([1, 2, 8, 8], [3])]
    assert shared_prefix(encs, ["a", "a", "a", "b"]) == (2, [0, 0, 0, 1])  # bounded by row 3's first scored token - 1
    assert shared_prefix(encs[:3], ["a", "a", "a"]) == (3, [0, 0, 0])
    assert shared_prefix(encs[:2], ["a", "b"]) == (0, [])  # no two rows share an image: nothing to share
    assert shared_prefix([([5, 1], [1]), ([6, 1], [1])], [None, None]) == (0, [])  # differ at the first token


def test_requests_of_one_image_run_their_common_prefix_once(net, monkeypatch):
    """A judge's questions about one image: the system prompt and image slots go through the LLM
    once per image, and every score equals the one of a request scored alone."""
    a, b = _img((200, 30, 30)), _img((30, 30, 200))
    images = [a, a, a, b, b]
    ctxs = ["What colour is the circle?", "How many objects are there?", "Is there a red circle in the image?",
            "What colour is the circle?", "Where is the blue square? Answer with a single word."]
    conts = ["red", "1", "yes", "blue", "on the left"]
    lengths = []
    real = net.run_llm
    monkeypatch.setattr(net, "run_llm", lambda emb, *a, **k: lengths.append(tuple(emb.shape[:2])) or real(emb, *a, **k))
    together = loglikelihood(net, images, ctxs, conts, batch_size=5)
    (g, p), (rows, rest) = lengths
    assert g == 2 and rows == 5 and p > net.num_image_tokens  # one prefix per image, covering its slots
    lengths.clear()
    alone = [loglikelihood(net, [i], [c], [t], batch_size=1)[0] for i, c, t in zip(images, ctxs, conts)]
    assert all(n == 1 for n, _ in lengths)  # alone: one plain forward each
    for x, y in zip(together, alone):
        assert x.logprob == pytest.approx(y.logprob, abs=1e-5) and x.n_tokens == y.n_tokens
        assert x.is_greedy == y.is_greedy


def test_loglikelihood_matches_a_plain_full_sequence_computation(net):
    """Same numbers as scoring the whole sequence with full logits, one request at a time; the
    EOS is excluded by default and the boundary whitespace is the template's separator."""
    col = net.collator()
    im = _img((200, 30, 30))
    for cont in ("red", " red", "red "):
        ids, pos = encode_continuation(col, "What colour is the circle?", cont, True)
        x = torch.tensor([ids])
        with torch.no_grad():
            emb, _, _, _ = net.embed({"input_ids": x, "pixel_values": net.vision.image_transform()(im)[None]},
                                     with_gen=False)
            logits = net.llm.get_output_embeddings()(net.run_llm(emb, torch.ones_like(x)).last_hidden_state)[0]
        lp = logits.float().log_softmax(-1)
        want = sum(float(lp[p - 1, ids[p]]) for p in pos)
        greedy = all(int(lp[p - 1].argmax()) == ids[p] for p in pos)
        (got,) = loglikelihood(net, [im], ["What colour is the circle?"], [cont])
        assert got.logprob == pytest.approx(want, abs=1e-4) and got.is_greedy == greedy
        assert ids[pos[-1]] != net.tokenizer.eos_token_id  # EOS not scored by default
        assert got.n_tokens == len(pos)
    a, b, c = loglikelihood(net, [im] * 3, ["What colour is the circle?"] * 3, ["red", " red", "red "])
    assert a == b == c


def test_a_greedy_continuation_is_flagged_greedy(net):
    """With the LM head rigged to always prefer one token, that answer is greedy, another is not."""
    import copy

    rigged = copy.deepcopy(net)
    col = rigged.collator()
    ids, pos = encode_continuation(col, "What colour is the circle?", "red", True)
    assert len(pos) == 1  # " red" is one token of the tiny tokenizer
    head = rigged.llm.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[ids[pos[0]]] = 1e4
    rigged.llm.set_output_embeddings(biased)
    im = _img((30, 30, 200))
    red, blue = loglikelihood(rigged, [im, im], ["What colour is the circle?"] * 2, ["red", "blue"])
    assert red.is_greedy and not blue.is_greedy and red.logprob > blue.logprob
    (red_eos,) = loglikelihood(rigged, [im], ["What colour is the circle?"], ["red"], include_eos=True)
    assert red_eos.n_tokens == 2 and not red_eos.is_greedy  # after " red" the rigged head says " red" again


def test_generation_settings_follow_lmms_eval_conventions():
    s = generation_settings({"max_new_tokens": 16, "temperature": 0, "top_p": 1.0, "num_beams": 1,
                             "do_sample": False, "until": "\n\n"})
    assert s == GenerationSettings(max_new_tokens=16, do_sample=False, temperature=1.0, top_p=0.0, top_k=0,
                                   until=["\n\n"])
    assert generation_settings(None).max_new_tokens == 1024 and not generation_settings(None).do_sample
    t = generation_settings({"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 64}, max_new_tokens_cap=8)
    assert t.do_sample and t.temperature == 0.7 and t.top_p == 0.9 and t.max_new_tokens == 8
    assert not generation_settings({"temperature": 0.7, "do_sample": False}).do_sample
    with pytest.raises(ValueError, match="beam"):
        generation_settings({"num_beams": 4})
    assert truncate_at("yes\n\nUSER: more", ["\n\n", "USER:"]) == "yes"
    assert truncate_at("no stop here", []) == "no stop here"


def test_answer_batch_is_net_answer_with_stop_strings(net):
    images = [_img((200, 30, 30)), None]
    qs = ["What colour is the circle?", "Say something."]
    s = generation_settings({"max_new_tokens": 5, "until": ["\n\n"]})
    assert answer_batch(net, images, qs, s) == [truncate_at(p, ["\n\n"]) for p in net.answer(images, qs, max_new_tokens=5)]
    # a context that carries the harness's <image> is answered as if it did not
    assert answer_batch(net, images[:1], ["<image>\nWhat colour is the circle?"], s) == answer_batch(net, images[:1], qs[:1], s)

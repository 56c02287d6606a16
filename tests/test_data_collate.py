"""Collation on hand-built samples: expanded spans, label masks, clipping, dropout, prompts."""
import pytest
import torch

from datamodules.collate import (
    Collator,
    build_prompt,
    null_generation_messages,
    null_generation_prompt,
)
from datamodules.config import ChatTemplateConfig
from datamodules.testing import decoded_sample
from tests.tiny import tiny_tokenizer
from datamodules.tokens import GEN_END, GEN_PAD, GEN_START, IGNORE_INDEX, IMAGE_TOKEN
from datamodules.transforms import GenTransform
from modules.components.vision_encoders import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageTransform

N_IMG, L = 4, 14  # vision tokens per image; sum(pn^2) for patch_nums (1, 2, 3)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def make(tok, **kw):
    kw.setdefault("max_length", 512)
    return Collator(tok, N_IMG, L, ImageTransform(16, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "crop"), GenTransform(8), gen_patch_nums=(1, 2, 3), **kw)


UND = [
    {"role": "user", "content": "<image>\nWhat colour is the circle?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "How many objects are there?"},
    {"role": "assistant", "content": "2"},
]
GEN = [
    {"role": "user", "content": "Draw a red circle on the left."},
    {"role": "assistant", "content": "<image_gen>"},
]


def supervised_text(tok, ids, labels):
    return [tok.convert_ids_to_tokens(int(i)) for i, l in zip(ids, labels) if l != IGNORE_INDEX]


def test_understanding_labels_are_exactly_the_answers(tok):
    c = make(tok)
    b = c([decoded_sample(UND)])
    ids, lab, att = b["input_ids"][0], b["labels"][0], b["attention_mask"][0]
    assert att.all()
    assert (ids == c.image_id).sum() == N_IMG
    # the N image slots are contiguous and unsupervised
    pos = (ids == c.image_id).nonzero().flatten()
    assert pos.tolist() == list(range(int(pos[0]), int(pos[0]) + N_IMG)) and (lab[pos] == IGNORE_INDEX).all()
    assert supervised_text(tok, ids, lab) == ["Ġred", "</s>", "Ġ", "2", "</s>"]  # digits are single tokens
    assert (lab[lab != IGNORE_INDEX] == ids[lab != IGNORE_INDEX]).all()  # labels are unshifted ids
    assert ids[0] == tok.bos_token_id
    assert b["pixel_values"].shape == (1, 3, 16, 16) and b["image_sample_idx"].tolist() == [0]
    assert "gen_images" not in b and b["gen_sample_idx"].numel() == 0


def test_generation_span_supervision(tok):
    c = make(tok)
    b = c([decoded_sample(GEN, task="generation")])
    ids, lab = b["input_ids"][0].tolist(), b["labels"][0].tolist()
    s = ids.index(c.gen_start_id)
    assert ids[s + 1: s + 1 + L] == [c.gen_pad_id] * L and ids[s + 1 + L] == c.gen_end_id
    assert lab[s] == c.gen_start_id  # <|image_gen_start|> is an answer token
    assert all(l == IGNORE_INDEX for l in lab[s + 1: s + 2 + L])  # pads and end are not
    assert lab[s + 2 + L] == tok.eos_token_id == ids[s + 2 + L]  # the text after the span is
    assert sum(l != IGNORE_INDEX for l in lab) == 2
    # no space token between "ASSISTANT:" and the span: inference forces GEN_START right there
    assert tok.convert_ids_to_tokens(ids[s - 1]) == ":"
    g = b["gen_images"]
    assert g.shape == (1, 3, 8, 8) and g.min() >= -1 and g.max() <= 1
    assert b["gen_sample_idx"].tolist() == [0] and b["gen_uncond"].tolist() == [False]
    assert b["pixel_values"].numel() == 0


def test_all_tokens_switch_only_affects_generation_samples(tok):
    a = make(tok)([decoded_sample(UND), decoded_sample(GEN, key="g", task="generation")])
    t = make(tok, text_loss_on="all_tokens")([decoded_sample(UND), decoded_sample(GEN, key="g", task="generation")])
    assert torch.equal(a["labels"][0], t["labels"][0])  # understanding sample unchanged
    ids, lab, att = t["input_ids"][1], t["labels"][1], t["attention_mask"][1]
    c = make(tok)
    text = (ids != c.gen_pad_id) & (att == 1)
    assert (lab[text] == ids[text]).all()  # every text token of the sample, prompt included
    assert (lab[ids == c.gen_pad_id] == IGNORE_INDEX).all() and (lab[att == 0] == IGNORE_INDEX).all()


def test_mixed_batch_equals_each_sample_alone(tok):
    c = make(tok)
    samples = [decoded_sample(UND, key="u"), decoded_sample(GEN, key="g", task="generation")]
    both = c(samples)
    for b, s in enumerate(samples):
        alone = c([s])
        n = alone["input_ids"].shape[1]
        assert torch.equal(both["input_ids"][b, :n], alone["input_ids"][0])
        assert torch.equal(both["labels"][b, :n], alone["labels"][0])
        assert (both["attention_mask"][b, n:] == 0).all() and (both["labels"][b, n:] == IGNORE_INDEX).all()
        assert (both["input_ids"][b, n:] == tok.pad_token_id).all()
    assert both["image_sample_idx"].tolist() == [0] and both["gen_sample_idx"].tolist() == [1]
    assert both["key"] == ["u", "g"] and both["task"] == ["understanding", "generation"]


def test_several_images_in_placeholder_order(tok):
    msgs = [{"role": "user", "content": "<image> and <image>: which is red?"}, {"role": "assistant", "content": "one"},
            {"role": "user", "content": "Now draw it."}, {"role": "assistant", "content": "Sure.<image_gen>"}]
    s = decoded_sample(msgs)
    b = make(tok)([decoded_sample(UND, key="a"), s])
    assert b["image_sample_idx"].tolist() == [0, 1, 1]
    # pixel rows follow placeholder order: images 0 and 1 of sample 1 differ in red channel
    assert not torch.equal(b["pixel_values"][1], b["pixel_values"][2])
    assert b["gen_sample_idx"].tolist() == [1]
    ids, lab = b["input_ids"][1].tolist(), b["labels"][1].tolist()
    assert sum(i == make(tok).image_id for i in ids) == 2 * N_IMG
    sup = supervised_text(tok, ids, lab)
    first_answer = sup[: sup.index("</s>")]
    assert "".join(first_answer) == "Ġone" and GEN_START in sup and sup[-1] == "</s>"


def test_clip_never_cuts_inside_an_image_span(tok):
    c = make(tok)
    msgs = [{"role": "user", "content": "What colour is the circle?"}, {"role": "assistant", "content": "red"},
            {"role": "user", "content": "<image>\nHow many objects are there?"}, {"role": "assistant", "content": "2"}]
    full = c([decoded_sample(msgs)])
    ids = full["input_ids"][0].tolist()
    start = ids.index(c.image_id)
    clip = make(tok, max_length=start + 2)  # would cut in the middle of the image slots
    short = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "no"}]
    b = clip([decoded_sample(msgs), decoded_sample(short, key="short")])
    assert b["num_clipped"] == 1 and b["num_dropped"] == 0
    n = int(b["attention_mask"][0].sum())
    assert n == start and c.image_id not in b["input_ids"][0, :n].tolist()  # cut before the span
    assert b["image_sample_idx"].tolist() == [1]  # its image went with it; the short sample kept its own
    assert supervised_text(tok, b["input_ids"][0], b["labels"][0]) == ["Ġred", "</s>"]
    assert int(b["attention_mask"][1].sum()) <= start + 2 and (b["input_ids"][1] == c.image_id).sum() == N_IMG
    # a sample whose supervision is all cut away is dropped and counted
    tiny = make(tok, max_length=5)([decoded_sample(UND, key="k")])
    assert tiny["num_dropped"] == 1 and tiny["dropped_keys"] == ["k"] and tiny["input_ids"].shape[0] == 0
    dropper = make(tok, max_length=start + 2, overlong="drop")([decoded_sample(msgs, key="x"), decoded_sample(short)])
    assert dropper["num_dropped"] == 1 and dropper["num_clipped"] == 0 and dropper["input_ids"].shape[0] == 1


def test_prompt_dropout_uses_the_null_prompt(tok):
    c = make(tok, prompt_dropout=0.5, seed=1)
    b = c([decoded_sample(GEN, key=f"g{i}", task="generation") for i in range(200)])
    unc = b["gen_uncond"]
    assert 60 < int(unc.sum()) < 140
    prompt = c.encode_prompt(null_generation_messages()[:1])
    for r in range(200):
        ids = b["input_ids"][r].tolist()
        head = ids[: ids.index(c.gen_start_id)]
        if unc[r]:  # exactly the unconditional prompt that inference uses for CFG
            assert head == prompt
        else:
            assert head == c.encode_prompt(GEN[:1]) and "circle" in tok.decode(head)
    # reproducible with the same seed, different with another
    again = make(tok, prompt_dropout=0.5, seed=1)([decoded_sample(GEN, key=f"g{i}") for i in range(200)])
    other = make(tok, prompt_dropout=0.5, seed=2)([decoded_sample(GEN, key=f"g{i}") for i in range(200)])
    assert torch.equal(again["gen_uncond"], unc) and not torch.equal(other["gen_uncond"], unc)
    # understanding samples are never dropped
    assert make(tok, prompt_dropout=0.99)([decoded_sample(UND)])["input_ids"].shape[1] == make(tok)([decoded_sample(UND)])["input_ids"].shape[1]
    assert null_generation_prompt().endswith("USER:  ASSISTANT:")


def test_inference_prompt_is_the_training_prefix(tok):
    c = make(tok)
    for msgs in (UND, GEN):
        b = c([decoded_sample(msgs)])
        last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
        p = c.encode_prompt(msgs[: last_user + 1])
        assert b["input_ids"][0, : len(p)].tolist() == p
        assert int(b["prompt_len"][0]) == len(p)
    text = build_prompt(UND[:1], ChatTemplateConfig())
    assert text.endswith("USER: <image>\nWhat colour is the circle? ASSISTANT:") and text.startswith("A chat")


def test_vqa_eval_batch_has_left_padded_prompts_and_answers(tok):
    c = make(tok)
    s1 = decoded_sample(UND[:2], key="a", task="vqa_eval", answers=["red"] * 10)
    s2 = decoded_sample([{"role": "user", "content": "<image>\nIs there a blue triangle in the image?"}], key="b",
                        task="vqa_eval")  # no answer (test-dev style)
    b = c([s1, s2])
    assert b["answers"] == [["red"] * 10, None]
    P = b["prompt_input_ids"].shape[1]
    for r, s in enumerate((s1, s2)):
        p = c.encode_prompt(s["record"]["messages"][:1])
        assert b["prompt_input_ids"][r, P - len(p):].tolist() == p
        assert b["prompt_attention_mask"][r].sum() == len(p)
    assert (b["labels"][1] == IGNORE_INDEX).all()  # nothing to supervise, not dropped


def test_tokenizer_without_special_tokens_is_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", eos_token="<unk>")
    with pytest.raises(ValueError, match="add_special_tokens"):
        make(hf)


def test_special_token_constants():
    assert (IMAGE_TOKEN, GEN_START, GEN_END, GEN_PAD) == ("<image>", "<|image_gen_start|>", "<|image_gen_end|>",
                                                          "<|image_gen_pad|>")


def test_a_malformed_sample_is_skipped_and_counted(tok, caplog):
    c = make(tok)
    bad = decoded_sample(UND, key="bad", n_images=2)  # one <image>, two images
    raw_tokens = decoded_sample([{"role": "user", "content": "<image> <|image_gen_start|>"},
                                 {"role": "assistant", "content": "x"}], key="raw")
    ok = decoded_sample(UND, key="ok")
    ok["n_unreadable"] = 3  # the reader skipped three before this one
    b = c([bad, raw_tokens, ok])
    assert b["key"] == ["ok"] and b["num_unreadable"] == 5
    assert "bad" in caplog.text and "raw special tokens" in caplog.text

"""Text tokenizer family: special tokens, the world tokenizer, save/load round trips."""
import pytest

from modules.components.registry import UnknownComponentError
from modules.components.text_tokenizer import (
    GEN_END,
    GEN_PAD,
    GEN_START,
    IMAGE_TOKEN,
    TOKENIZERS,
    VARGPT_SPECIAL_TOKENS,
    WORLD_TOKENIZER_MAKE_TARGET,
    TokenizerConfig,
    build_tokenizer,
    special_token_ids,
    train_world_tokenizer,
)

WORLD_TEXTS = [
    "Draw a red circle on the left.",
    "How many squares are there? Answer: 3",
    "Is the triangle blue? No, it is green!",
    "A purple cross at (12, 40); a black square below it.",
    "What colour is the shape in the top-right corner?",
] * 10


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("world_tok")
    train_world_tokenizer(WORLD_TEXTS, d, vocab_size=400)
    return d


def _plain_hf_tokenizer(tmp_path, with_unk: bool):
    """A small fast tokenizer without the VARGPT tokens and without a pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "a", "red", "circle", ".", "draw"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    kw = dict(bos_token="<s>", eos_token="</s>")
    if with_unk:
        kw["unk_token"] = "<unk>"
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **kw)
    d = tmp_path / ("plain_unk" if with_unk else "plain")
    tok.save_pretrained(str(d))
    return d


def test_registry_names_and_unknown_name():
    assert TOKENIZERS.names() == ["hf", "world"]
    with pytest.raises(UnknownComponentError, match="valid choices: hf, world"):
        build_tokenizer(TokenizerConfig(name="sentencepiece", path="x"))


def test_world_tokenizer_special_tokens_single(world_dir):
    tok = build_tokenizer(TokenizerConfig(name="world", path=str(world_dir)))
    ids = special_token_ids(tok)
    vargpt_ids = [ids["image"], ids["gen_start"], ids["gen_end"], ids["gen_pad"]]
    assert len(set(vargpt_ids)) == 4
    assert ids["pad"] is not None and ids["bos"] is not None and ids["eos"] is not None
    # Glued to text on both sides, each is still exactly one token.
    text = f"look{IMAGE_TOKEN}here {GEN_START}{GEN_PAD}{GEN_PAD}{GEN_END}."
    enc = tok.encode(text, add_special_tokens=False)
    assert enc.count(ids["image"]) == 1 and enc.count(ids["gen_pad"]) == 2
    assert tok.convert_ids_to_tokens(enc).count(GEN_START) == 1
    # Reserved when training (ids 3..6, after pad/bos/eos), so never merged with text.
    assert vargpt_ids == [3, 4, 5, 6]


def test_world_tokenizer_lossless_with_digits_and_punctuation(world_dir):
    tok = build_tokenizer(TokenizerConfig(name="world", path=str(world_dir)))
    text = "Is it (12, 40)? Yes; 7 red circles! Unseen-word: zebra #9"
    enc = tok.encode(text, add_special_tokens=False)
    assert tok.decode(enc) == text
    # Digits are split one per token, so counts and coordinates share a small digit vocabulary.
    assert tok.convert_ids_to_tokens(tok.encode("12", add_special_tokens=False)) == ["1", "2"]
    # A frequent word became one token (the BPE learned merges), not a byte sequence.
    assert len(tok.encode(" circle", add_special_tokens=False)) == 1
    # BOS is prepended by default, as the LLaMA tokenizer does.
    assert tok.encode("red")[0] == tok.bos_token_id


def test_world_tokenizer_does_not_grow_vocab(world_dir):
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(str(world_dir), local_files_only=True)
    built = build_tokenizer(TokenizerConfig(name="world", path=str(world_dir)))
    assert len(built) == len(raw)
    assert len(raw) <= 400


def test_round_trip_after_save_load(world_dir, tmp_path):
    tok = build_tokenizer(TokenizerConfig(name="world", path=str(world_dir)))
    tok.save_pretrained(str(tmp_path / "saved"))
    again = build_tokenizer(TokenizerConfig(name="hf", path=str(tmp_path / "saved")))
    assert special_token_ids(again) == special_token_ids(tok)
    text = f"USER: {IMAGE_TOKEN}\nWhat is it? ASSISTANT: a red circle.</s>"
    assert again.encode(text) == tok.encode(text)
    assert len(again) == len(tok)


def test_hf_tokenizer_gets_tokens_and_unk_as_pad(tmp_path):
    d = _plain_hf_tokenizer(tmp_path, with_unk=True)
    from transformers import AutoTokenizer

    n0 = len(AutoTokenizer.from_pretrained(str(d), local_files_only=True))
    tok = build_tokenizer(TokenizerConfig(name="hf", path=str(d)))
    assert len(tok) == n0 + 4  # the four VARGPT tokens; pad reuses unk (LLaVA v1)
    assert tok.pad_token == "<unk>"
    ids = special_token_ids(tok)
    assert sorted(ids[k] for k in ("image", "gen_start", "gen_end", "gen_pad")) == list(range(n0, n0 + 4))
    enc = tok.encode(f"draw a{IMAGE_TOKEN}red circle", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(enc) == ["draw", "a", IMAGE_TOKEN, "red", "circle"]
    # They are special: skipped when decoding with skip_special_tokens.
    assert IMAGE_TOKEN not in tok.decode(enc, skip_special_tokens=True)
    # Saved and reloaded, nothing is added twice.
    tok.save_pretrained(str(tmp_path / "re"))
    again = build_tokenizer(TokenizerConfig(name="hf", path=str(tmp_path / "re")))
    assert len(again) == len(tok) and special_token_ids(again) == ids


def test_hf_tokenizer_without_unk_gets_new_pad(tmp_path):
    d = _plain_hf_tokenizer(tmp_path, with_unk=False)
    from transformers import AutoTokenizer

    n0 = len(AutoTokenizer.from_pretrained(str(d), local_files_only=True))
    tok = build_tokenizer(TokenizerConfig(name="hf", path=str(d), padding_side="left"))
    assert tok.pad_token == "<pad>" and tok.pad_token_id == n0 + 4
    assert tok.padding_side == "left"
    batch = tok(["a red circle", "a"], padding=True)
    assert batch["input_ids"][1][0] == tok.pad_token_id


def test_missing_world_dir_names_make_target(tmp_path):
    with pytest.raises(FileNotFoundError, match=WORLD_TOKENIZER_MAKE_TARGET):
        build_tokenizer(TokenizerConfig(name="world", path=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="needs `path`"):
        build_tokenizer(TokenizerConfig(name="hf", path=""))


def test_special_token_ids_rejects_tokenizer_without_them(tmp_path):
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(str(_plain_hf_tokenizer(tmp_path, with_unk=True)), local_files_only=True)
    with pytest.raises(ValueError, match="encodes to"):
        special_token_ids(raw)


def test_constants_match_vargpt_strings():
    assert VARGPT_SPECIAL_TOKENS == ["<image>", "<|image_gen_start|>", "<|image_gen_end|>", "<|image_gen_pad|>"]

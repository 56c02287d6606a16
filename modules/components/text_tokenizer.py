"""Text tokenizer family: a Hugging Face fast tokenizer with VARGPT's special tokens added.

Two sources, one result (a ``PreTrainedTokenizerFast``, the tokenizers-backed HF class):
  hf     any HF tokenizer saved in a local directory (Vicuna/LLaMA, Qwen2, ...); never downloads
  world  a small byte-level BPE trained on the shape world's text with the ``tokenizers`` library
         (``train_world_tokenizer``) and saved in HF format, so it loads exactly like ``hf``

Whatever the source, ``build_tokenizer`` makes sure the four VARGPT tokens exist as single,
never-split special tokens and that a pad token exists. The LLM's embedding matrix must then be
resized to ``len(tokenizer)`` (``modules.components.llm.build_llm`` does that).

    <image>               slot for the understanding image's features (LLaVA's IMAGE_TOKEN)
    <|image_gen_start|>   opens a generated image
    <|image_gen_pad|>     one per VAR token (L of them); their embeddings are replaced
    <|image_gen_end|>     closes a generated image
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Dict, Iterable, List

# The special-token strings live in one place, shared with the data pipeline (the collator
# checks the tokenizer knows them); re-exported here for model code.
from datamodules.tokens import GEN_END, GEN_PAD, GEN_START, IMAGE_TOKEN, SPECIAL_TOKENS  # noqa: F401
from modules.components.registry import ComponentConfig, Registry

VARGPT_SPECIAL_TOKENS: List[str] = list(SPECIAL_TOKENS)  # [IMAGE, GEN_START, GEN_END, GEN_PAD]

# Control tokens of the world tokenizer (LLaMA's spelling, so prompts look the same).
WORLD_PAD, WORLD_BOS, WORLD_EOS = "<pad>", "<s>", "</s>"
# The make target that trains and saves the world tokenizer (named in the missing-file error).
WORLD_TOKENIZER_MAKE_TARGET = "make bases"

TOKENIZERS = Registry("text_tokenizer")


@dataclass
class TokenizerConfig(ComponentConfig):
    family: ClassVar[str] = "text_tokenizer"
    name: str = "world"  # hf | world
    # hf: a local directory holding tokenizer.json / tokenizer_config.json (save_pretrained layout).
    # world: the directory train_world_tokenizer() saved to.
    path: str = ""
    # Pad token when the tokenizer has none. "" = LLaVA's rule: reuse unk if there is one
    # (Vicuna/LLaMA), else add "<pad>" as a new token (grows the vocabulary by one).
    pad_token: str = ""
    padding_side: str = "right"  # right for training (LLaVA); left is for batched generation
    model_max_length: int = 0  # 0 keeps the tokenizer's own value


def _load_local(path: str, what: str, hint: str):
    from transformers import AutoTokenizer

    if not path:
        raise ValueError(f"text_tokenizer {what!r} needs `path` (a local directory); {hint}")
    if not Path(path).is_dir():
        raise FileNotFoundError(f"text_tokenizer {what!r}: no directory at {path!r}; {hint}")
    # local_files_only: a path that is not a tokenizer directory must fail here, not turn into a
    # hub lookup that retries for half a minute.
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


@TOKENIZERS.register("hf")
def _hf(cfg: TokenizerConfig):
    return _load_local(
        cfg.path, "hf", "point text_tokenizer.path at a directory saved with save_pretrained"
    )


@TOKENIZERS.register("world")
def _world(cfg: TokenizerConfig):
    return _load_local(
        cfg.path,
        "world",
        f"the world tokenizer is trained and saved by `{WORLD_TOKENIZER_MAKE_TARGET}` "
        "(train_world_tokenizer in modules/components/text_tokenizer.py)",
    )


def add_vargpt_special_tokens(tokenizer, pad_token: str = "") -> int:
    """Add the VARGPT tokens (and a pad token if missing) in place; return how many ids were new.

    Existing extra special tokens are kept (``replace_extra_special_tokens=False``): a chat
    tokenizer's own control tokens must stay special.
    """
    from tokenizers import AddedToken

    n_before = len(tokenizer)
    missing = [t for t in VARGPT_SPECIAL_TOKENS if t not in tokenizer.extra_special_tokens]
    if missing:
        # normalized=False: a lowercasing/normalizing tokenizer must still match them verbatim.
        toks = [AddedToken(t, normalized=False, special=True) for t in missing]
        tokenizer.add_special_tokens({"extra_special_tokens": toks}, replace_extra_special_tokens=False)
    if pad_token:
        if tokenizer.pad_token != pad_token:
            tokenizer.add_special_tokens({"pad_token": pad_token})
    elif tokenizer.pad_token is None:
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token  # LLaVA v1 convention for Vicuna
        else:
            tokenizer.add_special_tokens({"pad_token": WORLD_PAD})
    return len(tokenizer) - n_before


def special_token_ids(tokenizer) -> Dict[str, int]:
    """Ids of the VARGPT tokens and the pad/bos/eos tokens (None where a tokenizer has none).

    Keys: image, gen_start, gen_end, gen_pad, pad, bos, eos. Fails if a VARGPT token does not
    encode to exactly one id, which would silently break image-slot replacement downstream.
    """
    ids: Dict[str, int] = {}
    for key, tok in zip(("image", "gen_start", "gen_end", "gen_pad"), VARGPT_SPECIAL_TOKENS):
        enc = tokenizer.encode(tok, add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(
                f"special token {tok!r} encodes to {len(enc)} ids {enc}; build the tokenizer with "
                "build_tokenizer() (or call add_vargpt_special_tokens) so it is a single token"
            )
        ids[key] = enc[0]
    ids["pad"] = tokenizer.pad_token_id
    ids["bos"] = tokenizer.bos_token_id
    ids["eos"] = tokenizer.eos_token_id
    return ids


def build_tokenizer(cfg: TokenizerConfig):
    """Load the tokenizer named by ``cfg`` and add the VARGPT special tokens (and a pad token).

    The LLM's vocabulary must then be ``len(tokenizer)``: pass it to ``build_llm``.
    """
    tokenizer = TOKENIZERS.build(cfg)
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"text_tokenizer at {cfg.path!r} loaded as the slow {type(tokenizer).__name__}; "
            "save a fast tokenizer (tokenizer.json) there"
        )
    if cfg.padding_side not in ("left", "right"):
        raise ValueError(f"text_tokenizer.padding_side must be left or right, got {cfg.padding_side!r}")
    add_vargpt_special_tokens(tokenizer, cfg.pad_token)
    tokenizer.padding_side = cfg.padding_side
    if cfg.model_max_length > 0:
        tokenizer.model_max_length = cfg.model_max_length
    special_token_ids(tokenizer)  # fail now, not at the first batch
    return tokenizer


def train_world_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 1024):
    """Train a byte-level BPE on ``texts`` and save it in HF format to ``out_dir``.

    Byte-level (GPT-2 style) so every string encodes, digits and punctuation included, and decoding
    is lossless (the world's answers are compared as strings). Digits are split one per token, as
    LLaMA does, so counts are single tokens. Case is kept. The control tokens and the four VARGPT
    tokens are reserved first (ids 0..6) and never merged with text. Encoding adds ``<s>`` at the
    start like the LLaMA tokenizer (``add_special_tokens=False`` leaves it out). The vocabulary
    may end up smaller than ``vocab_size`` when the text has no more pairs to merge.

    Returns the loaded ``PreTrainedTokenizerFast`` (as ``build_tokenizer`` would load it, minus the
    padding-side settings).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    reserved = [WORLD_PAD, WORLD_BOS, WORLD_EOS] + VARGPT_SPECIAL_TOKENS
    if vocab_size < 256 + len(reserved):
        raise ValueError(f"world tokenizer vocab_size must be >= {256 + len(reserved)} (bytes + reserved)")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=reserved,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    bos_id = backend.token_to_id(WORLD_BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{WORLD_BOS} $A", pair=f"{WORLD_BOS} $A {WORLD_BOS} $B", special_tokens=[(WORLD_BOS, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=WORLD_BOS,
        eos_token=WORLD_EOS,
        pad_token=WORLD_PAD,
        extra_special_tokens=list(VARGPT_SPECIAL_TOKENS),
        clean_up_tokenization_spaces=False,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    # Reload so the caller holds exactly what later runs will load.
    return _load_local(str(out_dir), "world", "save_pretrained failed")

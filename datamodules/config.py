"""Typed configuration of the data side (the `data:` section of an experiment YAML).

Only dataclasses/typing here: the experiment config loader imports this module to build its
OmegaConf structured schema, and that must stay cheap (no torch, webdataset or PIL).
Every field has a default and a simple type so OmegaConf can merge YAML onto it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

# What the loader does with a source (not the record's own `task` label):
#   understanding  image(s) + conversation, loss on the answers
#   generation     instruction -> target image (<image_gen>); prompt dropout and
#                  `text_loss_on` apply here
#   vqa_eval       evaluation questions carrying `answers` for VQA scoring
#   edit           source image(s) + instruction -> edited image (<image> in the user turn,
#                  one <image_gen> answer; every record is checked); no prompt dropout (the
#                  model's own condition drop gives the unconditional branch)
#   dpo            preference pairs: a generation record + its `rejected` image (datamodules/pairs.py)
SOURCE_TASKS = ("understanding", "generation", "vqa_eval", "edit", "dpo")
TEXT_LOSS_ON = ("answers", "all_tokens")


@dataclass
class SourceConfig:
    name: str = "source"
    # Glob and/or brace pattern of .tar shards, relative to the repo root (or `DataConfig.root`)
    # or absolute, e.g. "data/world/train/{caption,vqa}-*.tar". Several patterns: join with "::".
    shards: str = ""
    weight: float = 1.0  # relative sampling weight inside the training mix (ignored for eval)
    task: str = "understanding"  # one of SOURCE_TASKS


@dataclass
class ChatTemplateConfig:
    """Vicuna-v1 (LLaVA-1.5 `conv_vicuna_v1`) layout by default:

        <s>{system} USER: {user} ASSISTANT: {answer}</s>USER: ... ASSISTANT: {answer}</s>

    EOS is appended as the tokenizer's eos token id (not as text) after every answer and is
    supervised with the answer.
    """

    system: str = (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )
    system_suffix: str = " "
    user_prefix: str = "USER: "
    user_suffix: str = " "
    assistant_prefix: str = "ASSISTANT:"
    # Between "ASSISTANT:" and the answer. Supervised with the answer: inference prompts end at
    # "ASSISTANT:" and the model emits the separator (usually merged into its first token).
    assistant_answer_sep: str = " "
    eos_after_answer: bool = True
    add_bos: bool = True  # prepend tokenizer.bos_token_id when the tokenizer has one


@dataclass
class DataConfig:
    # Training mix (one list per stage YAML); val/test are finite ordered passes.
    sources: List[SourceConfig] = field(default_factory=list)
    val_sources: List[SourceConfig] = field(default_factory=list)
    test_sources: List[SourceConfig] = field(default_factory=list)
    root: str = ""  # base directory for relative shard patterns; "" = current working dir

    batch_size: int = 8
    val_batch_size: int = 0  # 0 -> batch_size
    num_workers: int = 2
    pin_memory: bool = False
    persistent_workers: bool = False
    prefetch_factor: int = 2
    seed: int = 0

    # Training streams: resampled = infinite, shards drawn with replacement (step-based
    # training); False = one shuffled pass over every shard per epoch.
    resampled: bool = True
    shuffle_buffer: int = 1000  # sample shuffle buffer per source and worker (0 = off)
    # Every rank reads rank 0's training stream (and collator draws): the ranks' gradients are
    # then equal, so a multi-rank step must compute what one process computes. A check of the
    # distributed / sharded path (tests/test_sharded.py), never a way to train.
    replicate_across_ranks: bool = False

    # Collation
    max_length: int = 2048
    overlong: str = "clip"  # clip (cut text at a span boundary) | drop
    text_loss_on: str = "answers"  # answers | all_tokens (released behaviour, generation only)
    prompt_dropout: float = 0.1  # p of dropping a generation instruction (unconditional branch)
    num_image_tokens: int = 576  # vision tokens per input image; the model fills this in
    gen_num_tokens: int = 680  # L = sum(pn^2); the model fills this in
    use_pretokenized: bool = True  # use stored VQ indices when their fingerprint matches
    load_gen_images: bool = True  # decode target images even when indices are present
    # base_var only: the class of a record without a `label` (a world generation scene).
    # "label": every record must carry one (the `class` task); "scene": a one-object scene gets
    # its (shape, colour) class, any other scene the null class (unconditional), so the VAR base
    # also learns the multi-object scenes VARGPT will ask it to draw.
    scene_labels: str = "label"
    chat: ChatTemplateConfig = field(default_factory=ChatTemplateConfig)


def validate_data_config(cfg: DataConfig) -> None:
    """Fail early with the key path and the valid choices."""
    for group in ("sources", "val_sources", "test_sources"):
        for i, src in enumerate(getattr(cfg, group)):
            where = f"data.{group}[{i}] ({src.name})"
            if src.task not in SOURCE_TASKS:
                raise ValueError(f"{where}.task={src.task!r}; valid: {', '.join(SOURCE_TASKS)}")
            if not src.shards:
                raise ValueError(f"{where}.shards is empty; give a glob/brace pattern of .tar shards")
            if group == "sources" and not src.weight > 0:
                raise ValueError(f"{where}.weight must be > 0, got {src.weight}")
    if cfg.text_loss_on not in TEXT_LOSS_ON:
        raise ValueError(f"data.text_loss_on={cfg.text_loss_on!r}; valid: {', '.join(TEXT_LOSS_ON)}")
    if cfg.scene_labels not in ("label", "scene"):
        raise ValueError(f"data.scene_labels={cfg.scene_labels!r}; valid: label, scene")
    if cfg.overlong not in ("clip", "drop"):
        raise ValueError(f"data.overlong={cfg.overlong!r}; valid: clip, drop")
    if not 0.0 <= cfg.prompt_dropout < 1.0:
        raise ValueError(f"data.prompt_dropout must be in [0, 1), got {cfg.prompt_dropout}")
    if cfg.batch_size < 1 or cfg.num_workers < 0 or cfg.max_length < 8:
        raise ValueError("data.batch_size >= 1, data.num_workers >= 0, data.max_length >= 8 required")

"""The shape world: a deterministic procedural dataset small enough for a 2-core CPU.

One scene = 1-3 objects (4 shapes x 6 colours, 2 sizes, 5 coarse positions) on a light,
tinted, textured and noisy background. From the same scene description come the image (PNG),
a caption, VQA questions with exact answers, multi-turn conversations, generation instructions
and a class label per (shape, colour). The description travels with every record (`scene`) so
evaluation can check generated images attribute by attribute.

Determinism: sample i of (seed, split, task) depends on nothing else (its own RNG seeded from
that tuple), so counts, shard sizes and worker counts never change a sample's bytes.

    python -m datamodules.world --out data/world --train 2000 --val 200 --test 200 --heldout 200

writes data/world/{train,val,test,heldout}/{caption,vqa,conv,gen,class}-NNNNNN.tar and one
manifest.json per split. About 2-3k samples/s per core at 64 px (see tests / FORMAT.md).
Tasks rendered by other files come in as ``builders`` (task -> builder(seed, split, index, size)
-> ShardSample): ``python -m datamodules.world_edit`` is this CLI with the ``edit`` task.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import struct
import sys
import zlib
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from datamodules.schema import ShardSample, ShardWriter, image_member, write_manifest
from datamodules.tokens import IMAGE_GEN_PLACEHOLDER, IMAGE_TOKEN

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "black")  # white: no contrast on grey
RGB = {
    "red": (215, 35, 35),
    "green": (35, 155, 55),
    "blue": (35, 65, 215),
    "yellow": (230, 195, 25),
    "purple": (135, 45, 170),
    "black": (25, 25, 25),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
# Centres as fractions of the image side. Distances + radii below keep objects from touching.
POSITION_XY = {"left": (0.16, 0.5), "right": (0.84, 0.5), "top": (0.5, 0.16), "bottom": (0.5, 0.84), "centre": (0.5, 0.5)}
RADIUS = {"small": (0.075, 0.095), "large": (0.12, 0.145)}  # fraction of the side
JITTER = 0.015
POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom", "centre": "in the centre"}
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
NUMBER_WORD = {1: "one", 2: "two", 3: "three"}

# Held-out combinations: one colour per shape, each colour at most once. Train/val/test scenes
# never contain these pairs (not even in the text); every heldout-split scene contains one.
HELDOUT_PAIRS = (("circle", "yellow"), ("square", "purple"), ("triangle", "black"), ("cross", "red"))
SPLITS = ("train", "val", "test", "heldout")
TASKS = ("caption", "vqa", "conv", "gen", "class")
QUESTION_TYPES = ("colour", "shape", "count", "position", "exist", "yesno")
ANSWER_SPACE = {
    "colour": list(COLOURS),
    "shape": list(SHAPES),
    "count": ["0", "1", "2", "3"],
    "position": list(POSITIONS),
    "exist": ["yes", "no"],
    "yesno": ["yes", "no"],
}
VQA_SUFFIX = "Answer with a single word."
NUM_CLASSES = len(SHAPES) * len(COLOURS)


def class_label(shape: str, colour: str) -> int:
    """Class index of a (shape, colour) pair: shape-major, 0..23."""
    return SHAPES.index(shape) * len(COLOURS) + COLOURS.index(colour)


def class_name(label: int) -> str:
    shape, colour = SHAPES[label // len(COLOURS)], COLOURS[label % len(COLOURS)]
    return f"{colour} {shape}"


def allowed_pairs(split: str) -> List[Tuple[str, str]]:
    held = set(HELDOUT_PAIRS)
    pairs = [(s, c) for s in SHAPES for c in COLOURS]
    return pairs if split == "heldout" else [p for p in pairs if p not in held]


def sample_rng(seed: int, split: str, task: str, index: int) -> random.Random:
    # str seeds go through SHA-512 in CPython: stable across processes and runs.
    return random.Random(f"world/{seed}/{split}/{task}/{index}")


# --------------------------------------------------------------------------- scenes

def random_scene(rng: random.Random, split: str, size: int, n_objects: Optional[int] = None) -> Dict[str, Any]:
    pairs = allowed_pairs(split)
    n = n_objects or rng.randint(1, 3)
    positions = rng.sample(POSITIONS, n)
    objects = []
    for k, pos in enumerate(positions):
        if split == "heldout" and k == 0:
            shape, colour = rng.choice(HELDOUT_PAIRS)
        else:
            shape, colour = rng.choice(pairs)
        objects.append(make_object(rng, shape, colour, rng.choice(SIZES), pos, size))
    return {"size": size, "objects": objects, "background": random_background(rng)}


def make_object(rng: random.Random, shape: str, colour: str, size_name: str, pos: str, size: int) -> Dict[str, Any]:
    fx, fy = POSITION_XY[pos]
    lo, hi = RADIUS[size_name]
    base = RGB[colour]
    return {
        "shape": shape,
        "colour": colour,
        "size": size_name,
        "position": pos,
        "x": round((fx + rng.uniform(-JITTER, JITTER)) * size, 2),
        "y": round((fy + rng.uniform(-JITTER, JITTER)) * size, 2),
        "r": round(rng.uniform(lo, hi) * size, 2),
        "rgb": [int(min(255, max(0, v + rng.randint(-12, 12)))) for v in base],
    }


def rerender_request(rec: Dict[str, Any], seed: int) -> Dict[str, Any]:
    """Another scene that satisfies a generation record's request: the same (shape, colour)
    objects, with the positions and sizes its prompt states (``rec["checks"]``) kept and
    everything else drawn again from ``seed`` (unstated positions and sizes, jitter, radius,
    colour noise, background). A real image for the same prompt, independent of the stored one:
    the same-prompt real-vs-real FID floor and attribute ceiling."""
    scene, checks = rec["scene"], rec.get("checks") or {}
    rng = random.Random(f"world/rerender/{seed}/{json.dumps(scene, sort_keys=True)}")
    objs = scene["objects"]
    if checks.get("position"):
        positions = [o["position"] for o in objs]
    else:
        positions = rng.sample(POSITIONS, len(objs))
    new = [make_object(rng, o["shape"], o["colour"], o["size"] if checks.get("size") else rng.choice(SIZES),
                       pos, scene["size"]) for o, pos in zip(objs, positions)]
    return {"size": scene["size"], "objects": new, "background": random_background(rng)}


def random_background(rng: random.Random) -> Dict[str, Any]:
    return {
        "grey": rng.randint(200, 235),
        "tint": [rng.randint(-8, 8) for _ in range(3)],
        # two low-frequency waves (texture) + per-pixel noise, all from noise_seed
        "waves": [[rng.uniform(0.5, 3.0), rng.uniform(0, 6.283), rng.uniform(0, 6.283), rng.uniform(3, 7)] for _ in range(2)],
        "noise": rng.uniform(3.0, 7.0),
        "noise_seed": rng.getrandbits(32),
    }


# --------------------------------------------------------------------------- rendering

def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        # slightly smaller half-side than r so a square's area is close to the circle's
        return (np.abs(dx) <= 0.88 * r) & (np.abs(dy) <= 0.88 * r)
    if shape == "triangle":
        # apex up at (0, -r), base at dy = 0.8 r, half-width 0.95 r at the base
        return (dy <= 0.8 * r) & (np.abs(dx) <= (dy + r) * (0.95 / 1.8))
    if shape == "cross":
        w = 0.34 * r
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")


def render(scene: Dict[str, Any]) -> np.ndarray:
    """Scene description -> (H, W, 3) uint8. A pure function of the description."""
    size = scene["size"]
    bg = scene["background"]
    rng = np.random.default_rng(bg["noise_seed"])
    u = np.arange(size, dtype=np.float32) / size
    img = np.empty((size, size, 3), np.float32)
    img[:] = bg["grey"] + np.asarray(bg["tint"], np.float32)
    for freq, phx, phy, amp in bg["waves"]:
        wave = amp * np.sin(6.283 * freq * u[None, :] + phx) * np.cos(6.283 * freq * u[:, None] + phy)
        img += wave[:, :, None]
    img += rng.normal(0.0, bg["noise"], size=(size, size, 1)).astype(np.float32)
    for obj in scene["objects"]:
        x, y, r = obj["x"], obj["y"], obj["r"]
        x0, x1 = max(0, int(x - r) - 1), min(size, int(x + r) + 2)
        y0, y1 = max(0, int(y - r) - 1), min(size, int(y + r) + 2)
        # 2x2 supersampling inside the bounding box only: anti-aliased edges, cheap
        sx = np.arange(x0 * 2, x1 * 2, dtype=np.float32) / 2 + 0.25 - x
        sy = np.arange(y0 * 2, y1 * 2, dtype=np.float32) / 2 + 0.25 - y
        mask = _shape_mask(obj["shape"], sx[None, :], sy[:, None], r).astype(np.float32)
        alpha = mask.reshape(y1 - y0, 2, x1 - x0, 2).mean(axis=(1, 3))[:, :, None]
        patch = img[y0:y1, x0:x1]
        img[y0:y1, x0:x1] = patch * (1 - alpha) + np.asarray(obj["rgb"], np.float32) * alpha
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(arr: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes. Written directly (filter 0, zlib level 1): twice as fast as
    PIL here, and the bytes do not depend on the Pillow version."""
    h, w, _ = arr.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), arr.reshape(h, w * 3)], axis=1).tobytes()
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(raw, 1))
            + _png_chunk(b"IEND", b""))


# --------------------------------------------------------------------------- text

def _groups(scene: Dict[str, Any]) -> List[Tuple[Tuple[str, str], List[Dict[str, Any]]]]:
    groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for o in scene["objects"]:
        groups.setdefault((o["shape"], o["colour"]), []).append(o)
    return list(groups.items())


def _join(parts: List[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def describe_group(pair: Tuple[str, str], objs: List[Dict[str, Any]], with_size: bool, with_position: bool) -> str:
    shape, colour = pair
    n = len(objs)
    if n == 1:
        size = objs[0]["size"] + " " if with_size else ""
        art = "an" if (size or colour)[0] in "aeiou" else "a"
        text = f"{art} {size}{colour} {shape}"
    else:
        sizes = {o["size"] for o in objs}
        size = f"{objs[0]['size']} " if with_size and len(sizes) == 1 else ""
        text = f"{NUMBER_WORD[n]} {size}{colour} {PLURAL[shape]}"
    if with_position:
        text += " " + _join([POSITION_PHRASE[o["position"]] for o in objs])
    return text


def describe_scene(scene: Dict[str, Any], rng: random.Random, with_size: bool, with_position: bool) -> str:
    return _join([describe_group(p, objs, with_size, with_position) for p, objs in _groups(scene)])


CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "What is in this picture?",
    "Give a short caption for the image.",
    "Describe what you see.",
)
CAPTION_FORMS = ("There is {d}.", "The image shows {d}.", "A picture of {d}.", "{D}.")
GEN_FORMS = (
    "Draw {d}.",
    "I need an image of {d}.",
    "Generate a picture with {d}.",
    "Can you make an image showing {d}?",
    "Please paint {d}.",
    "Create an image of {d}.",
)


def caption(scene: Dict[str, Any], rng: random.Random) -> str:
    d = describe_scene(scene, rng, with_size=True, with_position=True)
    form = rng.choice(CAPTION_FORMS)
    return form.format(d=d, D=d[0].upper() + d[1:])


def question_candidates(scene: Dict[str, Any], qtype: str, pairs: Sequence[Tuple[str, str]]) -> List[Tuple[str, str]]:
    """All (question, answer) pairs of one type that the scene answers exactly.

    `pairs` limits which (shape, colour) pairs a question may *name* (held-out pairs never
    appear in training text, not even in a "no" question).
    """
    objs = scene["objects"]
    shape_n = {s: sum(o["shape"] == s for o in objs) for s in SHAPES}
    colour_n = {c: sum(o["colour"] == c for o in objs) for c in COLOURS}
    pair_n = {(s, c): sum(o["shape"] == s and o["colour"] == c for o in objs) for s in SHAPES for c in COLOURS}
    out: List[Tuple[str, str]] = []
    if qtype == "colour":
        for o in objs:
            if shape_n[o["shape"]] == 1:
                out.append((f"What colour is the {o['shape']}?", o["colour"]))
    elif qtype == "shape":
        for o in objs:
            if colour_n[o["colour"]] == 1:
                out.append((f"What shape is the {o['colour']} object?", o["shape"]))
    elif qtype == "count":
        out.append(("How many objects are there?", str(len(objs))))
        for s in SHAPES:
            out.append((f"How many {PLURAL[s]} are there?", str(shape_n[s])))
        for c in COLOURS:
            out.append((f"How many {c} objects are there?", str(colour_n[c])))
    elif qtype == "position":
        for o in objs:
            if pair_n[(o["shape"], o["colour"])] == 1:
                out.append((f"Where is the {o['colour']} {o['shape']}?", o["position"]))
    elif qtype == "exist":
        for s, c in pairs:
            out.append((f"Is there a {c} {s} in the image?", "yes" if pair_n[(s, c)] else "no"))
    elif qtype == "yesno":
        for o in objs:
            if shape_n[o["shape"]] == 1:
                for c in COLOURS:
                    if (o["shape"], c) in pairs:
                        out.append((f"Is the {o['shape']} {c}?", "yes" if c == o["colour"] else "no"))
            if pair_n[(o["shape"], o["colour"])] == 1:
                for p in POSITIONS:
                    ans = "yes" if p == o["position"] else "no"
                    out.append((f"Is the {o['colour']} {o['shape']} {POSITION_PHRASE[p]}?", ans))
    else:
        raise ValueError(f"unknown question type {qtype!r}; valid: {', '.join(QUESTION_TYPES)}")
    return out


_COUNT_WORD = {"a": 1, "an": 1, "one": 1, **{w: n for n, w in NUMBER_WORD.items()}}
_SHAPE_WORD = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURAL.items()}}
_GROUP_RE = re.compile(r"\b(" + "|".join(_COUNT_WORD) + r")\s+(?:(" + "|".join(SIZES) + r")\s+)?("
                       + "|".join(COLOURS) + r")\s+(" + "|".join(sorted(_SHAPE_WORD, key=len, reverse=True)) + r")\b",
                       re.IGNORECASE)
_POSITION_RE = re.compile("|".join(re.escape(p) for p in POSITION_PHRASE.values()), re.IGNORECASE)
_PHRASE_POSITION = {p: pos for pos, p in POSITION_PHRASE.items()}


def parse_prompt(text: str) -> List[Dict[str, Any]]:
    """What a world generation prompt asks for, read from its words alone: one dict per described
    group, ``{"shape", "colour", "count"}`` plus ``"positions"`` (one per object, in the order
    written) when the prompt places it, ``"size"`` when it states one. The inverse of
    ``describe_group`` / ``describe_scene``: a group's position phrases are those between its
    noun and the next group. Returns [] for text that names no world object."""
    groups: List[Dict[str, Any]] = []
    matches = list(_GROUP_RE.finditer(text))
    for i, m in enumerate(matches):
        count_w, size, colour, shape_w = m.groups()
        g: Dict[str, Any] = {"shape": _SHAPE_WORD[shape_w.lower()], "colour": colour.lower(),
                             "count": _COUNT_WORD[count_w.lower()]}
        if size:
            g["size"] = size.lower()
        tail = text[m.end(): matches[i + 1].start() if i + 1 < len(matches) else len(text)]
        places = [_PHRASE_POSITION[p.group(0).lower()] for p in _POSITION_RE.finditer(tail)]
        if places:
            g["positions"] = places
        groups.append(g)
    return groups


def describe_request(groups: Sequence[Dict[str, Any]]) -> str:
    """``parse_prompt``'s groups in the world's own words (``describe_group``'s wording): for every
    world prompt, exactly the description it was written from."""
    parts = []
    for g in groups:
        objs = [{"size": g.get("size", "")}] * int(g["count"])
        text = describe_group((g["shape"], g["colour"]), objs, with_size="size" in g, with_position=False)
        if g.get("positions"):
            text += " " + _join([POSITION_PHRASE[p] for p in g["positions"]])
        parts.append(text)
    return _join(parts)


def implied_questions(groups: Sequence[Dict[str, Any]]) -> List[Tuple[str, str]]:
    """(question, answer) pairs, in the training VQA wording (suffix included), whose answers a
    generation prompt fixes. ``groups`` is what the prompt asks for, one dict per (shape, colour)
    with its ``count`` and, when the prompt states them, ``positions`` (``parse_prompt``'s
    reading of the words, or the attribute scorer's requested groups: the same for every world
    prompt). The questions are ``question_candidates`` of the scene the prompt describes: a world
    prompt describes every object, so the total and the per-colour / per-shape counts of what it
    names are fixed (the zero counts of what it does not name are left out); a position is asked
    only where the prompt states one. What the prompt leaves open (sizes, unstated places) is not
    asked."""
    objs = []
    for g in groups:
        n = int(g["count"])
        places = list(g.get("positions") or [])[:n]
        objs += [{"shape": g["shape"], "colour": g["colour"], "position": p} for p in places + [None] * (n - len(places))]
    scene = {"objects": objs}
    pairs = [(g["shape"], g["colour"]) for g in groups]
    qs = [(q, a) for qtype in ("count", "exist", "position", "colour", "shape")
          for q, a in question_candidates(scene, qtype, pairs) if a not in ("0", None)]
    return [(f"{q} {VQA_SUFFIX}", a) for q, a in qs]


def balanced_question(rng: random.Random, split: str, size: int, qtype: str) -> Tuple[Dict[str, Any], str, str]:
    """Scene + question whose answer is drawn uniformly from the type's answer space first.

    Rejection sampling over scene descriptions (cheap: nothing is rendered until accepted)
    makes the answer distribution per question type uniform, so no blind prior helps.
    """
    target = rng.choice(ANSWER_SPACE[qtype])
    pairs = allowed_pairs(split)
    for _ in range(1000):
        scene = random_scene(rng, split, size)
        cands = [qa for qa in question_candidates(scene, qtype, pairs) if qa[1] == target]
        if split == "heldout":  # the question should be about a held-out object when it can
            held = [qa for qa in cands if any(f"{c} {s}" in qa[0] or f"{s} {c}" in qa[0] for s, c in HELDOUT_PAIRS)]
            cands = held or cands
        if cands:
            q, a = rng.choice(cands)
            return scene, q, a
    raise RuntimeError(f"no scene answers {qtype}={target!r} after 1000 tries (world parameters broken?)")


# --------------------------------------------------------------------------- samples

def _public_scene(scene: Dict[str, Any]) -> Dict[str, Any]:
    return {"size": scene["size"], "objects": scene["objects"], "background": scene["background"]}


def make_sample(seed: int, split: str, task: str, index: int, size: int = 64) -> Tuple[Dict[str, Any], bytes]:
    """Record (without `images`/`id`) and PNG bytes of sample `index`; deterministic."""
    rng = sample_rng(seed, split, task, index)
    rec: Dict[str, Any] = {"task": task, "source": "world", "split": split}
    if task == "caption":
        scene = random_scene(rng, split, size)
        messages = [
            {"role": "user", "content": f"{IMAGE_TOKEN}\n{rng.choice(CAPTION_PROMPTS)}"},
            {"role": "assistant", "content": caption(scene, rng)},
        ]
    elif task == "vqa":
        qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]  # equal counts per type
        scene, q, a = balanced_question(rng, split, size, qtype)
        messages = [
            {"role": "user", "content": f"{IMAGE_TOKEN}\n{q} {VQA_SUFFIX}"},
            {"role": "assistant", "content": a},
        ]
        rec["question_type"] = qtype
        rec["answers"] = [a] * 10  # VQAv2 layout: the leave-one-out scorer gives 1.0 on a match
    elif task == "conv":
        scene = random_scene(rng, split, size)
        pairs = allowed_pairs(split)
        n_turns = rng.randint(2, 3)
        turns: List[Tuple[str, str]] = []
        if rng.random() < 0.5:
            turns.append((rng.choice(CAPTION_PROMPTS), caption(scene, rng)))
        # every question type in random order; count and exist always have candidates, so the
        # conversation always reaches n_turns
        for qt in rng.sample(QUESTION_TYPES, len(QUESTION_TYPES)):
            if len(turns) >= n_turns:
                break
            cands = question_candidates(scene, qt, pairs)
            if cands:
                turns.append(rng.choice(cands))
        messages = []
        for k, (q, a) in enumerate(turns):
            messages.append({"role": "user", "content": (f"{IMAGE_TOKEN}\n" if k == 0 else "") + q})
            messages.append({"role": "assistant", "content": a})
    elif task == "gen":
        scene = random_scene(rng, split, size)
        with_pos, with_size = rng.random() < 0.5, rng.random() < 0.3
        d = describe_scene(scene, rng, with_size=with_size, with_position=with_pos)
        messages = [
            {"role": "user", "content": rng.choice(GEN_FORMS).format(d=d)},
            # The answer is the generation span alone: inference forces <|image_gen_start|>
            # right after "ASSISTANT:", so training puts it in the same place.
            {"role": "assistant", "content": IMAGE_GEN_PLACEHOLDER},
        ]
        rec["checks"] = {"position": with_pos, "size": with_size}
    elif task == "class":
        shape, colour = rng.choice(HELDOUT_PAIRS if split == "heldout" else allowed_pairs(split))
        scene = {
            "size": size,
            "objects": [make_object(rng, shape, colour, rng.choice(SIZES), rng.choice(POSITIONS), size)],
            "background": random_background(rng),
        }
        messages = [
            {"role": "user", "content": f"Draw a {colour} {shape}."},
            {"role": "assistant", "content": IMAGE_GEN_PLACEHOLDER},
        ]
        rec["label"] = class_label(shape, colour)
        rec["class_name"] = f"{colour} {shape}"
    else:
        raise ValueError(f"unknown world task {task!r}; valid: {', '.join(TASKS)}")
    rec["messages"] = messages
    rec["scene"] = _public_scene(scene)
    return rec, png_bytes(render(scene))


def sample_key(split: str, task: str, index: int) -> str:
    return f"world_{split}_{task}_{index:07d}"


def build_shard_sample(seed: int, split: str, task: str, index: int, size: int) -> ShardSample:
    rec, png = make_sample(seed, split, task, index, size)
    key = sample_key(split, task, index)
    rec["id"] = key
    rec["images"] = [image_member(0, "png")]
    return ShardSample(key=key, record=rec, files={image_member(0, "png"): png})


def _write_shard(args: Tuple[str, int, str, str, int, int, int, int, Any]) -> Dict[str, Any]:
    out_dir, seed, split, task, start, stop, size, shard_index, builder = args
    writer = ShardWriter(out_dir, task, shard_size=stop - start, start_index=shard_index)
    for i in range(start, stop):
        writer.write(builder(seed, split, i, size) if builder else build_shard_sample(seed, split, task, i, size))
    return writer.close()[-1]


def generate_split(
    out_dir: str,
    split: str,
    counts: Dict[str, int],
    seed: int = 0,
    size: int = 64,
    shard_size: int = 5000,
    workers: int = 0,
    builders: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Write `{task}-NNNNNN.tar` shards + manifest.json for one split; returns the manifest.
    ``builders``: tasks of other files (e.g. ``datamodules.world_edit.BUILDERS``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    builders = builders or {}
    jobs = []
    for task, n in counts.items():
        if task not in TASKS and task not in builders:
            raise ValueError(f"unknown world task {task!r}; valid: {', '.join((*TASKS, *builders))}"
                             + ("" if builders else " (edit: python -m datamodules.world_edit)"))
        for k, start in enumerate(range(0, n, shard_size)):
            jobs.append((out_dir, seed, split, task, start, min(n, start + shard_size), size, k, builders.get(task)))
    os.makedirs(out_dir, exist_ok=True)
    if workers > 0 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as ex:
            shards = list(ex.map(_write_shard, jobs))
    else:
        shards = [_write_shard(j) for j in jobs]
    world = {
        "seed": seed,
        "split": split,
        "size": size,
        "shapes": list(SHAPES),
        "colours": list(COLOURS),
        "positions": list(POSITIONS),
        "heldout_pairs": [list(p) for p in HELDOUT_PAIRS],
        "num_classes": NUM_CLASSES,
    }
    return write_manifest(out_dir, shards, source="world", extra={"world": world})


def main(argv: Optional[List[str]] = None, builders: Optional[Dict[str, Any]] = None) -> int:
    builders = builders or {}
    tasks_all = (*TASKS, *builders)
    ap = argparse.ArgumentParser(prog="python -m datamodules.world", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output root; one sub-folder per split")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--tasks", default=",".join(tasks_all), help=f"comma list of {', '.join(tasks_all)}")
    for split, n in (("train", 2000), ("val", 200), ("test", 200), ("heldout", 200)):
        ap.add_argument(f"--{split}", type=int, default=n, help=f"samples per task in {split} (default {n})")
    ap.add_argument("--count", action="append", default=[], metavar="SPLIT.TASK=N",
                    help="override one count, e.g. --count train.gen=20000 (repeatable)")
    ap.add_argument("--shard-size", type=int, default=5000)
    ap.add_argument("--workers", type=int, default=0, help="processes (0 = in this process)")
    args = ap.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    counts = {s: {t: getattr(args, s) for t in tasks} for s in SPLITS}
    for item in args.count:
        try:
            st, n = item.split("=")
            s, t = st.split(".")
            if s not in SPLITS or t not in tasks_all:
                raise ValueError
            counts[s][t] = int(n)
        except ValueError:
            ap.error(f"--count {item!r}: expected SPLIT.TASK=N with SPLIT in {SPLITS} and TASK in {tasks_all}")
    for split in SPLITS:
        c = {t: n for t, n in counts[split].items() if n > 0}
        if c:
            m = generate_split(os.path.join(args.out, split), split, c, args.seed, args.size, args.shard_size, args.workers,
                               builders)
            print(f"{split}: {m['num_samples']} samples in {len(m['shards'])} shards -> {os.path.join(args.out, split)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The shape world's editing task: a source scene, an instruction, the target scene.

One edit changes one object of a world scene (``datamodules/world.py``) and nothing else; the
background, the other objects and the edited object's other attributes (its jitter, radius and
colour noise included) are the source's, so the two renders differ only where the edit is:

    colour    "Make the red square blue."             the object's colour (its colour noise kept)
    position  "Move the circle to the left."          to a free position (its jitter kept)
    size      "Make the green cross large."           small <-> large (same place in the size range)
    remove    "Remove the triangle."                  the object goes (scenes of 2-3 objects)

The object is named by its shape when the shape is unique in the scene (half the time), else
by colour and shape; only objects whose (shape, colour) is unique are edited, so the reference
is never ambiguous. Operations cycle with the sample index (equal counts). Held-out pairs: a
train / val / test edit never makes one (a recolour picks an allowed colour); a heldout-split
source has one, as every heldout scene.

A sample is an ``edit`` record (FORMAT.md): ``<image>`` + instruction in the user turn, the
``<image_gen>`` answer, ``images`` = [source, target]; ``scene`` is the target scene (what a
generator must draw), ``source_scene`` the source, ``edit`` = {op, object (the source object's
shape / colour / size / position), attribute, from, to}. Scored by
``modules.metrics_world.edit_scores`` (edit accuracy + preservation accuracy).

    python -m datamodules.world_edit --out runs/data/world-edit --tasks edit --train 2000 --val 200

is the world renderer (``python -m datamodules.world``, same options and determinism) with the
edit task added; without ``--tasks`` it renders every world task and ``edit``.
"""
from __future__ import annotations

import copy
import random
import sys
from typing import Any, Dict, List, Optional, Tuple

from datamodules.schema import EDIT_TASK, ShardSample, image_member
from datamodules.tokens import IMAGE_GEN_PLACEHOLDER, IMAGE_TOKEN
from datamodules.world import (COLOURS, POSITIONS, POSITION_XY, RADIUS, RGB, SIZES, _public_scene, allowed_pairs,
                               main as world_main, png_bytes, random_scene, render, sample_key, sample_rng)

EDIT_OPS = ("colour", "position", "size", "remove")
COLOUR_FORMS = ("Make {ref} {new}.", "Change the colour of {ref} to {new}.", "Turn {ref} {new}.", "Paint {ref} {new}.")
MOVE_FORMS = ("Move {ref} {to}.", "Put {ref} {to}.", "Move {ref} over {to}.")
SIZE_FORMS = ("Make {ref} {new}.", "Make {ref} {er}.", "Change {ref} to a {new} one.")
REMOVE_FORMS = ("Remove {ref}.", "Delete {ref}.", "Take {ref} away.", "Erase {ref}.")
MOVE_PHRASE = {"left": "to the left", "right": "to the right", "top": "to the top", "bottom": "to the bottom",
               "centre": "to the centre"}
SIZE_WORD = {"large": "bigger", "small": "smaller"}


def _pair_counts(objects: List[Dict[str, Any]]) -> Dict[Tuple[str, str], int]:
    n: Dict[Tuple[str, str], int] = {}
    for o in objects:
        n[(o["shape"], o["colour"])] = n.get((o["shape"], o["colour"]), 0) + 1
    return n


def reference(scene: Dict[str, Any], obj: Dict[str, Any], rng: random.Random) -> str:
    """'the circle' when the shape is unique in the scene (half the time), else 'the red circle'."""
    unique_shape = sum(o["shape"] == obj["shape"] for o in scene["objects"]) == 1
    if unique_shape and rng.random() < 0.5:
        return f"the {obj['shape']}"
    return f"the {obj['colour']} {obj['shape']}"


def _recolour(obj: Dict[str, Any], new: str) -> None:
    # the object's own colour noise carried over: rgb - base of the old colour, onto the new base
    noise = [v - b for v, b in zip(obj["rgb"], RGB[obj["colour"]])]
    obj["rgb"] = [int(min(255, max(0, b + d))) for b, d in zip(RGB[new], noise)]
    obj["colour"] = new


def _move(obj: Dict[str, Any], new: str, size: int) -> None:
    # the object's own jitter carried over to the new position
    (fx, fy), (gx, gy) = POSITION_XY[obj["position"]], POSITION_XY[new]
    obj["x"] = round(obj["x"] + (gx - fx) * size, 2)
    obj["y"] = round(obj["y"] + (gy - fy) * size, 2)
    obj["position"] = new


def _resize(obj: Dict[str, Any], new: str, size: int) -> None:
    # the same place in the new size's radius range
    (lo, hi), (nlo, nhi) = RADIUS[obj["size"]], RADIUS[new]
    t = (obj["r"] / size - lo) / (hi - lo)
    obj["r"] = round((nlo + t * (nhi - nlo)) * size, 2)
    obj["size"] = new


def make_edit(rng: random.Random, split: str, size: int, op: str) -> Tuple[Dict[str, Any], Dict[str, Any], str, Dict[str, Any]]:
    """(source scene, target scene, instruction, edit description) of one ``op`` edit."""
    if op not in EDIT_OPS:
        raise ValueError(f"unknown edit {op!r}; valid: {', '.join(EDIT_OPS)}")
    pairs = set(allowed_pairs(split))
    for _ in range(1000):
        scene = random_scene(rng, split, size, rng.randint(2, 3) if op == "remove" else None)
        counts = _pair_counts(scene["objects"])
        cands = [i for i, o in enumerate(scene["objects"]) if counts[(o["shape"], o["colour"])] == 1]
        if not cands:
            continue
        i = rng.choice(cands)
        target = copy.deepcopy(scene)
        obj = target["objects"][i]
        src = {k: obj[k] for k in ("shape", "colour", "size", "position")}
        ref = reference(scene, obj, rng)
        if op == "colour":
            # a new (shape, colour) the split allows and the scene does not hold yet: the
            # edited object stays the only one of its pair
            new = [c for c in COLOURS if c != obj["colour"] and (obj["shape"], c) in pairs
                   and (obj["shape"], c) not in counts]
            if not new:
                continue
            to = rng.choice(new)
            _recolour(obj, to)
            text = rng.choice(COLOUR_FORMS).format(ref=ref, new=to)
        elif op == "position":
            free = [p for p in POSITIONS if p not in {o["position"] for o in scene["objects"]}]
            to = rng.choice(free)
            _move(obj, to, size)
            text = rng.choice(MOVE_FORMS).format(ref=ref, to=MOVE_PHRASE[to])
        elif op == "size":
            to = [s for s in SIZES if s != obj["size"]][0]
            _resize(obj, to, size)
            text = rng.choice(SIZE_FORMS).format(ref=ref, new=to, er=SIZE_WORD[to])
        else:
            to = None
            del target["objects"][i]
            text = rng.choice(REMOVE_FORMS).format(ref=ref)
        text = text[0].upper() + text[1:]
        info = {"op": op, "object": src, "attribute": None if op == "remove" else op,
                "from": None if op == "remove" else src[op], "to": to}
        return scene, target, text, info
    raise RuntimeError(f"no {op} edit found in 1000 scenes (world parameters broken?)")


def make_edit_sample(seed: int, split: str, index: int, size: int = 64) -> Tuple[Dict[str, Any], bytes, bytes]:
    """Record (without ``id`` / ``images``) and the PNG bytes of source and target; deterministic
    in (seed, split, index) alone, like every world sample."""
    rng = sample_rng(seed, split, EDIT_TASK, index)
    op = EDIT_OPS[index % len(EDIT_OPS)]
    source, target, text, info = make_edit(rng, split, size, op)
    rec = {"task": EDIT_TASK, "source": "world", "split": split,
           "messages": [{"role": "user", "content": f"{IMAGE_TOKEN}\n{text}"},
                        {"role": "assistant", "content": IMAGE_GEN_PLACEHOLDER}],
           "scene": _public_scene(target), "source_scene": _public_scene(source), "edit": info}
    return rec, png_bytes(render(source)), png_bytes(render(target))


def build_edit_shard_sample(seed: int, split: str, index: int, size: int) -> ShardSample:
    """The world renderer's builder for the ``edit`` task (``datamodules.world.generate_split``)."""
    rec, src, tgt = make_edit_sample(seed, split, index, size)
    key = sample_key(split, EDIT_TASK, index)
    rec["id"] = key
    rec["images"] = [image_member(0, "png"), image_member(1, "png")]
    return ShardSample(key=key, record=rec, files={rec["images"][0]: src, rec["images"][1]: tgt})


BUILDERS = {EDIT_TASK: build_edit_shard_sample}


def main(argv: Optional[List[str]] = None) -> int:
    return world_main(argv, builders=BUILDERS)


if __name__ == "__main__":
    sys.exit(main())

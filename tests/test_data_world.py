"""The shape world: determinism, exact answers, balance, held-out split, CLI."""
import json
import os
import re
import time

import numpy as np

from datamodules import world
from datamodules.schema import iter_tar, read_manifest


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path):
    counts = {t: 6 for t in world.TASKS}
    world.generate_split(str(tmp_path / "a"), "train", counts, seed=3, size=32, shard_size=4)
    world.generate_split(str(tmp_path / "b"), "train", counts, seed=3, size=32, shard_size=4, workers=2)
    world.generate_split(str(tmp_path / "c"), "train", counts, seed=4, size=32, shard_size=4)
    names = sorted(f for f in os.listdir(tmp_path / "a") if f.endswith(".tar"))
    assert len(names) == 2 * len(world.TASKS)
    for n in names:  # whole shard files, not just images, and independent of the worker count
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n
    assert (tmp_path / "a" / names[0]).read_bytes() != (tmp_path / "c" / names[0]).read_bytes()
    # a sample does not depend on how many samples were asked for
    rec5, png5 = world.make_sample(3, "train", "vqa", 5, 32)
    world.generate_split(str(tmp_path / "d"), "train", {"vqa": 9}, seed=3, size=32, shard_size=100)
    raw = [s for s in iter_tar(str(tmp_path / "d" / "vqa-000000.tar"))][5]
    assert raw["img0.png"] == png5 and json.loads(raw["json"])["messages"] == rec5["messages"]


def _answer_from_scene(q: str, objs) -> str:
    """Independent re-derivation of the answer from the question text + scene description."""
    q = q.replace(" " + world.VQA_SUFFIX, "").split("\n")[-1]
    pos_of = {v: k for k, v in world.POSITION_PHRASE.items()}
    plural = {v: k for k, v in world.PLURAL.items()}
    if m := re.fullmatch(r"What colour is the (\w+)\?", q):
        (o,) = [o for o in objs if o["shape"] == m[1]]
        return o["colour"]
    if m := re.fullmatch(r"What shape is the (\w+) object\?", q):
        (o,) = [o for o in objs if o["colour"] == m[1]]
        return o["shape"]
    if q == "How many objects are there?":
        return str(len(objs))
    if m := re.fullmatch(r"How many (\w+) objects are there\?", q):
        return str(sum(o["colour"] == m[1] for o in objs))
    if m := re.fullmatch(r"How many (\w+) are there\?", q):
        return str(sum(o["shape"] == plural[m[1]] for o in objs))
    if m := re.fullmatch(r"Where is the (\w+) (\w+)\?", q):
        (o,) = [o for o in objs if o["colour"] == m[1] and o["shape"] == m[2]]
        return o["position"]
    if m := re.fullmatch(r"Is there a (\w+) (\w+) in the image\?", q):
        return "yes" if any(o["colour"] == m[1] and o["shape"] == m[2] for o in objs) else "no"
    if m := re.fullmatch(r"Is the (\w+) (\w+) ((?:on|at|in) the \w+)\?", q):
        (o,) = [o for o in objs if o["colour"] == m[1] and o["shape"] == m[2]]
        return "yes" if o["position"] == pos_of[m[3]] else "no"
    if m := re.fullmatch(r"Is the (\w+) (\w+)\?", q):
        (o,) = [o for o in objs if o["shape"] == m[1]]
        return "yes" if o["colour"] == m[2] else "no"
    raise AssertionError(f"unparsed question {q!r}")


def _check_render(rec, png):
    """Rendered pixels agree with the description: object colour at its centre, position region."""
    from io import BytesIO

    from PIL import Image

    img = np.asarray(Image.open(BytesIO(png)).convert("RGB")).astype(int)
    size = rec["scene"]["size"]
    assert img.shape == (size, size, 3)
    for o in rec["scene"]["objects"]:
        px = img[int(o["y"]), int(o["x"])]
        assert np.abs(px - np.array(o["rgb"])).max() <= 30, (o, px)  # background noise only
        fx, fy = world.POSITION_XY[o["position"]]
        assert abs(o["x"] / size - fx) < 0.05 and abs(o["y"] / size - fy) < 0.05


def test_vqa_answers_match_scene_and_image():
    n = 0
    for i in range(240):
        rec, png = world.make_sample(0, "train", "vqa", i, 64)
        q, a = rec["messages"][0]["content"], rec["messages"][1]["content"]
        assert rec["answers"] == [a] * 10
        assert _answer_from_scene(q, rec["scene"]["objects"]) == a, (q, a, rec["scene"]["objects"])
        if i % 8 == 0:
            _check_render(rec, png)
        n += 1
    # conversations: every turn's answer is exact too
    for i in range(60):
        rec, _ = world.make_sample(0, "val", "conv", i, 64)
        msgs = rec["messages"]
        assert len(msgs) in (4, 6) and msgs[0]["content"].startswith("<image>\n")
        for u, a in zip(msgs[::2], msgs[1::2]):
            if "?" in u["content"] and not any(p in u["content"] for p in world.CAPTION_PROMPTS):
                assert _answer_from_scene(u["content"], rec["scene"]["objects"]) == a["content"]


def test_answer_distribution_balanced_per_question_type():
    import random

    # the sampler behind make_sample(task="vqa"); rendering is not needed to check balance
    counts = {t: {} for t in world.QUESTION_TYPES}

    for t in world.QUESTION_TYPES:
        rng = random.Random(f"balance-{t}")
        for _ in range(300):
            _, _, a = world.balanced_question(rng, "train", 64, t)
            counts[t][a] = counts[t].get(a, 0) + 1
    for t, c in counts.items():
        space = world.ANSWER_SPACE[t]
        assert set(c) == set(space), (t, c)
        expect = 300 / len(space)
        for a, k in c.items():  # within ~4 sigma of uniform
            assert abs(k - expect) < 4 * np.sqrt(expect), (t, c)


def test_captions_and_generation_instructions_name_every_object():
    for i in range(80):
        for task in ("caption", "gen"):
            rec, _ = world.make_sample(2, "train", task, i, 64)
            text = rec["messages"][1 if task == "caption" else 0]["content"]
            objs = rec["scene"]["objects"]
            for (shape, colour) in {(o["shape"], o["colour"]) for o in objs}:
                n = sum(o["shape"] == shape and o["colour"] == colour for o in objs)
                if n == 1:
                    assert re.search(rf"\ba[n]? (?:\w+ )?{colour} {shape}\b", text, re.I), (text, objs)
                else:
                    assert re.search(rf"\b{world.NUMBER_WORD[n]} (?:\w+ )?{colour} {world.PLURAL[shape]}\b", text, re.I), text
            if task == "gen":
                assert rec["messages"][1]["content"] == "<image_gen>"
                if rec["checks"]["position"]:
                    for o in objs:
                        assert world.POSITION_PHRASE[o["position"]] in text


def test_class_labels():
    seen = set()
    for i in range(200):
        rec, png = world.make_sample(0, "train", "class", i, 32)
        (o,) = rec["scene"]["objects"]
        assert rec["label"] == world.class_label(o["shape"], o["colour"])
        assert world.class_name(rec["label"]) == rec["class_name"] == f"{o['colour']} {o['shape']}"
        seen.add(rec["label"])
    held = {world.class_label(s, c) for s, c in world.HELDOUT_PAIRS}
    assert seen == set(range(world.NUM_CLASSES)) - held


def test_heldout_split_is_disjoint_from_training():
    held = set(world.HELDOUT_PAIRS)
    held_text = [f"{c} {s}" for s, c in held] + [f"{s} {c}" for s, c in held]
    for split in ("train", "val", "test"):
        for task in world.TASKS:
            for i in range(40):
                rec, _ = world.make_sample(0, split, task, i, 32)
                pairs = {(o["shape"], o["colour"]) for o in rec["scene"]["objects"]}
                assert not pairs & held, (split, task, pairs)
                text = " ".join(m["content"] for m in rec["messages"])
                # no held-out pair named either (e.g. "Is there a yellow circle?" -> "no")
                assert not any(h in text for h in held_text), text
    for task in world.TASKS:
        for i in range(40):
            rec, _ = world.make_sample(0, "heldout", task, i, 32)
            assert {(o["shape"], o["colour"]) for o in rec["scene"]["objects"]} & held


def test_cli_writes_splits_and_manifest(tmp_path):
    rc = world.main(["--out", str(tmp_path), "--train", "7", "--val", "3", "--test", "0", "--heldout", "2",
                     "--tasks", "vqa,gen", "--count", "train.gen=5", "--size", "48", "--shard-size", "4"])
    assert rc == 0
    m = read_manifest(str(tmp_path / "train"))
    assert m["num_by_task"] == {"vqa": 7, "gen": 5} and m["world"]["size"] == 48
    assert sorted(f for f in os.listdir(tmp_path / "train") if f.endswith(".tar")) == [
        "gen-000000.tar", "gen-000001.tar", "vqa-000000.tar", "vqa-000001.tar"]
    assert not (tmp_path / "test").exists()
    assert read_manifest(str(tmp_path / "heldout"))["num_samples"] == 4


def test_generation_speed():
    # 50k samples must take well under a minute per core; 1000 here, generous for a shared CPU
    t = time.perf_counter()
    for i in range(1000):
        world.build_shard_sample(0, "train", world.TASKS[i % 5], i, 64)
    dt = time.perf_counter() - t
    assert dt < 4.0, f"{dt:.2f} s per 1000 samples -> {50 * dt:.0f} s per 50k"

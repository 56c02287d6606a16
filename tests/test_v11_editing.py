"""Image editing as a task type, end to end: a VARGPT-v1.1 editing JSON in the release's own
format (VARGPT-family-training/data/eval_inference_demo_edit.json: ShareGPT ``messages`` +
``images``, ``<image>`` in the user turn, ``<image_gen>`` in the assistant turn, the source image
listed first) converts to ``edit`` shards; the stream, the collator and the v1.1 model's editing
forward take them (source through the ViT / understanding path, target through the generation
path); a tiny v1.1 model trains on them through ``python -m experiments.run`` and
``python -m experiments.infer`` edits an image from its export, seeded and batched."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import convert
from datamodules.config import SourceConfig
from datamodules.schema import iter_tar, read_manifest
from datamodules.stream import ShardStream
from experiments.config import REPO_ROOT, load_config

from tests.tiny import tiny_tokenizer_dir

# the v1.1 world model at its smallest that still has every part (tests/test_vargpt11_stages.py)
SMALL = ["model.v11.llm.num_hidden_layers=1", "model.v11.tokenizer.base_ch=24", "model.v11.tokenizer.ch_mult=[1,1,1,1,1]", "model.v11.tokenizer.scales=[[1,1],[2,2],[4,4]]",
         "model.v11.decoder.depth=1"]
INSTRUCTIONS = ["Make the red square blue. <image>", "<image>\nMove the circle to the left.",
                "Remove the triangle from this image <image>"]


def _square(colour, at=(4, 4)) -> Image.Image:
    im = Image.new("RGB", (32, 32), (225, 225, 225))
    im.paste(colour, (at[0], at[1], at[0] + 12, at[1] + 12))
    return im


def official_edit_json(root, records=None):
    """An editing file with the release's field names: paths relative to the training root (as
    "data/vargpt_edit/input_edit.jpg"), an integer ``id``, source first in ``images``."""
    d = root / "data" / "vargpt_edit"
    d.mkdir(parents=True, exist_ok=True)
    recs = []
    for i, text in enumerate(INSTRUCTIONS):
        _square((200, 30, 30), (4 + 6 * i, 4)).save(d / f"src{i}.png")
        _square((30, 30, 200), (4 + 6 * i, 14)).save(d / f"tgt{i}.jpg")
        recs.append({"messages": [{"content": text, "role": "user"},
                                  {"content": "The output image is: <image_gen>", "role": "assistant"}],
                     "images": [f"data/vargpt_edit/src{i}.png", f"data/vargpt_edit/tgt{i}.jpg"], "id": 4765 + i})
    path = root / "edit_demo.json"
    path.write_text(json.dumps(records if records is not None else recs, indent=1))
    return path


def test_official_editing_json_converts_to_edit_shards(tmp_path):
    src = official_edit_json(tmp_path)
    assert convert.main(["sharegpt", "--input", str(src), "--image-root", str(tmp_path), "--out", str(tmp_path / "s")]) == 0
    m = read_manifest(str(tmp_path / "s"))
    assert m["num_by_task"] == {"edit": 3} and [s["name"] for s in m["shards"]] == ["edit-000000.tar"]
    raws = list(iter_tar(str(tmp_path / "s" / "edit-000000.tar")))
    for i, raw in enumerate(raws):
        rec = json.loads(raw["json"])
        assert rec["task"] == "edit" and rec["id"] == str(4765 + i)
        assert rec["images"] == ["img0.png", "img1.jpg"]  # source first, target second, original bytes
        assert raw["img0.png"] == (tmp_path / f"data/vargpt_edit/src{i}.png").read_bytes()
        assert raw["img1.jpg"] == (tmp_path / f"data/vargpt_edit/tgt{i}.jpg").read_bytes()
    # --task edit accepts the same file
    assert convert.main(["sharegpt", "--input", str(src), "--image-root", str(tmp_path), "--out", str(tmp_path / "e"),
                         "--task", "edit"]) == 0


def _bad(tmp_path, capsys, rec, *extra):
    official_edit_json(tmp_path)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([rec]))
    rc = convert.main(["sharegpt", "--input", str(path), "--image-root", str(tmp_path), "--out", str(tmp_path / "o"),
                       *extra])
    return rc, capsys.readouterr().err


def test_bad_editing_samples_name_the_sample_and_the_fix(tmp_path, capsys):
    ok_imgs = ["data/vargpt_edit/src0.png", "data/vargpt_edit/tgt0.jpg"]
    # no source <image>: an editing file (--task edit) says where the source goes
    rc, err = _bad(tmp_path, capsys, {"id": "no_src", "images": ok_imgs[1:], "messages": [
        {"role": "user", "content": "Make it blue."}, {"role": "assistant", "content": "<image_gen>"}]}, "--task", "edit")
    assert rc == 1 and "'no_src'" in err and "put <image> in the user turn" in err and "bad.json" in err
    # no <image_gen> turn
    rc, err = _bad(tmp_path, capsys, {"id": "no_gen", "images": ok_imgs[:1], "messages": [
        {"role": "user", "content": "<image> Make it blue."}, {"role": "assistant", "content": "Done."}]}, "--task", "edit")
    assert rc == 1 and "'no_gen'" in err and "put <image_gen> in the assistant turn" in err
    # the source image file is missing: named as the source, with the path
    rc, err = _bad(tmp_path, capsys, {"id": 7, "images": ["data/vargpt_edit/gone.png", ok_imgs[1]], "messages": [
        {"role": "user", "content": "<image> Make it blue."}, {"role": "assistant", "content": "<image_gen>"}]})
    assert rc == 1 and "'7'" in err and "source image 0 of the edit sample" in err and "gone.png" in err
    # only the target listed (the source left out of `images`)
    rc, err = _bad(tmp_path, capsys, {"id": "one_img", "images": ok_imgs[1:], "messages": [
        {"role": "user", "content": "<image> Make it blue."}, {"role": "assistant", "content": "<image_gen>"}]})
    assert rc == 1 and "'one_img'" in err and "list the source image(s) first" in err
    # --on-error skip lists it in the manifest instead
    rc, _ = _bad(tmp_path, capsys, {"id": "one_img", "images": ok_imgs[1:], "messages": [
        {"role": "user", "content": "<image> Make it blue."}, {"role": "assistant", "content": "<image_gen>"}]},
        "--on-error", "skip")
    assert rc == 0 and read_manifest(str(tmp_path / "o"))["skipped"][0]["id"] == "one_img"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """edit shards (converted from the release's format), world gen + vqa shards, a tokenizer."""
    from datamodules.world import generate_split

    root = tmp_path_factory.mktemp("edit")
    assert convert.main(["sharegpt", "--input", str(official_edit_json(root)), "--image-root", str(root),
                         "--out", str(root / "train")]) == 0
    from datamodules.world_edit import BUILDERS

    # the world's gen / vqa data and its editing pairs (datamodules/world_edit.py)
    generate_split(str(root / "world"), "train", {"gen": 4, "vqa": 4, "edit": 4}, seed=0, size=32, shard_size=4,
                   builders=BUILDERS)
    return root, tiny_tokenizer_dir(root)


def _model(root, tok, *over):
    from modules.vargpt11_world import VARGPT11World

    loaded = load_config(REPO_ROOT / "experiments/v11/world.yaml",
                         [f"model.tokenizer.path={tok}", f"data.root={root}", *SMALL, *over])
    torch.manual_seed(0)
    return VARGPT11World(loaded.cfg.model, template=loaded.cfg.data.chat)


def test_mixed_stream_collator_and_editing_forward(shards, caplog):
    root, tok = shards
    srcs = [SourceConfig("edit", str(root / "train/edit-*.tar"), 1.0, "edit"),
            SourceConfig("gen", str(root / "world/gen-*.tar"), 1.0, "generation"),
            SourceConfig("vqa", str(root / "world/vqa-*.tar"), 1.0, "understanding"),
            SourceConfig("world_edit", str(root / "world/edit-*.tar"), 1.0, "edit")]
    it = iter(ShardStream(srcs, "train", seed=0, shuffle_buffer=4))
    samples = [next(it) for _ in range(30)]
    assert {s["task"] for s in samples} == {"edit", "generation", "understanding"}
    net = _model(root, tok)
    col = net.collator(train=True)
    edits = [s for s in samples if s["task"] == "edit"][:2]
    batch = col(edits + [s for s in samples if s["task"] == "generation"][:1])
    # the edit rows: one source image each (ViT patches) and one target each (generation pixels)
    assert batch["image_sample_idx"].tolist() == [0, 1] and batch["gen_sample_idx"].tolist() == [0, 1, 2]
    assert batch["gen_images"].shape == (3, 3, net.gen_resolution, net.gen_resolution)
    ids, lab = batch["input_ids"][0], batch["labels"][0]
    img_at = (ids == net.cfg.ids.image_pad).nonzero().flatten()
    gen_at = int((ids == net.cfg.ids.gen_start).nonzero()[0, 0])
    assert len(img_at) == net.num_image_tokens and int(img_at[-1]) < gen_at  # source before the target
    assert (lab[img_at] == -100).all() and int(lab[gen_at]) == net.cfg.ids.gen_start  # the target's start supervised
    assert not batch["gen_uncond"][:2].any()  # edit samples are never prompt-dropped

    out = net(batch)
    assert torch.isfinite(out["loss_img"]) and float(out["loss_img"].detach()) > 0
    out["loss"].backward()
    # the image loss reaches the ViT: the source went through the understanding path into the
    # prompt states the decoder cross-attends to
    assert net.visual.patch_embed.proj.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.gen.vargpt_gen.parameters())
    # ... and another source image gives another image loss (same target, same draws)
    net.eval()
    b2 = dict(batch, pixel_values=batch["pixel_values"].flip(-1))
    with torch.no_grad():
        a, b = net(batch)["loss_img"], net(b2)["loss_img"]
    assert not torch.allclose(a, b)

    # an edit source refuses a record that is not an editing sample: logged with its key, counted
    caplog.set_level(logging.WARNING)
    bad = ShardStream([SourceConfig("edit", str(root / "world/gen-*.tar"), 1.0, "edit")], "eval")
    assert list(bad) == [] and bad.n_unreadable == 4
    assert "world_train_gen_0000000" in caplog.text and "put <image> in the user turn" in caplog.text


def test_tiny_v11_trains_on_edits_and_edits_an_image(shards, tmp_path, capsys):
    """python -m experiments.run on the edit shards (+ the world's generation data), then
    python -m experiments.infer --edit-image from the export: seeded, batched, source-dependent."""
    from experiments.infer import main as infer_main
    from experiments.run import main as run_main

    root, tok = shards
    sources = ("data.sources=[{name: edit, shards: 'train/edit-*.tar', task: edit, weight: 2},"
               "{name: world_edit, shards: 'world/edit-*.tar', task: edit},"
               "{name: gen, shards: 'world/gen-*.tar', task: generation}]")
    assert run_main([str(REPO_ROOT / "experiments/v11/world.yaml"), "stage=stage3", f"model.tokenizer.path={tok}",
                     f"data.root={root}", sources, f"output_dir={tmp_path / 'run'}", "logging.enabled=false",
                     "trainer.max_steps=2", "data.batch_size=3", "trainer.num_threads=1", "checkpoint.at_end=false",
                     *SMALL]) == 0
    export = tmp_path / "run"
    assert (export / "model.safetensors").is_file()
    srcs = [tmp_path / "src_a.png", tmp_path / "src_b.png"]
    _square((200, 30, 30)).save(srcs[0])
    _square((30, 160, 30), (16, 16)).save(srcs[1])

    def edit(out, order=(0, 1), seed=3):
        args = [str(export), "--seed", str(seed), "--out", str(tmp_path / out)]
        for i in order:  # two prompts of one length: one batch
            args += ["--prompt", "Make the red square blue. <image>", "--edit-image", str(srcs[i])]  # source after the text
        assert infer_main(args) == 0
        return np.asarray(Image.open(tmp_path / out))

    a = edit("a.png")
    assert a.shape == (64, 128, 3)
    assert np.array_equal(a, edit("again.png"))  # seeded: the same bytes again
    # row 1 draws from seed 3 + 1 whatever its source: swapping the sources changes the images
    # (the edit conditions on its source image), a new seed changes them too
    swapped = edit("swapped.png", order=(1, 0))
    assert not np.array_equal(a[:, :64], swapped[:, :64])
    assert not np.array_equal(a, edit("seed.png", seed=4))
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="2 --edit-image for 1 prompt"):
        infer_main([str(export), "--prompt", "Make it blue.", "--edit-image", str(srcs[0]), "--edit-image", str(srcs[1])])

    # python -m experiments.infer_edit: the world's edits of a shard set, scored beside the
    # rendered targets (the ceiling) and the unedited sources (the copy baseline)
    from datamodules.world import generate_split
    from datamodules.world_edit import BUILDERS
    from experiments.infer_edit import main as infer_edit_main

    generate_split(str(tmp_path / "we"), "test", {"edit": 4}, seed=0, size=64, builders=BUILDERS)
    rep = tmp_path / "edits.json"
    assert infer_edit_main([str(export), "--shards", str(tmp_path / "we/edit-*.tar"), "--limit", "4", "--out", str(rep),
                            "--grid", str(tmp_path / "edits.png")]) == 0
    r = json.loads(rep.read_text())
    assert r["n"] == 4 and r["model"]["n"] == 4 and 0 <= r["model"]["edit"] <= 1 and 0 <= r["model"]["preservation"] <= 1
    assert r["targets"]["edit"] == 1.0 and r["copy"]["edit"] == 0.0 and r["copy"]["preservation"] >= 0.9
    assert set(r["model"]["by_op"]) == {"colour", "position", "size", "remove"}
    assert Image.open(tmp_path / "edits.png").size == (3 * 64, 4 * 64)

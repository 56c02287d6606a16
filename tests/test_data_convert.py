"""Converters: every real-format fixture converts and reads back unchanged; bad input is reported."""
import json
import os
import shutil

import pytest

from datamodules import convert
from datamodules.schema import iter_tar, read_manifest, validate_record

from tests.conftest import FIXTURES, require_fixture

F = str(FIXTURES / "formats")


@pytest.fixture(autouse=True)
def _formats_present():
    require_fixture("formats")


def run(fmt, out, *args):
    a = convert.build_parser().parse_args([fmt, "--out", str(out), *args])
    return convert.convert(a)


def read_all(out):
    m = read_manifest(str(out))
    samples = []
    for s in m["shards"]:
        for raw in iter_tar(os.path.join(out, s["name"])):
            rec = json.loads(raw["json"])
            validate_record(rec)
            samples.append((rec, raw))
    assert len(samples) == m["num_samples"] == sum(s["count"] for s in m["shards"])
    return m, samples


def assert_images_unchanged(rec, raw, expected_paths):
    assert rec["image_paths"] == expected_paths
    assert len(rec["images"]) == len(expected_paths)
    for member, path in zip(rec["images"], expected_paths):
        with open(path, "rb") as f:
            assert raw[member] == f.read(), path


def _msgs(rec):
    return [(m["role"], m["content"]) for m in rec["messages"]]


@pytest.mark.parametrize("name", ["mllm_understanding_demo.json", "vargpt_generation_demo.json"])
def test_sharegpt(tmp_path, name):
    src = f"{F}/sharegpt/{name}"
    run("sharegpt", tmp_path, "--input", src)
    m, samples = read_all(tmp_path)
    data = json.load(open(src, encoding="utf-8"))
    assert len(samples) == len(data) and m["num_skipped"] == 0
    for (rec, raw), d in zip(samples, data):
        assert _msgs(rec) == [(x["role"], x["content"]) for x in d["messages"]]
        assert_images_unchanged(rec, raw, [os.path.join(F, "sharegpt", p) for p in d["images"]])
        assert rec["task"] == ("gen" if "generation" in name else "understanding")
    assert m["num_by_task"] == {("gen" if "generation" in name else "understanding"): len(data)}


def test_llava(tmp_path):
    src = f"{F}/llava/llava_mix_sample.json"
    run("llava", tmp_path, "--input", src)
    m, samples = read_all(tmp_path)
    data = json.load(open(src))
    assert len(samples) == 4
    roles = {"human": "user", "gpt": "assistant"}
    for (rec, raw), d in zip(samples, data):
        assert rec["id"] == d["id"]
        assert _msgs(rec) == [(roles[c["from"]], c["value"]) for c in d["conversations"]]
        assert_images_unchanged(rec, raw, [os.path.join(F, "llava", d["image"])] if "image" in d else [])
    # the image placeholder after the text survives as written; the text-only sample has no image
    assert samples[1][0]["messages"][0]["content"].endswith("\n<image>")
    assert samples[2][0]["images"] == [] and "img0.jpg" not in samples[2][1]


def test_imagefolder(tmp_path):
    run("imagefolder", tmp_path, "--input", f"{F}/imagefolder")
    m, samples = read_all(tmp_path)
    assert [r["id"] for r, _ in samples] == ["n01440764_a", "n01440764_b", "n02102040_c", "n02102040_d"]
    assert [r["label"] for r, _ in samples] == [0, 0, 1, 1]
    assert [r["class_name"] for r, _ in samples] == ["tench", "tench", "English springer", "English springer"]
    for rec, raw in samples:
        assert rec["task"] == "gen" and rec["messages"][1]["content"] == "<image_gen>"
        assert rec["class_name"] in rec["messages"][0]["content"]
        assert_images_unchanged(rec, raw, [os.path.join(F, "imagefolder", rec["synset"], rec["id"].split("_")[1] + ".jpg")])


def test_coco_caption_and_t2i(tmp_path):
    run("coco", tmp_path, "--input", f"{F}/coco/captions_tiny.json", "--image-root", f"{F}/coco/images")
    m, samples = read_all(tmp_path)
    anns = json.load(open(f"{F}/coco/captions_tiny.json"))["annotations"]
    assert m["num_by_task"] == {"caption": len(anns), "gen": len(anns)}
    caps = {r["meta"]["ann_id"]: r for r, _ in samples if r["task"] == "caption"}
    gens = {r["meta"]["ann_id"]: r for r, _ in samples if r["task"] == "gen"}
    files = {i["id"]: i["file_name"] for i in json.load(open(f"{F}/coco/captions_tiny.json"))["images"]}
    for a in anns:
        assert caps[a["id"]]["messages"][1]["content"] == a["caption"]
        assert a["caption"] in gens[a["id"]]["messages"][0]["content"]
        assert gens[a["id"]]["messages"][1]["content"] == "<image_gen>"
    for rec, raw in samples:
        assert_images_unchanged(rec, raw, [os.path.join(F, "coco/images", files[rec["meta"]["image_id"]])])


def test_vqav2_keeps_all_ten_answers(tmp_path):
    run("vqav2", tmp_path, "--input", f"{F}/vqav2/v2_OpenEnded_mscoco_tiny_questions.json",
        "--annotations", f"{F}/vqav2/v2_mscoco_tiny_annotations.json", "--image-root", f"{F}/vqav2/images")
    m, samples = read_all(tmp_path)
    qs = json.load(open(f"{F}/vqav2/v2_OpenEnded_mscoco_tiny_questions.json"))["questions"]
    anns = {a["question_id"]: a for a in json.load(open(f"{F}/vqav2/v2_mscoco_tiny_annotations.json"))["annotations"]}
    assert len(samples) == len(qs)
    for (rec, raw), q in zip(samples, qs):
        a = anns[q["question_id"]]
        assert rec["answers"] == [x["answer"] for x in a["answers"]] and len(rec["answers"]) == 10
        assert q["question"] in rec["messages"][0]["content"]
        assert rec["messages"][1]["content"] == a["multiple_choice_answer"]
        assert_images_unchanged(rec, raw, [f"{F}/vqav2/images/COCO_val2014_{q['image_id']:012d}.jpg"])


# ------------------------------------------------------------------ malformed input

def _copy_demo(tmp_path):
    shutil.copytree(f"{F}/sharegpt/mllm_demo_data", tmp_path / "mllm_demo_data")
    return json.load(open(f"{F}/sharegpt/mllm_understanding_demo.json", encoding="utf-8"))


def test_missing_image_fails_with_id_and_file_or_is_skipped_and_counted(tmp_path):
    data = _copy_demo(tmp_path)
    data[2]["id"] = "the_bad_one"
    data[2]["images"] = ["mllm_demo_data/does_not_exist.jpg"]
    src = tmp_path / "in.json"
    src.write_text(json.dumps(data))
    with pytest.raises(convert.ConversionError) as e:
        run("sharegpt", tmp_path / "out", "--input", str(src))
    assert "the_bad_one" in str(e.value) and str(src) in str(e.value) and "image not found" in str(e.value)
    m = run("sharegpt", tmp_path / "out2", "--input", str(src), "--on-error", "skip")
    assert m["num_samples"] == len(data) - 1 and m["num_skipped"] == 1
    assert m["skipped"][0]["id"] == "the_bad_one" and "does_not_exist.jpg" in m["skipped"][0]["reason"]
    assert read_manifest(str(tmp_path / "out2"))["num_skipped"] == 1


def test_unreadable_image_and_count_mismatch(tmp_path):
    data = _copy_demo(tmp_path)
    (tmp_path / "mllm_demo_data" / "broken.jpg").write_bytes(open(f"{F}/coco/images/1.jpg", "rb").read()[:500])
    data[0]["images"] = ["mllm_demo_data/broken.jpg"]
    data[1]["images"] = ["mllm_demo_data/1.jpg", "mllm_demo_data/2.jpg"]  # one <image>, two images
    src = tmp_path / "in.json"
    src.write_text(json.dumps(data))
    m = run("sharegpt", tmp_path / "out", "--input", str(src), "--on-error", "skip")
    reasons = {s["index"]: s["reason"] for s in m["skipped"]}
    assert set(reasons) == {0, 1} and m["num_samples"] == len(data) - 2
    assert "cannot read image" in reasons[0]
    assert "1 image placeholder(s)" in reasons[1] and "2 image(s)" in reasons[1]


def test_bad_json_line_in_jsonl(tmp_path):
    shutil.copytree(f"{F}/llava/mllm_demo_data", tmp_path / "mllm_demo_data")
    lines = [json.dumps(d) for d in json.load(open(f"{F}/llava/llava_mix_sample.json"))]
    lines.insert(2, '{"id": "x", "conversations": [')  # truncated record on line 3
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(convert.ConversionError, match=r"line 3: bad JSON"):
        run("llava", tmp_path / "out", "--input", str(src))
    m = run("llava", tmp_path / "out2", "--input", str(src), "--on-error", "skip")
    assert m["num_samples"] == 4 and m["num_skipped"] == 1 and m["skipped"][0]["index"] == 3


def test_malformed_record_and_cli_exit_status(tmp_path, capsys):
    data = _copy_demo(tmp_path)
    data[3]["messages"][1]["role"] = "user"  # two user turns in a row
    src = tmp_path / "in.json"
    src.write_text(json.dumps(data))
    rc = convert.main(["sharegpt", "--input", str(src), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and "roles must alternate" in err and "in_000003" in err and "--on-error skip" in err
    rc = convert.main(["sharegpt", "--input", str(src), "--out", str(tmp_path / "o2"), "--on-error", "skip"])
    assert rc == 0 and read_manifest(str(tmp_path / "o2"))["num_skipped"] == 1
    src.write_text("{not json")
    assert convert.main(["sharegpt", "--input", str(src), "--out", str(tmp_path / "o3")]) == 1


def test_workers_and_shard_size_give_the_same_samples(tmp_path):
    src = f"{F}/sharegpt/mllm_understanding_demo.json"
    run("sharegpt", tmp_path / "a", "--input", src, "--shard-size", "4")
    run("sharegpt", tmp_path / "b", "--input", src, "--shard-size", "4", "--workers", "2")
    for n in ("understanding-000000.tar", "understanding-000001.tar"):
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes()
    assert [s["count"] for s in read_manifest(str(tmp_path / "a"))["shards"]] == [4, 2]


def test_resize_is_opt_in(tmp_path):
    from io import BytesIO

    from PIL import Image

    run("imagefolder", tmp_path, "--input", f"{F}/imagefolder", "--resize", "64")
    _, samples = read_all(tmp_path)
    for rec, raw in samples:
        im = Image.open(BytesIO(raw[rec["images"][0]]))
        assert min(im.size) == 64 and rec["resized"] == 64

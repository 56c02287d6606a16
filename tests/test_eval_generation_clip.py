"""Generation on real-format data, offline: `experiments.evaluate --tasks generation` on COCO
captions converted with `datamodules.convert coco`, scored with FID / IS from a local Inception
weights file and the CLIP score from a local CLIP directory (small random stand-ins saved here;
the real files cannot ship), the protocol in the report."""
from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch

from experiments.config import REPO_ROOT, load_config
from tests.conftest import FIXTURES

pytestmark = pytest.mark.lmms_eval  # `make test-eval` runs these too; they need no extra


def write_tiny_clip(d: Path) -> Path:
    """A CLIP model + processor in save_pretrained layout (random weights, 32 px, a character-level
    tokenizer): the directory eval.clip_dir points at, in miniature."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    chars = list(string.ascii_lowercase + string.digits + ".,!?'-:")
    vocab: dict = {}
    for t in ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]:
        vocab.setdefault(t, len(vocab))
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(vocab_file=str(d / "vocab.json"), merges_file=str(d / "merges.txt"), pad_token="<|endoftext|>")
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=77),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        image_size=32, patch_size=8), projection_dim=16)
    out = d / "clip"
    CLIPModel(cfg).save_pretrained(out)
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip"))


def test_clip_score_is_torchmetrics_on_the_local_model(clip_dir):
    """Same number as 100 x cos of the model's projected embeddings, floored at 0 and averaged."""
    from transformers import CLIPModel, CLIPProcessor

    from modules.metrics_clip import clip_score

    g = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, 16, 16, generator=g)
    texts = ["a red circle", "two soccer players celebrate.", "a man at a podium", "grass"]
    got = clip_score(images, texts, str(clip_dir), batch_size=3)
    model = CLIPModel.from_pretrained(clip_dir).eval()
    proc = CLIPProcessor.from_pretrained(clip_dir)
    u8 = (images * 255).round().to(torch.uint8)
    with torch.no_grad():
        im = model.get_image_features(**proc(images=list(u8), return_tensors="pt")).pooler_output
        tx = model.get_text_features(**proc(text=texts, return_tensors="pt", padding=True)).pooler_output
    cos = torch.nn.functional.cosine_similarity(im, tx, dim=-1)
    assert got["clip_score"] == pytest.approx(float((100 * cos).clamp(min=0).mean()), abs=1e-3)
    p = got["clip_protocol"]
    assert p["num_images"] == 4 and len(p["weights_sha256"]["model.safetensors"]) == 64


def test_missing_clip_dir_says_how_to_get_one(tmp_path):
    from modules.metrics_clip import clip_score

    with pytest.raises(FileNotFoundError, match="eval.clip_dir"):
        clip_score(torch.rand(1, 3, 8, 8), ["x"], str(tmp_path / "nope"))


def test_clip_texts_are_the_captions_inside_the_prompts():
    from modules.evaluation import clip_texts

    rec = {"messages": [{"role": "user", "content": "Draw this: Two men hug on a pitch."}], "captions":
           ["Two men hug on a pitch.", "Two men", "A dog."]}
    plain = {"messages": [{"role": "user", "content": "draw a red circle"}]}
    assert clip_texts([{"record": rec}, {"record": plain}]) == ["Two men hug on a pitch.", "draw a red circle"]


def test_generation_on_coco_with_fid_is_and_clip_offline(tmp_path, tracking_uri, clip_dir, monkeypatch):
    import mlflow

    from datamodules import convert
    from experiments.evaluate import main
    from experiments.run import fit
    from modules.metrics_generation import INCEPTION_WEIGHTS_FILENAME
    from tests.test_metrics_generation import write_random_inception_weights
    from tests.tiny import tiny_tokenizer_dir

    # the recipe of docs/evaluation.md, at fixture size: convert COCO captions, then evaluate generation
    coco = tmp_path / "coco"
    assert convert.main(["coco", "--input", str(FIXTURES / "formats/coco/captions_tiny.json"),
                         "--image-root", str(FIXTURES / "formats/coco/images"), "--out", str(coco), "--task", "gen"]) == 0
    from datamodules.world import generate_split

    world = tmp_path / "world"
    generate_split(str(world / "train"), "train", {"gen": 8}, seed=0, size=32, shard_size=8)
    tok = tiny_tokenizer_dir(tmp_path)
    loaded = load_config(REPO_ROOT / "experiments/tiny/stage3.yaml", [
        f"model.tokenizer.path={tok}", f"data.root={world}", f"output_dir={tmp_path / 's3'}", "init_from=''",
        f"logging.tracking_uri={tracking_uri}", "trainer.max_steps=1", "trainer.val_every_n_steps=0"])
    fit(loaded)
    weights = tmp_path / INCEPTION_WEIGHTS_FILENAME
    torch.manual_seed(0)
    write_random_inception_weights(weights)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    out = tmp_path / "report.json"
    rc = main([str(tmp_path / "s3"), "--tasks", "generation", "--out", str(out), f"data.root={coco}",
               "eval.gen_shards=gen-*.tar", "eval.num_gen=6", "eval.extractor=inception",
               f"eval.inception_weights_path={weights}", f"eval.clip_dir={clip_dir}", f"eval.cache_dir={tmp_path / 'c'}",
               "eval.classifier_path=", "eval.prompt_gain_samples=0", "eval.cfg=2.0", "eval.seed=7"])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["gen_n"] == 6 and rep["fid"] >= 0 and rep["inception_score"] > 0 and rep["clip_score"] >= 0
    p = rep["protocol"]
    assert (p["num_gen"], p["seed"], p["cfg"], p["extractor"], p["resolution"]) == (6, 7, 2.0, "inception", 16)
    assert p["clip_dir"] == str(clip_dir) and "resize" in p
    g = rep["gen_metrics_protocol"]
    assert g["extractor"]["weights_sha256"] and g["num_fake_images"] == 6 and g["num_real_images"] == 6
    c = rep["clip_protocol"]
    assert c["num_images"] == 6 and c["weights_sha256"]["model.safetensors"]
    client = mlflow.MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("vargpt-eval").experiment_id])
    assert {"eval/fid", "eval/inception_score", "eval/clip_score"} <= set(run.data.metrics)

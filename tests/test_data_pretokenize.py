"""VQ pre-tokenization: stored indices equal the encoder's, fingerprints are enforced, and the
collator falls back to images when indices are absent."""
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import world
from datamodules.collate import Collator
from datamodules.pretokenize import encode_images, pretokenize_shards, tokenizer_fingerprint
from datamodules.schema import iter_tar, read_manifest
from datamodules.stream import ShardStream
from datamodules.config import SourceConfig
from tests.tiny import tiny_tokenizer
from datamodules.transforms import GenTransform
from modules.components.vision_encoders import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageTransform

PN = (1, 2, 4)
L = sum(p * p for p in PN)


class FakeVQ(torch.nn.Module):
    """Deterministic stand-in with VAR's interface: area-pool per scale, nearest of 16 codes."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.codebook = torch.nn.Parameter(torch.rand(16, 3, generator=g) * 2 - 1)

    def img_to_idxBl(self, x_B3HW, patch_nums=PN):
        out = []
        for pn in patch_nums:
            f = torch.nn.functional.adaptive_avg_pool2d(x_B3HW, pn).flatten(2).transpose(1, 2)  # (B, pn*pn, 3)
            out.append(torch.cdist(f, self.codebook[None].expand(f.shape[0], -1, -1)).argmin(-1))
        return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("w")
    world.generate_split(str(d / "src"), "train", {"gen": 12, "vqa": 5}, size=32, shard_size=5)
    vq = FakeVQ()
    fp = tokenizer_fingerprint(vq, PN, 16)
    m = pretokenize_shards(str(d / "src" / "gen-*.tar"), str(d / "vq"), vq.img_to_idxBl, PN, 16, fp, batch_size=5)
    return d, vq, fp, m


def test_indices_stored_beside_unchanged_images(shards):
    d, vq, fp, m = shards
    assert m["vq"]["fingerprint"] == fp and m["vq"]["patch_nums"] == list(PN) and m["num_samples"] == 12
    assert read_manifest(str(d / "vq"))["vq"]["fingerprint"] == fp
    names = sorted(f for f in os.listdir(d / "vq") if f.endswith(".tar"))
    assert names == ["gen-000000.tar", "gen-000001.tar", "gen-000002.tar"]
    for n in names:
        src = list(iter_tar(str(d / "src" / n)))
        out = list(iter_tar(str(d / "vq" / n)))
        assert [s["__key__"] for s in src] == [s["__key__"] for s in out]
        for a, b in zip(src, out):
            assert a["img0.png"] == b["img0.png"]
            idx = np.load(io.BytesIO(b["img0.vq.npy"]))
            assert idx.dtype == np.uint16 and idx.shape == (L,)
            want = encode_images(vq.img_to_idxBl, [Image.open(io.BytesIO(a["img0.png"]))], 16, PN)[0]
            assert np.array_equal(idx, want)
            assert json.loads(b["json"])["vq"]["fingerprint"] == fp


def test_fingerprint_depends_on_weights_and_scales():
    a, b = FakeVQ(0), FakeVQ(1)
    assert tokenizer_fingerprint(a, PN, 16) == tokenizer_fingerprint(FakeVQ(0), PN, 16)
    assert tokenizer_fingerprint(a, PN, 16) != tokenizer_fingerprint(b, PN, 16)
    assert tokenizer_fingerprint(a, PN, 16) != tokenizer_fingerprint(a, (1, 2, 3), 16)
    assert tokenizer_fingerprint(a, PN, 16) != tokenizer_fingerprint(a, PN, 32)


def _collator(fp, **kw):
    return Collator(tiny_tokenizer(), 4, L, ImageTransform(16, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "crop"), GenTransform(16), max_length=256,
                    gen_patch_nums=PN, vq_fingerprint=fp, **kw)


def _samples(pattern):
    return list(ShardStream([SourceConfig("g", pattern, 1.0, "generation")], "eval"))[:6]


def test_collator_uses_matching_indices_and_refuses_others(shards):
    d, vq, fp, _ = shards
    samples = _samples(str(d / "vq" / "gen-*.tar"))
    b = _collator(fp, load_gen_images=False)(samples)
    assert "gen_images" not in b
    assert [t.shape for t in b["gen_indices"]] == [(6, p * p) for p in PN]
    direct = vq.img_to_idxBl(torch.stack([GenTransform(16)(s["images"][0]) for s in samples]))
    for got, want in zip(b["gen_indices"], direct):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="re-run experiments.pretokenize"):
        _collator("sha256:someothertokenizer")(samples)
    # the model encodes on the fly when it has no fingerprint to match, or shards have no indices
    assert "gen_indices" not in _collator(None)(samples) and "gen_images" in _collator(None)(samples)
    plain = _collator(fp)(_samples(str(d / "src" / "gen-*.tar")))
    assert "gen_indices" not in plain and plain["gen_images"].shape == (6, 3, 16, 16)


def test_datamodule_refuses_a_foreign_fingerprint(shards):
    pytest.importorskip("lightning")
    from datamodules.config import DataConfig
    from datamodules.datamodule import VargptDataModule

    d, _, fp, _ = shards
    cfg = DataConfig(sources=[SourceConfig("g", str(d / "vq" / "gen-*.tar"), 1.0, "generation")], num_workers=0)
    VargptDataModule(cfg, _collator(fp)).setup("fit")
    with pytest.raises(ValueError, match="manifest.json has VQ indices from tokenizer"):
        VargptDataModule(cfg, _collator("sha256:other")).setup("fit")
    cfg.use_pretokenized = False
    col = _collator("sha256:other")
    VargptDataModule(cfg, col).setup("fit")
    assert col.vq_fingerprint is None


def test_cli_with_the_project_vqvae(tmp_path, shards):
    import modules.components.vqvae as vq_mod
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    d = shards[0]
    cfg = dict(vocab_size=32, z_channels=8, ch=16, ch_mult=[1, 1, 2], num_res_blocks=1, norm_groups=8,
               patch_nums=[1, 2, 4], using_sa=False, using_mid_sa=False)  # 16 px, L = 21
    torch.manual_seed(0)
    model = vq_mod.build_vqvae(vq_mod.VQVAEConfig(**cfg)).eval()
    save_file({f"vqvae.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    OmegaConf.save(OmegaConf.create(cfg), str(tmp_path / "vq.yaml"))
    from experiments.pretokenize import main

    rc = main(["--shards", str(d / "src" / "gen-00000{0,1}.tar"), "--out", str(tmp_path / "out"),
               "--vqvae-config", str(tmp_path / "vq.yaml"), "--checkpoint", str(tmp_path / "m.safetensors"),
               "--key-prefix", "vqvae."])
    assert rc == 0
    m = read_manifest(str(tmp_path / "out"))
    assert m["vq"]["fingerprint"] == model.fingerprint() and m["num_samples"] == 10
    raw = next(iter_tar(str(tmp_path / "out" / "gen-000001.tar")))
    idx = np.load(io.BytesIO(raw["img0.vq.npy"]))
    want = torch.cat(model.img_to_idx(GenTransform(16)(Image.open(io.BytesIO(raw["img0.png"])))[None]), 1)[0]
    assert np.array_equal(idx, want.numpy())

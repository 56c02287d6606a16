"""Parity with the official FoundationVision/VAR code on its test vectors
(tests/fixtures/var_official), and the `python -m benchmarks.var_parity DIR` command (its JSON
line and exit status, on the vendored layout and on the layout the fixture was first made in)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from benchmarks import var_parity

from tests.conftest import FIXTURES, require_fixture

FIX = FIXTURES / "var_official"


@pytest.fixture(autouse=True)
def _fixture_present():
    for name in ("config.json", "var.safetensors", "vectors.pt"):
        require_fixture("var_official", name)
    require_fixture("vargpt_official", "model-00002-of-00002.safetensors")  # the VQVAE, stored once


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # see tests/conftest.py
    yield


@pytest.fixture(scope="module")
def loaded():
    return var_parity.load_fixture(FIX)


def test_teacher_forced_logits_and_loss(loaded):
    c, vqvae, var, v = loaded
    assert (var.C, var.num_heads, var.L) == (c["embed_dim"], c["num_heads"], c["L"])
    with torch.no_grad():
        logits = var(v["label"], v["x_BLCv_wo_first_l"])
    assert logits.shape == v["logits"].shape
    assert (logits - v["logits"]).abs().max() <= 1e-4
    assert abs(float(var.loss(logits, v["gt_idx"]) - v["loss"])) <= 1e-4


def test_sampled_indices_and_image(loaded):
    c, vqvae, var, v = loaded
    g = torch.Generator().manual_seed(c["g_seed"])
    idx, img = var.sample(len(c["labels"]), torch.tensor(c["labels"]), cfg=c["cfg"], top_k=c["top_k"],
                          top_p=c["top_p"], generator=g)
    for si, (a, b) in enumerate(zip(idx, v["sample_idx"])):
        assert torch.equal(a, b), f"scale {si}: {(a != b).sum()} sampled indices differ"
    assert (img - v["sample_img"]).abs().max() <= 1e-4


def test_cli_reports_and_passes(capsys):
    assert var_parity.main([str(FIX)]) == 0
    r = json.loads(capsys.readouterr().out.strip())
    assert set(r) == {"indices_equal", "recon_max_abs", "logits_max_abs", "loss_abs", "sample_indices_equal"}
    assert r["indices_equal"] and r["sample_indices_equal"]
    assert max(r["recon_max_abs"], r["logits_max_abs"], r["loss_abs"]) <= 1e-4


def test_cli_fails_on_a_perturbed_fixture(tmp_path, capsys):
    # the same config, its weight files named by absolute path, and perturbed vectors
    c = json.loads((FIX / "config.json").read_text())
    for part in c["weights"].values():
        part["file"] = str((FIX / part["file"]).resolve())
    (tmp_path / "config.json").write_text(json.dumps(c))
    v = torch.load(FIX / "vectors.pt", weights_only=True)
    v["logits"] = v["logits"] + 1e-3
    torch.save(v, tmp_path / "vectors.pt")
    assert var_parity.main([str(tmp_path)]) == 1
    r = json.loads(capsys.readouterr().out.strip())
    assert r["logits_max_abs"] > 1e-4 and r["indices_equal"]


def test_cli_reads_the_original_layout(tmp_path, capsys):
    """A directory as the fixture was first made: weights.pt = {"vae": sd, "var": sd} (the VQVAE
    with its own 10 x 512 zero `quantize.ema_vocab_hit_SV`) and a config.json without "weights"."""
    c = json.loads((FIX / "config.json").read_text())
    w = var_parity.load_weights(FIX, c)
    w["vae"]["quantize.ema_vocab_hit_SV"] = torch.zeros(len(c["patch_nums"]), c["V"])
    del c["weights"]
    (tmp_path / "config.json").write_text(json.dumps(c))
    torch.save(w, tmp_path / "weights.pt")
    shutil.copy(FIX / "vectors.pt", tmp_path / "vectors.pt")
    assert var_parity.main([str(tmp_path)]) == 0
    r = json.loads(capsys.readouterr().out.strip())
    assert r["indices_equal"] and r["sample_indices_equal"]
    assert max(r["recon_max_abs"], r["logits_max_abs"], r["loss_abs"]) <= 1e-4

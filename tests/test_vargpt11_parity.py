"""`benchmarks.vargpt11_parity` on the vendored official VARGPT-v1.1 outputs: every check holds
its tolerance, and a directory that stores fewer intermediates still yields every key."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from benchmarks.vargpt11_parity import main, run

from tests.conftest import require_fixture

V11 = "vargpt_v11_official"
KEYS = ["tokenizer_bits_equal", "tokenizer_recon_max_abs", "und_logits_1d_max_abs", "und_logits_mrope_max_abs",
        "und_generate_ids_equal", "gen_image_logits_max_abs", "gen_text_logits_max_abs", "gen_loss_abs",
        "gen_null_loss_abs", "edit_loss_abs", "infer_bits_equal", "infer_image_max_abs", "edit_infer_bits_equal"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # see tests/conftest.py
    yield


def test_parity_command_prints_all_true_within_tolerance(capsys):
    assert main([str(require_fixture(V11))]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for k in KEYS:
        assert k in r, k
        if k.endswith("_equal"):
            assert r[k] is True, k
    assert r["ok"] is True
    for k in ("und_logits_1d_max_abs", "und_logits_mrope_max_abs", "gen_text_logits_max_abs", "gen_loss_abs",
              "gen_null_loss_abs", "edit_loss_abs", "infer_image_max_abs", "tokenizer_recon_max_abs"):
        assert r[k] <= 1e-4, (k, r[k])
    assert r["gen_image_logits_max_abs"] <= 5e-3  # downstream of the bf16 cross-attention


def test_fewer_intermediates_still_give_every_key(tmp_path):
    src = require_fixture(V11)
    d = tmp_path / "fewer"
    d.mkdir()
    for f in src.iterdir():
        if f.name != "vectors.pt":
            shutil.copy(f, d / f.name)
    v = torch.load(src / "vectors.pt", weights_only=True)
    for sec in ("gen", "gen_b1_null", "edit"):  # no recorded flips: replayed from the seed
        v[sec].pop("bsc_flipped_bits_per_scale")
        v[sec].pop("bsc_gt_bits_per_scale")
    v["und"].pop("pixel_values")  # recomputed by the image processor
    v["infer"].pop("decoded_m1p1")
    torch.save(v, d / "vectors.pt")
    r = run(d)
    for k in KEYS:
        assert k in r, k
    assert r["gen_loss_abs"] <= 1e-4 and r["edit_loss_abs"] <= 1e-4 and r["infer_bits_equal"] is True


class _LossyDecoder(torch.nn.Module):
    """(x + 1e4) - 1e4: exact in float64, about 5e-4 off in float32 (the float32 step at 1e4 is 1e-3)."""
    def forward(self, x):
        return (x + 1e4) - 1e4


class _Tok(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.decoder = _LossyDecoder()

    def decode(self, f):
        return self.decoder(f.float()).clamp(-1, 1)


def test_image_check_adds_the_float_error_of_each_side_and_still_fails_beyond_it():
    from benchmarks.vargpt11_parity import TOL, _image_check, _Lazy64, _ok
    tok = _Tok()
    f = torch.linspace(-0.9, 0.9, 3 * 8 * 8).reshape(1, 3, 8, 8)
    exact = f.double()
    mine = tok.decode(f)
    ours = float((mine.double() - exact).abs().max())
    assert 1e-4 < ours < 1e-3
    r = {}  # within TOL: no float64 run, no floor keys
    _image_check(r, "x_image", mine, mine + TOL / 2, tok, _Lazy64(tok), f, 3e-4)
    assert set(r) == {"x_image_max_abs"} and _ok(r)
    # the reference off by its recorded float error plus ours: accepted, with both floors reported
    r = {}
    _image_check(r, "x_image", mine, mine + ours + 3e-4, tok, _Lazy64(tok), f, 3e-4)
    assert r["x_image_fp32_error"] == pytest.approx(ours) and r["x_image_ref_fp32_error"] == 3e-4 and _ok(r)
    # beyond TOL + both floors: a real difference fails
    r = {}
    _image_check(r, "x_image", mine, mine + ours + 3e-4 + 2 * TOL, tok, _Lazy64(tok), f, 3e-4)
    assert not _ok(r)
    r = {}  # no recorded reference error: only ours is added
    _image_check(r, "x_image", mine, mine + ours + 3e-4, tok, _Lazy64(tok), f, None)
    assert "x_image_ref_fp32_error" not in r and not _ok(r)


def test_official_generator_defaults_are_the_vendored_sizes_and_ids():
    """benchmarks.v11_official_vectors with no size arguments describes the vendored directory (its
    meta.json sizes and token ids), so its --reuse check against that directory compares like with like."""
    from benchmarks.v11_official_vectors import ids_for, parse, sizes_from_args
    meta = json.loads((require_fixture(V11) / "meta.json").read_text())
    assert ids_for(200) == meta["ids"]
    mine = sizes_from_args(parse(["--official", "x", "--out", "y"]))
    for part in ("llm", "vision", "infinity", "bsq_vae", "pn"):
        assert mine[part] == meta["tiny_sizes"][part], part
    assert ids_for(300)["gen_pad"] == 316 and ids_for(300)["im_end"] == 302

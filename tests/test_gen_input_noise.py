"""model.gen_input_noise: random codes in the teacher-forcing inputs, never in the targets, only
in training."""
from __future__ import annotations

import pytest
import torch

from modules.vargpt import VARGPT
from tests.tiny import collator_for, gen_sample, tiny_model_config


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    torch.manual_seed(0)
    return VARGPT(tiny_model_config(tmp_path_factory.mktemp("tiny_noise"), gen_input_noise=0.9))


def _idx(net, n=64):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, net.var.V, (n, pn * pn), generator=g) for pn in net.var.patch_nums]


def test_noise_changes_inputs_of_every_scale_but_the_last(noisy):
    idx = _idx(noisy)
    noisy.train()
    torch.manual_seed(3)
    out = noisy.noisy_inputs(idx)
    changed = [float((a != b).float().mean()) for a, b in zip(out, idx)]
    # rate ~ U(0, 0.9) per target, minus the 1/V chance of drawing the same code: about 0.45
    assert all(0.3 < c < 0.6 for c in changed[:-1]), changed
    assert changed[-1] == 0.0
    assert all(o.dtype == i.dtype and o.shape == i.shape for o, i in zip(out, idx))
    assert all(int(o.max()) < noisy.var.V for o in out)


def test_no_noise_in_eval_mode_or_at_rate_zero(noisy, tmp_path):
    idx = _idx(noisy)
    noisy.eval()
    assert all(torch.equal(a, b) for a, b in zip(noisy.noisy_inputs(idx), idx))
    clean = VARGPT(tiny_model_config(tmp_path)).train()
    assert all(torch.equal(a, b) for a, b in zip(clean.noisy_inputs(idx), idx))


def test_training_targets_stay_clean(noisy):
    # the inputs are noisy, the loss is scored against the true indices
    b = collator_for(noisy)([gen_sample("g0"), gen_sample("g1", instr="two blue squares at the top")])
    noisy.train()
    torch.manual_seed(0)
    with torch.no_grad():
        out = noisy(b, return_logits=True)
        noisy.cfg.gen_input_noise = 0.0
        try:
            torch.manual_seed(0)
            clean = noisy(b, return_logits=True)
        finally:
            noisy.cfg.gen_input_noise = 0.9
    assert not torch.allclose(out["logits_img"], clean["logits_img"])
    target = torch.cat(noisy.encode_targets(b), 1)
    ce = torch.nn.functional.cross_entropy(out["logits_img"].reshape(-1, noisy.var.V), target.reshape(-1))
    torch.testing.assert_close(out["loss_img"], ce)


def test_rate_is_validated(tmp_path):
    cfg = tiny_model_config(tmp_path, gen_input_noise=1.0)
    with pytest.raises(ValueError, match="gen_input_noise"):
        cfg.validate()

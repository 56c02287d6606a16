"""The fused text-head CE (modules/components/linear_ce.py), the training forward's attention
choice, and the batch layout of benchmarks.train_step_vs_official (its timing needs the official
checkout and is not a test)."""
import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import modules.components.linear_ce as lce
from modules.components.linear_ce import linear_cross_entropy
from modules.vargpt import training_attention


def _both(N=37, D=16, V=50, bias=True, autocast=False, weights=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    h0, W0 = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g) * 0.3
    b0 = torch.randn(V, generator=g) if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    w = torch.rand(N, generator=g) if weights else torch.ones(N)
    out = []
    for fused in (False, True):
        h, W = h0.clone().requires_grad_(), W0.clone().requires_grad_()
        b = b0.clone().requires_grad_() if bias else None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            ce = linear_cross_entropy(h, W, b, t) if fused else F.cross_entropy(F.linear(h, W, b).float(), t, reduction="none")
            (ce * w).sum().backward()
        out.append((ce.detach(), h.grad, W.grad, None if b is None else b.grad))
    return out


@pytest.mark.parametrize("weights", [False, True])
def test_fp32_equals_the_unfused_path_across_column_blocks(monkeypatch, weights):
    monkeypatch.setattr(lce, "CHUNK_ROWS", 16)  # V 50: 4 blocks of vocabulary rows, the last one short
    ref, got = _both(weights=weights)
    for a, b in zip(ref, got):
        assert a.dtype == b.dtype
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_matches_the_unfused_path_and_keeps_fp32_grads():
    ref, got = _both(N=20, D=32, V=64, bias=False, autocast=True)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], ref[0], rtol=1e-3, atol=1e-3)
    for a, b in zip(ref[1:3], got[1:3]):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-3)


def test_without_grad_and_bad_shapes():
    h, W, t = torch.randn(5, 4), torch.randn(7, 4), torch.randint(0, 7, (5,))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, W, None, t), F.cross_entropy(h @ W.t(), t, reduction="none"))
    with pytest.raises(ValueError, match=r"h \(N, D\) and target"):
        linear_cross_entropy(h, W, None, t[:3])


def test_training_attention_picks_math_only_under_cpu_reduced_precision_autocast():
    assert torch.backends.cuda.flash_sdp_enabled()
    with training_attention("cpu"):  # fp32: the default choice stays
        assert torch.backends.cuda.flash_sdp_enabled()
    with torch.autocast("cpu", dtype=torch.bfloat16), training_attention("cpu"):
        assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    with torch.autocast("cpu", dtype=torch.bfloat16), training_attention("cuda"):
        assert torch.backends.cuda.flash_sdp_enabled()
    # recomputed in the backward (activation checkpointing): the recomputation runs outside the
    # context, so the forward keeps the default kernel too
    with torch.autocast("cpu", dtype=torch.bfloat16), training_attention("cpu", recomputed=True):
        assert torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled()  # restored


def test_benchmark_batches_have_the_released_layout():
    from benchmarks.train_step_vs_official import IDS, make_batch, suite_batch

    b = make_batch("mixed", T=72, L=30, n_img=16, img_px=56, gen_px=64)
    ids, mask = b["input_ids"], b["attention_mask"]
    assert ids.shape == (4, 72) and mask.sum(1).tolist() == [72, 69, 66, 63]
    assert ((ids == IDS["pad"]) == (mask == 0)).all()  # right padding only
    assert (ids == IDS["image"]).sum(1).tolist() == [16, 0, 16, 0]
    assert (ids == IDS["gen_pad"]).sum(1).tolist() == [0, 30, 0, 30]
    assert b["pixel_values"].shape == (2, 3, 56, 56) and b["pixel_gen_values"].shape == (2, 3, 64, 64)
    g = make_batch("gen", T=72, L=30, n_img=16, img_px=56, gen_px=64)
    assert (g["input_ids"] == IDS["gen_pad"]).sum().item() == 4 * 30 and "pixel_values" not in g
    s = suite_batch(g)
    assert s["labels"] is g["input_ids"] and s["gen_uncond"].tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="no prompt"):
        make_batch("gen", T=33, L=30, n_img=16, img_px=56, gen_px=64)


def test_official_worker_imports_nothing_of_this_project():
    src = (Path(__file__).resolve().parents[1] / "benchmarks" / "train_step_official_worker.py").read_text()
    names = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert not names & {"modules", "datamodules", "experiments", "benchmarks"}, names


def test_a_second_backward_through_the_same_graph_raises_instead_of_wrong_grads():
    """The backward turns the saved logits into their gradient in place: a second backward
    (retain_graph) must fail loudly, never read the spent buffer as logits."""
    h, W, t = torch.randn(5, 4, requires_grad=True), torch.randn(7, 4, requires_grad=True), torch.randint(0, 7, (5,))
    loss = linear_cross_entropy(h, W, None, t).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()

"""DPO on image bits for VARGPT-v1.1 (the release's DPO stage, corrected where it drew noise).

For a pair (prompt x, chosen image c, rejected image r) the score of an image is the sum over its
tokens and bits of log p(bit) under teacher forcing (``VARGPT11.bit_logps``; the text prompt is not
scored), and the loss is the sigmoid DPO loss against a frozen reference:

    m = (log pi(c|x) - log ref(c|x)) - (log pi(r|x) - log ref(r|x))
    loss = -log sigmoid(beta * m)               (= log 2 where pi = ref)

Teacher forcing flips bits at random (bitwise self-correction, modules/components/bsq.py), so a
log-probability depends on the draw. The release scores policy and reference in two forwards that
each draw their own flips: the reference term then carries draw noise that does not cancel, and
at initialisation the loss is not log 2. Here the reference draws once and the policy replays the
same flips (``flips: same``, the default); ``flips: released`` gives each its own draw.

The reference is not a second model: only the trainable parameters differ between policy and
reference, so it is their values at the start of the stage (``reference: initial``) or read from
an export (``reference: file``), held as non-persistent buffers (moved with the module, never
saved) and swapped in by ``torch.func.functional_call`` under ``no_grad``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from datamodules.paths import resolve_path
from modules.checkpoint import read_state_dict

REFERENCES = ("initial", "file")
FLIPS = ("same", "released")
# the release's training stages whose freeze set a DPO run may use (modules/stages/v11_stages.py)
TRAINABLE_AS = tuple(f"v11_stage{i}" for i in range(6))


@dataclass
class DPOConfig:
    """The ``dpo:`` section of an experiment (stage ``v11_dpo``)."""

    beta: float = 0.1  # the release's pref_beta default
    reference: str = "initial"  # initial: the trainable parameters at the stage's start | file: reference_path
    reference_path: str = ""  # reference: file: an export's model.safetensors (its trainable parameters are read)
    flips: str = "same"  # same: the policy replays the reference's bit flips | released: each draws its own
    trainable: str = "v11_stage0"  # whose freeze set trains (a release stage; stage 0: the generation side)

    def problems(self) -> List[Tuple[str, str]]:
        out = []
        if not (math.isfinite(self.beta) and self.beta > 0):
            out.append(("dpo.beta", f"must be finite and > 0, got {self.beta}"))
        for key, v, valid in (("reference", self.reference, REFERENCES), ("flips", self.flips, FLIPS),
                              ("trainable", self.trainable, TRAINABLE_AS)):
            if v not in valid:
                out.append((f"dpo.{key}", f"{v!r}; valid: {', '.join(valid)}"))
        if self.reference == "file" and not self.reference_path:
            out.append(("dpo.reference_path", "is empty but dpo.reference is 'file': give an export's model.safetensors"))
        if self.reference != "file" and self.reference_path:
            out.append(("dpo.reference_path", f"is set but dpo.reference is {self.reference!r}: set dpo.reference=file"))
        return out


def dpo_loss(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float):
    """Policy / reference log-probabilities of chosen and rejected (N,) -> (mean loss, margins m (N,))."""
    m = (pc - rc) - (pr - rr)
    return -F.logsigmoid(beta * m).mean(), m


class FrozenReference(nn.Module):
    """The reference's values of the trainable parameters (name -> tensor), non-persistent buffers."""

    def __init__(self, tensors: Dict[str, torch.Tensor]):
        super().__init__()
        self.names = list(tensors)
        for i, n in enumerate(self.names):
            self.register_buffer(f"p{i}", tensors[n].detach().clone(), persistent=False)

    def params(self) -> Dict[str, torch.Tensor]:
        return {n: getattr(self, f"p{i}") for i, n in enumerate(self.names)}


def reference_tensors(net: nn.Module, cfg: DPOConfig) -> Dict[str, torch.Tensor]:
    """The trainable parameters' reference values: their current values, or those of ``reference_path``."""
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    if cfg.reference == "initial":
        return {n: p.detach() for n, p in net.named_parameters() if p.requires_grad}
    path = resolve_path(cfg.reference_path)
    sd = read_state_dict(path)
    missing = [n for n in names if n not in sd]
    if missing:
        raise ValueError(f"dpo.reference_path {path}: no tensors for the trainable parameters {missing[:5]} "
                         f"({len(missing)} missing); give an export of this model (model.safetensors)")
    own = dict(net.named_parameters())
    bad = [n for n in names if tuple(sd[n].shape) != tuple(own[n].shape)]
    if bad:
        raise ValueError(f"dpo.reference_path {path}: shapes differ for {bad[:5]} (another model size?)")
    return {n: sd[n].to(own[n].dtype) for n in names}


class _TrainForward(nn.Module):
    """``net.forward_train(**kw)`` as a forward, so functional_call can swap parameters into it."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, kw: Dict[str, Any]) -> Dict[str, Any]:
        return self.net.forward_train(**kw)


def pair_inputs(net: nn.Module, batch: Dict[str, Any]) -> Dict[str, Any]:
    """A pair batch (datamodules/pairs.py PairCollator) -> forward_train arguments for 2N rows:
    rows 0..N-1 the prompts with the chosen images, rows N..2N-1 the same prompts with the rejected
    ones. No condition dropout (both images are scored under the prompt)."""
    ids, rej = batch["input_ids"], batch.get("rejected_images")
    N = ids.shape[0]
    if rej is None or "gen_images" not in batch or rej.shape[0] != N or batch["gen_images"].shape[0] != N:
        raise ValueError("a DPO batch needs one chosen (gen_images) and one rejected image (rejected_images) per row: "
                         "read pairs through datamodules.pairs.PairCollator (a task: dpo source)")
    px, grid = batch.get("pixel_values"), None
    if px is not None and px.numel():
        g = net.image_side // net.cfg.llm.patch_size
        grid = torch.tensor([[1, g, g]] * px.shape[0] * 2)
        px = px.reshape(-1, px.shape[-1]).repeat(2, 1)
    else:
        px = None
    two = lambda t: None if t is None else torch.cat([t, t])  # noqa: E731
    return dict(input_ids=two(ids), attention_mask=two(batch.get("attention_mask")), labels=two(batch.get("labels")),
                pixel_values=px, image_grid_thw=grid, pixel_gen=torch.cat([batch["gen_images"], rej]), train=True,
                cond_drop_B=torch.zeros(2 * N, dtype=torch.bool))


def _draws(seed: int) -> Dict[str, Any]:
    return {"generator": torch.Generator().manual_seed(int(seed)), "strength_rng": np.random.RandomState(int(seed) % 2 ** 32)}


def pair_logps(net: nn.Module, kw: Dict[str, Any], params: Optional[Dict[str, torch.Tensor]] = None, *,
               seed: Optional[int] = None, flipped=None) -> Tuple[torch.Tensor, Any]:
    """(bit log-probabilities (2N,) [chosen rows, rejected rows], the flipped bits used). ``params``:
    values swapped in for the named parameters (the reference), computed without gradients."""
    kw = {**kw, "flipped": flipped, **(_draws(seed) if flipped is None and seed is not None else {})}
    if params is None:
        out = net.forward_train(**kw)
    else:
        with torch.no_grad():
            out = torch.func.functional_call(_TrainForward(net), {f"net.{k}": v for k, v in params.items()}, (kw,))
    return net.bit_logps(out), out["gen_state"]["bsc"]["flipped"]


def dpo_step(net: nn.Module, batch: Dict[str, Any], reference: Dict[str, torch.Tensor], cfg: DPOConfig,
             seeds: Tuple[int, int]) -> Dict[str, torch.Tensor]:
    """One DPO evaluation of a pair batch: the reference (no gradients) draws its bit flips from
    ``seeds[0]``; the policy replays them (``flips: same``) or draws from ``seeds[1]`` (``released``)."""
    kw = pair_inputs(net, batch)
    N = batch["input_ids"].shape[0]
    ref, flips = pair_logps(net, kw, reference, seed=seeds[0])
    if cfg.flips == "same":
        pol, pol_flips = pair_logps(net, kw, flipped=flips)
    else:
        pol, pol_flips = pair_logps(net, kw, seed=seeds[1])
    loss, m = dpo_loss(pol[:N], pol[N:], ref[:N].detach(), ref[N:].detach(), cfg.beta)
    return {"loss": loss, "margin": m.detach(), "acc": (m > 0).float().mean().detach(),
            "logp_chosen": pol[:N].detach(), "logp_rejected": pol[N:].detach(),
            "ref_chosen": ref[:N], "ref_rejected": ref[N:], "ref_flips": flips, "policy_flips": pol_flips}

"""A VARGPT-v1.1 world model behind the evaluator's model interface (modules/evaluation.py ``EvalModel``).

The evaluator's VQA and generation code asks a model for ``answer(images, questions,
max_new_tokens)`` and ``generate_image(prompts, cfg=..., seed=[...], ...)`` (images (N, 3, H, W)
in [0, 1]) and reads ``eval_resolution``; editing asks for ``edit_images(sources, instructions,
seeds)``. A v1 ``VARGPT`` has the first two itself; ``V11EvalModel`` gives a ``VARGPT11World``
the same calls:

- prompts go through the model's own collator (its chat template, input images as runs of
  <image> tokens at its fixed side), as in training and ``experiments.infer_edit``;
- ``generate_text`` / ``generate_image`` take rows of one length, so rows are grouped by prompt
  length (a row's greedy answer or its draw from seed s never depends on its batch-mates);
- sampling: classifier-free guidance from ``eval.cfg``; the bit sampler's ``tau`` / ``top_k`` /
  ``top_p`` are the export's ``model.v11`` values (the eval section's top-k over a 4096-entry
  VQVAE codebook has no meaning for two-valued bits), recorded in ``protocol()``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from datamodules.tokens import IMAGE_TOKEN
from modules.vargpt11_world import PatchTransform, VARGPT11World


def _groups(lengths: Sequence[Any]) -> Dict[Any, List[int]]:
    out: Dict[Any, List[int]] = {}
    for i, n in enumerate(lengths):
        out.setdefault(n, []).append(i)
    return out


class V11EvalModel:
    """``VARGPT11World`` -> the evaluator's model interface (see the module doc)."""

    v1_diagnostics = False  # no VQVAE indices / per-target image loss (evaluation.EvalModel)

    def __init__(self, model: VARGPT11World):
        if not isinstance(model, VARGPT11World):
            raise TypeError(f"V11EvalModel wraps a VARGPT11World (an experiments.run export of a "
                            f"model.family: vargpt11 run), got {type(model).__name__}")
        self.model = model
        self.enc = model.collator()
        self.patches = PatchTransform(model.image_side, model.cfg.llm)
        self.eval_resolution = int(model.gen_resolution)

    # prompts ------------------------------------------------------------------------------
    def _ids(self, text: str, with_image: bool) -> List[int]:
        content = (text if IMAGE_TOKEN in text else f"{IMAGE_TOKEN}\n{text}") if with_image else text.replace(IMAGE_TOKEN, "")
        return self.enc.encode_prompt([{"role": "user", "content": content}])

    def _vision(self, images: Sequence[Any]):
        """PIL images -> (patches (sum n, D), grid (N, 3)) at the model's fixed side."""
        g = self.model.image_side // self.model.cfg.llm.patch_size
        return torch.cat([self.patches(im) for im in images]), torch.tensor([[1, g, g]] * len(images))

    # the interface ----------------------------------------------------------------------
    @torch.no_grad()
    def answer(self, images: Sequence[Any], questions: Sequence[str], max_new_tokens: int = 16) -> List[str]:
        """Greedy answers (one image or None per question), decoded up to the first eos."""
        rows = [self._ids(q, im is not None) for im, q in zip(images, questions)]
        eos = self.model.cfg.ids.eos
        out: List[str] = [""] * len(rows)
        for (n, has_image), idx in _groups([(len(r), images[i] is not None) for i, r in enumerate(rows)]).items():
            pv, grid = self._vision([images[i] for i in idx]) if has_image else (None, None)
            ids = self.model.generate_text(torch.tensor([rows[i] for i in idx]), pv, grid, max_new_tokens=max_new_tokens)
            for b, i in enumerate(idx):
                new = ids[b, n:].tolist()
                new = new[:new.index(eos)] if eos in new else new
                out[i] = self.model.tokenizer.decode(new, skip_special_tokens=True).strip()
        return out

    def _images(self, rows: Sequence[List[int]], seeds: Sequence[int], sources: Optional[Sequence[Any]]) -> torch.Tensor:
        out: List[Optional[torch.Tensor]] = [None] * len(rows)
        for _, idx in _groups([len(r) for r in rows]).items():
            pv, grid = self._vision([sources[i] for i in idx]) if sources is not None else (None, None)
            res = self.model.generate_image(torch.tensor([rows[i] for i in idx]), pv, grid, seed=[int(seeds[i]) for i in idx])
            for b, i in enumerate(idx):
                out[i] = res["uint8"][b].permute(2, 0, 1).float().div(255)  # (H, W, 3) uint8 -> (3, H, W)
        return torch.stack(out)  # type: ignore[arg-type]

    @torch.no_grad()
    def generate_image(self, prompts: Sequence[str], *, cfg: float, seed: Sequence[int], teacher_idx=None,
                       **_sampler: Any) -> torch.Tensor:
        """Images (N, 3, R, R) in [0, 1] for text prompts; prompt i draws from seed[i].
        ``**_sampler``: the v1 VAR sampler's settings (top_k, top_p, temperature, parity, sampler,
        dtype), which a bit sampler does not take (see the module doc)."""
        if teacher_idx is not None:
            raise ValueError("eval.teacher_scales is a v1 VQVAE diagnostic; a v1.1 export has no VQVAE indices: "
                             "set eval.teacher_scales=0")
        # the guidance scale is the evaluation's, for this call only: the net may be a training net
        # (in-loop evaluation) whose own setting must survive it
        kept, self.model.cfg.cfg = self.model.cfg.cfg, float(cfg)
        try:
            return self._images([self._ids(p, False) for p in prompts], seed, None)
        finally:
            self.model.cfg.cfg = kept

    @torch.no_grad()
    def edit_images(self, sources: Sequence[Any], instructions: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        """Each source image (PIL) edited by its instruction: (N, 3, R, R) in [0, 1]."""
        return self._images([self._ids(t, True) for t in instructions], seeds, sources)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
        """Images (N, 3, R, R) in [0, 1] through the BSQ tokenizer (bits per scale, decoded): the
        tokenizer's ceiling, as ``evaluation.vqvae_reconstructions`` for a v1 VQVAE."""
        tok = self.model.gen.vae_local
        out = [tok.decode_bits(tok.encode(images[i:i + batch].mul(2).sub(1))["bits"]).add(1).mul(0.5)
               for i in range(0, len(images), batch)]
        return torch.cat(out).clamp_(0, 1)

    def protocol(self) -> Dict[str, Any]:
        c = self.model.cfg
        return {"model_family": "vargpt11", "v11_sampler": {"tau": c.tau, "top_k": c.top_k, "top_p": c.top_p},
                "bits_per_token": c.tokenizer.codebook_dim, "scales": [list(s) for s in c.tokenizer.scales]}

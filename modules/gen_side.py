"""The generation-side seam of a composed VARGPT model, and its Infinity (v1.1) implementation.

A generation side is everything between "the LLM has states" and "pixels": the visual tokenizer,
the image decoder, how the prompt reaches the decoder, and the sampler. The composed model
(``modules/vargpt11.py``) talks to it through four calls and never branches on which one it has:

    slot_embeds, state = side.teacher_inputs(pixels, n_slots, ...)   # training: LLM inputs at the
                                                                      # image slots + what the loss needs
    out = side.train_outputs(slot_hidden, prompt_states, state)      # bit/token logits, labels, loss
    images, trace = side.generate(llm_step, prompt_states, ...)      # sampling, seeded by the caller
    pixels = side.decode(codes)                                       # tokens -> image

``prompt_states`` is a ``Packed`` (states of every prompt token of each row, packed with
cu_seqlens), ``llm_step(embeds, positions, cache)`` runs the LLM on new slot embeddings and
returns ``(hidden, cache)``; the side owns which positions a slot gets (it is told the cache
length and the prompt's rope delta) and what its unconditional half is.

``InfinitySide`` holds the released v1.1 parameters under their released names (``vae_local``,
``vargpt_gen``, ``image_gen_projector``, ``image_gen_projector_out``, ``sos_embedding``).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.components.bsq import BSQConfig, BSQTokenizer, bitwise_self_correction
from modules.components.registry import Registry
from modules.components.infinity import InfinityConfig, InfinityDecoder, block_causal_bias
from modules.components.var_sampling import sample_top_k_top_p


@dataclass
class Packed:
    """Variable-length rows packed along dim 0: x (N, C), cu_seqlens (B+1,) int32."""

    x: torch.Tensor
    cu: torch.Tensor

    @property
    def max_len(self) -> int:
        return int((self.cu[1:] - self.cu[:-1]).max()) if self.cu.numel() > 1 else 0

    @property
    def lens(self) -> List[int]:
        return (self.cu[1:] - self.cu[:-1]).tolist()

    @classmethod
    def from_rows(cls, rows: Sequence[torch.Tensor]) -> "Packed":
        cu = torch.tensor([0] + [int(r.shape[0]) for r in rows], dtype=torch.int32).cumsum(0).to(torch.int32)
        return cls(torch.cat(list(rows)), cu)


LLMStep = Callable[[torch.Tensor, torch.Tensor, Any], Tuple[torch.Tensor, Any]]
# name -> builder(VARGPT11Config) -> GenerationSide ("infinity" here, "var" in gen_side_var.py)
GEN_SIDES = Registry("gen_side")


class GenerationSide(nn.Module, abc.ABC):
    """The interface a composed model sees (module doc). Implementations: ``InfinitySide``
    (VARGPT-v1.1) and ``VARSide`` (v1's VAR, modules/gen_side_var.py). The v1 composed model
    (``modules/vargpt.py`` + ``modules/inference.py``) does not call it yet (docs/v11.md)."""

    @property
    @abc.abstractmethod
    def tokens_per_image(self) -> int:
        """Tokens one image is predicted as (the slots it needs are >= this)."""

    @abc.abstractmethod
    def teacher_inputs(self, pixels_B3HW: torch.Tensor, n_slots: int, *, train: bool = True,
                       **kw) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """Target images -> (LLM inputs at the image slots (B, n_slots, H_llm), state)."""

    @abc.abstractmethod
    def train_outputs(self, slot_hidden_BSH: torch.Tensor, prompt_states: "Packed",
                      state: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """LLM states at the slots (+ the prompt's) -> at least ``image_logits`` and ``loss_img``."""

    @abc.abstractmethod
    def generate(self, llm_step: LLMStep, prompt_states: "Packed", cache: Any, next_position: torch.Tensor,
                 rope_delta: torch.Tensor, *, generator: Optional[torch.Generator] = None,
                 **sampling) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Sample: -> (the tokenizer's latent for ``decode``, tokens per scale)."""

    @abc.abstractmethod
    def decode(self, latent: Any) -> torch.Tensor:
        """Latent -> image (B, 3, H, W) in [-1, 1]."""

    @property
    @abc.abstractmethod
    def resolution(self) -> int:
        """Side of the square target images (pixels)."""

    @abc.abstractmethod
    def to_uint8(self, img_m1p1: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 RGB."""


class GenProjector(nn.Module):
    """The released generation projectors: ``mlp`` = Linear, GELU, Linear. ``ln_q`` is stored
    in the release but its forward never applies it (measured on the vendored vectors: applying
    it moves the cross-attention keys by 1.19); kept so the layout loads strictly."""

    def __init__(self, cin: int, hidden: int, cout: int):
        super().__init__()
        self.ln_q = nn.LayerNorm(cin, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(cin, hidden), nn.GELU(), nn.Linear(hidden, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


# The decoder's input for scale k+1 is the running code sum resampled (bi/trilinear, the
# tokenizer's up-sampling mode) to scale k+1, in training and in sampling alike; the tokenizer's
# own next-scale inputs (BSQTokenizer.next_inputs) use area. Measured on the vendored vectors:
# area gives the decoder inputs 0.15 away from the released ones at 6x6 and 12x12.
NEXT_INPUT_MODE = "bilinear"


@dataclass
class GenSwitches:
    """Released behaviours of the generation side (released value in the comment)."""

    ca_bf16: bool = False  # released True: cross-attention q/kv/out rounded to bf16
    # unconditional half at inference: "released" = LLM on this scale's tokens alone (no prompt,
    # no earlier scales), cross-attention to cfg_uncond[:n]; "cached" = the unconditional LLM
    # keeps its own cache of earlier scales (still without the prompt)
    uncond_path: str = "cached"
    # training condition drop replaces: "sos" (released) or "sos_and_prompt" (the cross-attention
    # keys too, which is what the unconditional half sees at inference)
    cond_drop: str = "sos_and_prompt"
    bsc_in_eval: bool = False  # released True: bit flips also in eval / reference forwards
    gen_positions_with_deltas: bool = True  # released False: image slots take cache_position only
    uint8: str = "round"  # released "truncate": (x+1)/2*255 truncated
    # 2-D RoPE of a cached scale starts at its place in the sequence. The release's fused path
    # (what ran for the fixture and on GPU) does so; false reproduces its non-fused path, which
    # drops the scale index so every scale starts at position 0.
    rope_scale_offset: bool = True


class InfinitySide(GenerationSide):
    def __init__(self, tok_cfg: BSQConfig, dec_cfg: InfinityConfig, llm_hidden: int, vocab_rows: int,
                 gen_start_id: int, switches: Optional[GenSwitches] = None):
        super().__init__()
        C = dec_cfg.embed_dim
        self.sw = switches or GenSwitches()
        dec_cfg.ca_bf16 = self.sw.ca_bf16
        self.vae_local = BSQTokenizer(tok_cfg)
        self.vargpt_gen = InfinityDecoder(dec_cfg)
        self.image_gen_projector = GenProjector(C, C, llm_hidden)
        self.image_gen_projector_out = GenProjector(llm_hidden, llm_hidden, dec_cfg.text_channels)
        # one row per token id up to the start token: the release looks the SOS up by its id
        self.sos_embedding = nn.Embedding(vocab_rows, dec_cfg.text_channels)
        self.gen_start_id = gen_start_id
        for p in self.vae_local.parameters():
            p.requires_grad_(False)  # the tokenizer is never trained in the release's stages

    # --- helpers -------------------------------------------------------------------------
    @property
    def schedule(self) -> List[Tuple[int, int]]:
        return self.vae_local.schedule()

    @property
    def tokens_per_image(self) -> int:
        return sum(h * w for h, w in self.schedule)

    @property
    def resolution(self) -> int:
        return self.vae_local.cfg.downsample * self.schedule[-1][0]

    def _sos_kv(self, drop_B: torch.Tensor) -> Packed:
        B = drop_B.shape[0]
        cond = self.sos_embedding.weight[self.gen_start_id].unsqueeze(0).expand(B, -1)
        rows = torch.where(drop_B[:, None], self.vargpt_gen.cfg_uncond[:1].expand(B, -1), cond)
        return Packed(rows, torch.arange(B + 1, dtype=torch.int32))

    def _uncond_rows(self, n: int) -> torch.Tensor:
        rows = self.vargpt_gen.cfg_uncond
        if n > rows.shape[0]:
            raise ValueError(f"a prompt of {n} tokens is longer than the decoder's {rows.shape[0]} unconditional "
                             f"key/value rows (cfg_uncond, text_maxlen): shorten the prompt (the release has 512)")
        return rows[:n]

    def prompt_kv(self, prompt_states: Packed, drop_B: Optional[torch.Tensor] = None):
        kv = self.image_gen_projector_out(prompt_states.x)
        if drop_B is not None and bool(drop_B.any()):
            lens, rows, s = prompt_states.lens, [], 0
            for b, n in enumerate(lens):
                rows.append(self._uncond_rows(n) if drop_B[b] else kv[s:s + n])
                s += n
            kv = torch.cat(rows)
        return kv, prompt_states.cu, prompt_states.max_len

    # --- training ------------------------------------------------------------------------
    def teacher_inputs(self, pixels_B3HW: torch.Tensor, n_slots: int, *, train: bool = True,
                       cond_drop_B: Optional[torch.Tensor] = None, strength_rng=None,
                       generator: Optional[torch.Generator] = None, bsc_max_strength: float = 0.3,
                       bsc_layers: int = -1, flipped: Optional[Sequence[torch.Tensor]] = None):
        """-> slot embeddings (B, n_slots, H_llm) for the LLM, and the state ``train_outputs`` needs."""
        B = pixels_B3HW.shape[0]
        self.vargpt_gen.set_ca_bf16(self.sw.ca_bf16)  # the switch may change after construction
        with torch.no_grad():
            f = self.vae_local.encoder(pixels_B3HW.float())
        if train or self.sw.bsc_in_eval or flipped is not None:
            bsc = bitwise_self_correction(self.vae_local, f, max_strength=bsc_max_strength, layers=bsc_layers,
                                          strength_rng=strength_rng, generator=generator, flipped=flipped,
                                          input_mode=NEXT_INPUT_MODE)
        else:
            bsc = bitwise_self_correction(self.vae_local, f, layers=0, input_mode=NEXT_INPUT_MODE)
        drop = torch.zeros(B, dtype=torch.bool) if cond_drop_B is None else cond_drop_B.bool()
        cond_BD, gss = self.vargpt_gen.condition(self._as_kv(self._sos_kv(drop)))
        x_wo = torch.cat([t.flatten(2).transpose(1, 2) for t in bsc["inputs"]], 1)  # (B, L-1, d)
        x = self.vargpt_gen.embed(cond_BD, x_wo)
        L = x.shape[1]
        if n_slots < L:
            raise ValueError(f"{n_slots} image slots in the sequence but the schedule needs {L} tokens "
                             f"(scales {self.schedule}); add <|image_gen_pad|> tokens or use a shorter schedule")
        x = F.pad(x, (0, 0, 0, n_slots - L))
        state = {"cond_BD": cond_BD, "gss": gss, "labels": torch.cat(bsc["labels"], 1), "x_wo_prefix": x_wo,
                 "x_padded": x, "drop": drop, "bsc": bsc, "features": f}
        return self.image_gen_projector(x), state

    def train_outputs(self, slot_hidden_BSH: torch.Tensor, prompt_states: Packed, state: Dict) -> Dict[str, torch.Tensor]:
        """LLM states at the slots -> bit logits (B, L, 2d), labels (B, L, d), 3 x mean bit CE."""
        self.vargpt_gen.set_ca_bf16(self.sw.ca_bf16)
        drop = state["drop"] if self.sw.cond_drop == "sos_and_prompt" else None
        ca = self.prompt_kv(prompt_states, drop)
        sched = self.schedule
        n = slot_hidden_BSH.shape[1]
        L = self.tokens_per_image
        h = self.vargpt_gen.add_levels(self.image_gen_projector_out(slot_hidden_BSH), sched)
        h = self.vargpt_gen.blocks(h, state["gss"], ca, block_causal_bias(sched, n).to(h.device),
                                   tuple(t.to(h.device) for t in self.vargpt_gen.rope(sched, n)))
        logits = self.vargpt_gen.logits(h[:, :L], state["cond_BD"])
        B = logits.shape[0]
        ce = F.cross_entropy(logits.reshape(-1, 2), state["labels"].reshape(-1).long())
        with torch.no_grad():
            acc = (logits.view(B, L, -1, 2).argmax(-1) == state["labels"].long()).float().mean()
        # the released per-scale reweighting divides an already mean-reduced loss: a no-op, so
        # the image loss is 3 x the plain mean bit CE
        return {"image_logits": logits.view(B, L, -1), "loss_img": 3.0 * ce, "acc_img": acc, "ca_kv": ca[0]}

    @staticmethod
    def _as_kv(p: Packed):
        return p.x, p.cu, p.max_len

    # --- inference -----------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, llm_step: Callable, prompt_states: Packed, cache, next_position: torch.Tensor,
                 rope_delta: torch.Tensor, *, cfg: float = 3.0, tau: float = 0.5, top_k: int = 900,
                 top_p: float = 0.97, generator: Optional[torch.Generator] = None, trace: Optional[Dict] = None):
        """Sample one image per prompt row. ``cache`` holds the prompt and the start token,
        ``next_position`` (B,) the cache length (the next token's cache_position) and
        ``rope_delta`` (B,) the prompt's M-RoPE offset. -> (summed codes (B, d, h, w), bits)."""
        dec, tok = self.vargpt_gen, self.vae_local
        dec.set_ca_bf16(self.sw.ca_bf16)
        sched = self.schedule
        B = prompt_states.cu.numel() - 1
        dev = prompt_states.x.device
        ones, zeros = torch.ones(B, dtype=torch.bool), torch.zeros(B, dtype=torch.bool)
        sos = self._sos_kv(torch.cat([zeros, ones]))
        cond_BD, gss = dec.condition(self._as_kv(sos))  # (2B, D): rows [cond, uncond]
        cond_kv = self.image_gen_projector_out(prompt_states.x)
        lens = prompt_states.lens
        unc_kv = torch.cat([self._uncond_rows(n) for n in lens])
        ca = (torch.cat([cond_kv, unc_kv]), torch.tensor([0] + lens + lens, dtype=torch.int32).cumsum(0).to(torch.int32),
              max(lens))
        dec.set_caching(True)
        H, W = sched[-1]
        summed = torch.zeros(B, tok.d, H, W, device=dev)
        x = dec.embed(cond_BD, None)  # (2B, 1, C)
        pos = next_position.clone() + (rope_delta if self.sw.gen_positions_with_deltas else 0)
        unc_cache, unc_pos = None, torch.zeros(B, dtype=torch.long)
        all_bits = []
        try:
            for si, (h, w) in enumerate(sched):
                n = h * w
                inp = self.image_gen_projector(x)  # (2B, n, H_llm)
                p_cond = (pos.view(B, 1) + torch.arange(n)).unsqueeze(0).expand(3, B, n)
                out_c, cache = llm_step(inp[:B], p_cond, cache)
                if self.sw.uncond_path == "released":
                    p_unc = torch.arange(n).view(1, 1, n).expand(3, B, n)
                    out_u, _ = llm_step(inp[B:], p_unc, None)
                else:
                    p_unc = (unc_pos.view(B, 1) + torch.arange(n)).unsqueeze(0).expand(3, B, n)
                    out_u, unc_cache = llm_step(inp[B:], p_unc, unc_cache)
                    unc_pos = unc_pos + n
                pos = pos + n
                hid = dec.add_levels(self.image_gen_projector_out(torch.cat([out_c, out_u])), [(h, w)], first_scale=si)
                rope = dec.rope(sched, scale_ind=si, scale_offset=self.sw.rope_scale_offset)
                hid = dec.blocks(hid, gss, ca, None, tuple(t.to(dev) for t in rope))
                lg = dec.logits(hid, cond_BD)  # (2B, n, 2d)
                mixed = cfg * lg[:B] / tau + (1 - cfg) * lg[B:] / tau
                bits = sample_top_k_top_p(mixed.reshape(B, -1, 2).clone(), top_k=top_k, top_p=top_p,
                                          generator=generator).to(torch.uint8).view(B, n, tok.d)
                all_bits.append(bits)
                if trace is not None:
                    trace.setdefault("per_scale", []).append({
                        "llm_in": inp, "llm_out_cond": out_c, "llm_out_uncond": out_u, "head_logits_2B": lg,
                        "bits": bits.view(B, -1), "position_ids_cond": p_cond, "position_ids_uncond": p_unc})
                summed = summed + tok._up(tok.codes_from_bits(bits, (h, w)), (H, W))
                if si + 1 < len(sched):
                    nh, nw = sched[si + 1]
                    nxt = summed if (nh, nw) == (H, W) else F.interpolate(summed.unsqueeze(2), size=(1, nh, nw), mode="trilinear").squeeze(2)
                    x = dec.word_embed(nxt.flatten(2).transpose(1, 2)).repeat(2, 1, 1)
        finally:
            dec.set_caching(False)
        if trace is not None:
            trace.update(ca_kv_cond_projected=cond_kv)
        return summed, all_bits

    def decode(self, summed_codes: torch.Tensor) -> torch.Tensor:
        """f_hat (B, d, h, w) -> image (B, 3, H, W) in [-1, 1]."""
        return self.vae_local.decode(summed_codes)

    def to_uint8(self, img_m1p1: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 RGB."""
        x = (img_m1p1 + 1) / 2 * 255
        x = x if self.sw.uint8 == "truncate" else x.round()
        return x.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


@GEN_SIDES.register("infinity")
def build_infinity_side(cfg: Any) -> InfinitySide:
    return InfinitySide(cfg.tokenizer, cfg.decoder, cfg.llm.hidden_size, cfg.sos_rows or cfg.ids.gen_start + 1,
                        cfg.ids.gen_start, cfg.switches)

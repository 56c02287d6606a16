"""Best of N draws, judged by the model itself (``eval.best_of``).

VARGPT understands images as well as it draws them, so it can check its own drawings: for each
prompt, draw N images, ask the understanding side the questions whose answers the prompt fixes
("How many objects are there?" -> "2", "Is there a red circle in the image?" -> "yes", "Where
is the red circle?" -> "left", ...) and for a caption ("Describe the image briefly." -> "There
is a red circle on the left and two blue squares."), and keep the draw whose implied answers it
finds most likely (the summed log-probability of every answer, as lmms-eval's ``loglikelihood``
scores a continuation). No reference classifier, no target image: only the prompt and the model.

Where it helps and why: the cells of one VAR scale are drawn independently given the coarser
scales, so a model whose distribution holds the right picture still misses it in many single
draws (multi-object layouts most of all); picking among draws recovers part of that at N times
the sampling cost (experiments/ablations/world_self_verify.md).

Draw k of prompt i uses seed ``eval.seed + i + k * DRAW_SEED_STRIDE``: draw 0 is exactly the
single-draw protocol, so one run reports both (``gen_attribute_accuracy_one_draw``).

The questions come from the prompt's words alone (``datamodules.world.parse_prompt``, the inverse
of how world prompts are written; tested to read back the request of 150 prompts of each split): shapes, colours, counts and stated positions of the world's vocabulary. A prompt that
names no world object is refused with the fix (``eval.best_of: 1``) rather than judged by
nothing.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
from torchvision.transforms.functional import to_pil_image

from datamodules.world import CAPTION_FORMS, CAPTION_PROMPTS, describe_request, implied_questions, parse_prompt
from modules.scoring import loglikelihood

DRAW_SEED_STRIDE = 100_000  # > any prompt count: draws of different prompts never share a seed


def draw_seed(seed: int, k: int) -> int:
    """The base seed of draw k (prompt i adds i)."""
    return seed + k * DRAW_SEED_STRIDE


def prompt_questions(prompts: Sequence[str], names: Sequence[str] = ()) -> List[List[Tuple[str, str]]]:
    """Per generation prompt, the (request, answer) pairs its words imply (``parse_prompt``, then
    ``implied_questions`` and the description as a caption, all in the training wording).
    ``names`` (sample keys) only label the error."""
    out = []
    for i, text in enumerate(prompts):
        groups = parse_prompt(text)
        if not groups:
            name = names[i] if i < len(names) else f"prompt {i}"
            raise ValueError(f"eval.best_of > 1 judges each draw by the answers its prompt implies, read from the "
                             f"world's vocabulary ('a red circle on the left', 'two blue squares'); {name} names "
                             f"no world object: {text!r}. Draw it once (eval.best_of=1, infer --best-of 1).")
        # the VQA answers the prompt fixes, and the prompt's own description as a caption of the
        # image: the questions check objects one by one, the caption checks them together (which
        # colour goes with which shape where), and the sum picks better than either
        # (experiments/ablations/world_self_verify.md)
        caption = (CAPTION_PROMPTS[0], CAPTION_FORMS[0].format(d=describe_request(groups)))
        out.append(implied_questions(groups) + [caption])
    return out


@torch.no_grad()
def understanding_scores(net: Any, images: torch.Tensor, questions: Sequence[Sequence[Tuple[str, str]]],
                         batch_size: int = 32) -> torch.Tensor:
    """(N,) per image (N, 3, H, W) in [0, 1]: the summed log-probability, under the model's own
    understanding side, of the answers in ``questions[i]``. Images go in as 8-bit pictures, as a
    saved PNG would."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images for {len(questions)} question sets")
    pil = [to_pil_image(im.clamp(0, 1)) for im in images]
    owner, imgs, ctx, ans = [], [], [], []
    for i, qs in enumerate(questions):
        for q, a in qs:
            owner.append(i)
            imgs.append(pil[i])
            ctx.append(q)
            ans.append(a)
    scores = torch.zeros(len(images), dtype=torch.float64)
    for i, r in zip(owner, loglikelihood(net, imgs, ctx, ans, batch_size=batch_size)):
        scores[i] += r.logprob
    return scores


def pick_best(draws: Sequence[torch.Tensor], scores_KN: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images (N, ...): per prompt the draw of highest score, the index of that draw (N,)).
    Ties go to the earliest draw."""
    if scores_KN.shape != (len(draws), len(draws[0])):
        raise ValueError(f"scores of shape {tuple(scores_KN.shape)} for {len(draws)} draws of {len(draws[0])} images")
    pick_N = scores_KN.argmax(0)  # first maximum on ties
    stacked = torch.stack(list(draws))  # (K, N, ...)
    return stacked[pick_N, torch.arange(stacked.shape[1])], pick_N


def pick_summary(pick_N: torch.Tensor, n_draws: int) -> Dict[str, float]:
    """How often each draw was kept (a judge that always keeps draw 0 has not judged)."""
    counts = torch.bincount(pick_N, minlength=n_draws).double() / max(1, len(pick_N))
    return {f"draw{k}": float(c) for k, c in enumerate(counts)}

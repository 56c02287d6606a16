"""Any checkpoint of the suite as an lmms-eval model (``vargpt_suite``): the field's harness runs
its own tasks and scorers on it.

    lmms-eval --model vargpt_suite --model_args ckpt=runs/world/stage2 --tasks vargpt_world_vqa \
        --include_path experiments/lmms_tasks --batch_size 16 --output_path runs/lmms_eval
    accelerate launch --num_processes 8 -m lmms_eval --model vargpt_suite --model_args ckpt=DIR ...

``ckpt`` is whatever ``experiments.infer.load_exported`` loads (an export directory of
``experiments.run``; the released VARGPT-7B through the ``vargpt`` loader), so world, real and
released checkpoints all go through the same class. Requests are answered with the checkpoint's
own image transform and chat template (``modules.scoring``):

  generate_until   batched ``net.answer`` under lmms-eval's generation conventions (temperature 0
                   = greedy, top_p, max_new_tokens (1024 when a task gives none), stop strings)
  loglikelihood    from the LLM's logits on the continuation's tokens, batched, reported as
                   lmms-eval ranks it: its multiple-choice scorer takes the choice with the
                   *lowest* value (argmin), because the harness's LLaVA models (and VARGPT's
                   released one) return the mean token loss of the answer turn, EOS included.
                   So does this class: (mean NLL per token, is_greedy), the training text loss
                   of the (question, choice) exchange.

Several devices: launched by ``accelerate launch`` or ``torchrun`` (WORLD_SIZE > 1) each process
takes the GPU of its local rank and lmms-eval splits the requests by rank. VARGPT-1.5 takes one
image per question: a document with several images is answered with the first (counted and
logged per task). lmms-eval is an optional extra (`make setup-eval`): only this file, the plugin
entry and the task helpers under experiments/lmms_tasks/ import it (``experiments.eval_benchmarks``
runs it as a command), so the rest of the suite imports without it.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter, defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from lmms_eval.api import instance as lmms_instance
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from experiments.infer import load_exported
from modules.scoring import answer_batch, generation_settings, loglikelihood

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _stringifies_pairs() -> bool:
    """lmms-eval 0.7.x passes every model output through ``unwrap_generation_output``, which turns a
    loglikelihood pair (float, bool) into its string, so multiple-choice scoring fails for every
    model (``too many values to unpack``); a ``GenerationResult``'s text passes through untouched."""
    unwrap = getattr(lmms_instance, "unwrap_generation_output", None)
    return unwrap is not None and isinstance(unwrap((0.0, True))[0], str)


_WRAP_PAIRS = _stringifies_pairs()


def _harness_pair(pair: Tuple[float, bool]) -> Any:
    return lmms_instance.GenerationResult(text=pair) if _WRAP_PAIRS else pair  # type: ignore[arg-type]


def _device(device: Optional[str], local_rank: int, world: int) -> torch.device:
    if world > 1:
        if not torch.cuda.is_available():
            raise RuntimeError("vargpt_suite: several processes need one CUDA device each")
        return torch.device(f"cuda:{local_rank}")
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class VargptSuite(lmms):
    """lmms-eval's model interface over a suite checkpoint. ``model_args``: ``ckpt`` (required),
    ``dtype`` (auto | float32 | bfloat16 | float16; auto = bfloat16 on a GPU that has it, else
    float32; the understanding path only: vision tower, projector, LLM), ``max_new_tokens`` (a
    cap on every task's value; 0 = none), ``seed`` (sampling tasks), ``batch_size``, ``device``."""

    is_simple = True

    def __init__(self, ckpt: str = "", batch_size: int | str = 1, device: Optional[str] = None,
                 dtype: str = "auto", max_new_tokens: int = 0, seed: int = 0,
                 max_batch_size: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__()
        if not ckpt:
            raise ValueError("vargpt_suite needs --model_args ckpt=<checkpoint directory>")
        if kwargs:
            raise ValueError(f"vargpt_suite: unknown model_args {sorted(kwargs)}; valid: ckpt, dtype, "
                             f"max_new_tokens, seed, batch_size, device")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self._device = _device(device, local_rank, world)
        if world > 1:
            self._rank, self._world_size = int(os.environ.get("RANK", local_rank)), world
            torch.cuda.set_device(self._device)
            # lmms-eval gathers request counts as CUDA tensors: an NCCL group (Accelerator, which the
            # evaluator creates under `accelerate launch`, adopts it; under torchrun it is the group).
            if torch.distributed.is_available() and not torch.distributed.is_initialized():
                torch.distributed.init_process_group("nccl")
        self.net, self.cfg = load_exported(ckpt)
        self.ckpt = str(ckpt)
        self.net.requires_grad_(False)
        if dtype == "auto":
            dt = torch.bfloat16 if self._device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        elif dtype in DTYPES:
            dt = DTYPES[dtype]
        else:
            raise ValueError(f"vargpt_suite: dtype={dtype!r}; valid: auto, {', '.join(DTYPES)}")
        self.dtype = dt
        self.net.to(self._device)
        for part in (self.net.vision, self.net.und_proj, self.net.llm):
            part.to(dt)
        self.net.eval()
        self.batch_size_per_gpu = int(batch_size) if str(batch_size).isdigit() else 1
        self.max_new_tokens_cap = int(max_new_tokens)
        self.seed = int(seed)
        self.multi_image_docs: Counter = Counter()

    # ---------------------------------------------------------------- what lmms-eval reads
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def tokenizer(self) -> Any:
        return self.net.tokenizer

    @property
    def eot_token_id(self) -> Optional[int]:
        return self.net.tokenizer.eos_token_id

    # ---------------------------------------------------------------- helpers
    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def _image(self, doc_to_visual: Any, task: str, split: str, doc_id: int) -> Any:
        """The document's one input image (PIL, RGB) or None."""
        if doc_to_visual is None:
            return None
        visuals = doc_to_visual(self._doc(task, split, doc_id)) or []
        visuals = [v for v in visuals if v is not None]
        if not visuals:
            return None
        if len(visuals) > 1:
            self.multi_image_docs[task] += 1
        v = visuals[0]
        if not hasattr(v, "convert"):
            raise TypeError(f"vargpt_suite: task {task!r} gives a {type(v).__name__} visual; only images are supported")
        return v.convert("RGB")

    def _batches(self, items: Sequence[Tuple[int, Any]], key) -> List[List[Tuple[int, Any]]]:
        """Longest contexts first (an out-of-memory shows at once), batch_size at a time."""
        ordered = sorted(items, key=key)
        n = max(1, self.batch_size)
        return [ordered[i:i + n] for i in range(0, len(ordered), n)]

    def _report_multi_image(self) -> None:
        for task, n in self.multi_image_docs.items():
            log.warning("vargpt_suite: %d document(s) of %s have several images; the first was used", n, task)
        self.multi_image_docs.clear()

    # ---------------------------------------------------------------- the interface
    @torch.no_grad()
    def generate_until(self, requests: List[Instance]) -> List[str]:
        groups: Dict[str, List[Tuple[int, Any]]] = defaultdict(list)
        for i, req in enumerate(requests):
            ctx, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            groups[json.dumps(gen_kwargs or {}, sort_keys=True, default=str)].append((i, req.args))
        out: List[Optional[str]] = [None] * len(requests)
        for key, items in groups.items():
            settings = generation_settings(json.loads(key), max_new_tokens_cap=self.max_new_tokens_cap)
            for chunk in self._batches(items, key=lambda it: -len(it[1][0])):
                images = [self._image(a[2], a[4], a[5], a[3]) for _, a in chunk]
                preds = answer_batch(self.net, images, [a[0] for _, a in chunk], settings, seed=self.seed)
                for (i, a), p in zip(chunk, preds):
                    out[i] = p
                    self.cache_hook.add_partial("generate_until", (a[0], a[1]), p)
        self._report_multi_image()
        return [o if o is not None else "" for o in out]

    @torch.no_grad()
    def loglikelihood(self, requests: List[Instance]) -> List[Tuple[float, bool]]:
        items = []
        for i, req in enumerate(requests):
            args = req.args
            if len(args) == 2:  # unconditional request (acc_mutual_info): no document, no image
                items.append((i, (args[0], args[1], None)))
                continue
            ctx, target, doc_to_visual, doc_id, task, split = args
            cont = target if isinstance(target, str) else target(self._doc(task, split, doc_id))
            items.append((i, (ctx, cont, self._image(doc_to_visual, task, split, doc_id))))
        out: List[Optional[Tuple[float, bool]]] = [None] * len(requests)
        for chunk in self._batches(items, key=lambda it: -len(it[1][0]) - len(it[1][1])):
            res = loglikelihood(self.net, [a[2] for _, a in chunk], [a[0] for _, a in chunk],
                                [a[1] for _, a in chunk], batch_size=len(chunk), include_eos=True)
            for (i, a), sc in zip(chunk, res):
                r = (sc.mean_nll, sc.is_greedy)
                out[i] = r
                self.cache_hook.add_partial("loglikelihood", (a[0], a[1]), r)
        self._report_multi_image()
        return [_harness_pair(o) for o in out]  # type: ignore[arg-type]

    def generate_until_multi_round(self, requests) -> List[str]:
        raise NotImplementedError("vargpt_suite answers single-turn requests (generate_until, loglikelihood) only")

"""The VARGPT stages for a VARGPT-v1.1 model (``model.family: vargpt11``): the same stage names,
the trainable sets mapped onto v1.1's parts (released names; the BSQ tokenizer never trains).

    llava_align  visual.merger                            (the understanding projector)
    llava_sft    visual.merger + model + lm_head
    stage1       the generation projectors, sos_embedding, the decoder's SOS pool and pos_start
    stage2       model + lm_head
    stage3       the generation projectors, sos_embedding, the whole decoder (vargpt_gen)
    v11_und      visual + model + lm_head: the world's stand-in for Qwen2-VL-Instruct, which the
                 release starts from (the ViT trains too: the world has no pretrained one)

and the release's own training stages 0-5 (``--vargpt_train_stage N`` of VARGPT-family-training,
its freeze sets in src/llamafactory/model/model_utils/visual.py ``get_forbidden_modules`` for
``qwen2vl-v1.1``; a parameter is frozen there when a forbidden name is a substring of its name):

    v11_stage0   projectors + sos_embedding + vargpt_gen        (frozen: model, lm_head, visual, vae_local)
    v11_stage1   projectors + sos_embedding                     (also frozen: vargpt_gen)
    v11_stage2   model + lm_head                                (frozen: visual, vae_local, the generation side)
    v11_stage3   as v11_stage0 (the release lists the same forbidden set)
    v11_stage4   model + lm_head + the generation side          (frozen: visual, vae_local)
    v11_stage5   everything but the tokenizer (vae_local): the editing fine-tune
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, List, Tuple

import torch.nn as nn

from datamodules.datamodule import VargptDataModule
from datamodules.paths import resolve_path
from modules.eval_v11 import V11EvalModel
from modules.evaluation import Evaluator
from modules.stages.callbacks import EvalCallback
from modules.stages.vargpt_stages import VARGPTStage
from modules.vargpt11_world import VARGPT11World
from modules.weights import load_weights

_PROJ = ("gen.image_gen_projector", "gen.image_gen_projector_out", "gen.sos_embedding")
TRAINABLE: Dict[str, Tuple[str, ...]] = {
    "llava_align": ("visual.merger",),
    "llava_sft": ("visual.merger", "model", "lm_head"),
    "stage1": _PROJ + ("gen.vargpt_gen.pos_start", "gen.vargpt_gen.text_proj_for_sos", "gen.vargpt_gen.text_norm"),
    "stage2": ("model", "lm_head"),
    "stage3": _PROJ + ("gen.vargpt_gen",),
    "v11_und": ("visual", "model", "lm_head"),
}
# the release's stages 0-5 (tests/test_vargpt11_release_stages.py checks each against the release's
# forbidden-substring rule on the released names)
_GEN = _PROJ + ("gen.vargpt_gen",)
RELEASE_STAGES: Dict[str, Tuple[str, ...]] = {
    "v11_stage0": _GEN,
    "v11_stage1": _PROJ,
    "v11_stage2": ("model", "lm_head"),
    "v11_stage3": _GEN,
    "v11_stage4": ("model", "lm_head") + _GEN,
    "v11_stage5": ("visual", "model", "lm_head") + _GEN,
}
# every v1.1 stage's set: the v1 names mapped (TRAINABLE) and the release's own (RELEASE_STAGES)
ALL_SETS: Dict[str, Tuple[str, ...]] = {**TRAINABLE, **RELEASE_STAGES}


class V11Stage(VARGPTStage):
    STAGE = ""

    def __init__(self, cfg: Any, net: nn.Module | None = None):
        # VARGPTStage.__init__ builds a v1 model: bypass it, keep its steps
        super(VARGPTStage, self).__init__(cfg)
        self.net = net if net is not None else VARGPT11World(cfg.model, template=cfg.data.chat)
        if net is None:
            load_weights(self.net, cfg.model.load, cfg.init_from, cfg.init_allow_missing, cfg.init_allow_unexpected)
        self.apply_trainable_set()

    def trainable_prefixes(self) -> Tuple[str, ...]:
        return ALL_SETS[self.STAGE]

    def configure_callbacks(self) -> List[Any]:
        """The ``eval:`` protocol after every validation, as a v1 stage's: the same evaluator and
        callback, the net put behind the evaluator's calls by ``V11EvalModel`` (val/vqa_*, val/gen_*)."""
        ev = Evaluator(self.cfg.eval, self.cfg.model, self.cfg.data.root)
        return [EvalCallback(ev, adapt=V11EvalModel)] if ev.tasks() else []


STAGE_CLASSES = {name: type(f"V11{name.title().replace('_', '')}", (V11Stage,), {"STAGE": name}) for name in ALL_SETS}


def build(name: str, cfg: Any):
    module = STAGE_CLASSES[name](cfg)
    net = module.net
    data = replace(cfg.data, root=str(resolve_path(cfg.data.root)) if cfg.data.root else "")
    sizes = net.collator_sizes()
    data = replace(data, num_image_tokens=sizes["num_image_tokens"], gen_num_tokens=sizes["gen_num_tokens"])
    return module, VargptDataModule(data, net.collator(data, train=True), eval_collator=net.collator(data))

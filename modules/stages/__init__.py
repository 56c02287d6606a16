"""Stage registry: ``stage: <name>`` in a YAML picks the LightningModule + DataModule.

Builders import Lightning lazily so that loading and validating a config stays cheap.
Each builder takes the typed ``ExperimentConfig`` and returns ``(LightningModule, LightningDataModule)``.
"""
from __future__ import annotations

import importlib

from modules.components.registry import Registry

STAGES = Registry("stage")


@STAGES.register("debug")
def _debug(cfg):
    """Plumbing smoke test: a projector regressing a fixed linear map on synthetic data."""
    from modules.stages.debug import build  # lazy: Lightning, only when a run starts

    return build(cfg)


def _vargpt(name):
    def builder(cfg):
        if getattr(cfg.model, "family", "vargpt") == "vargpt11":
            from modules.stages import v11_stages  # lazy: the Qwen2-VL / Infinity model, only for v1.1 runs

            return v11_stages.build(name, cfg)
        from modules.stages import vargpt_stages  # lazy: Lightning + the model, only when a run starts

        return vargpt_stages.build(name, cfg)

    builder.__name__ = f"build_{name}"
    return builder


# The VARGPT stages (modules/stages/vargpt_stages.py); llava_* are the LLaVA-1.5 steps that give
# the embedded world the understanding start VARGPT assumes (and the understanding-only baseline).
# They read data.sources / data.val_sources through the shared DataModule (the bases hold out
# their own validation split).
VARGPT_STAGES = ("llava_align", "llava_sft", "stage1", "stage2", "stage3")
for _name in VARGPT_STAGES:
    STAGES.register(_name)(_vargpt(_name))


# VARGPT-v1.1's released training stages 0-5 (modules/stages/v11_stages.py RELEASE_STAGES); they
# need a v1.1 model (model.family: vargpt11).
V11_RELEASE_STAGES = tuple(f"v11_stage{i}" for i in range(6))
# ... and the world's understanding start (the release starts from Qwen2-VL-Instruct; the world
# makes one: ViT, merger and LLM on understanding data, experiments/world/bases/qwen2vl.yaml)
V11_WORLD_STAGES = ("v11_und",)


def _v11_only(name):
    def builder(cfg):
        if getattr(cfg.model, "family", "vargpt") != "vargpt11":
            raise ValueError(f"stage {name!r} is a VARGPT-v1.1 training stage: set model.family: vargpt11 "
                             f"(e.g. experiments/v11/world.yaml or experiments/real/vargpt_v11.yaml)")
        from modules.stages import v11_stages  # lazy: the Qwen2-VL / Infinity model, only for v1.1 runs

        return v11_stages.build(name, cfg)

    builder.__name__ = f"build_{name}"
    return builder


for _name in V11_RELEASE_STAGES + V11_WORLD_STAGES:
    STAGES.register(_name)(_v11_only(_name))


@STAGES.register("v11_dpo")
def _v11_dpo(cfg):
    """DPO on image bits for a v1.1 model (modules/dpo.py; the ``dpo:`` section; pairs: datamodules/pairs.py)."""
    if getattr(cfg.model, "family", "vargpt") != "vargpt11":
        raise ValueError("stage 'v11_dpo' is a VARGPT-v1.1 stage: set model.family: vargpt11 "
                         "(e.g. experiments/v11/world_dpo.yaml)")
    from modules import dpo_stage  # lazy: Lightning + the v1.1 model, only when a run starts

    return dpo_stage.build(cfg)


def build_stage(cfg):
    return STAGES.get(cfg.stage, where="stage")(cfg)


# Stage 0 of the embedded world: the tiny stand-ins for the pretrained parts (modules/stages/bases/).
def _base(name):
    def builder(cfg):
        module = importlib.import_module(f"modules.stages.bases.{name.removeprefix('base_')}")  # lazy: one base's deps

        return getattr(module, f"build_{name}")(cfg)

    builder.__name__ = f"build_{name}"
    return builder


for _name in ("base_vqvae", "base_bsq", "base_var", "base_classifier", "base_vision", "base_llm"):
    STAGES.register(_name)(_base(_name))

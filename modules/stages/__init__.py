"""Stage registry: ``stage: <name>`` in a YAML picks the LightningModule + DataModule.

Builders import Lightning lazily so that loading and validating a config stays cheap.
Each builder takes the typed ``ExperimentConfig`` and returns ``(LightningModule, LightningDataModule)``.
"""
from __future__ import annotations

from modules.components.registry import Registry

STAGES = Registry("stage")


@STAGES.register("debug")
def _debug(cfg):
    """Plumbing smoke test: a projector regressing a fixed linear map on synthetic data."""
    from modules.stages.debug import build

    return build(cfg)


def build_stage(cfg):
    return STAGES.get(cfg.stage, where="stage")(cfg)

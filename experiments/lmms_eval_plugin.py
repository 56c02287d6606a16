"""The suite's entry in lmms-eval's model registry, kept apart from the model class so lmms-eval's
start-up (which loads every registered manifest) imports nothing of the suite.

pyproject.toml names ``manifest`` under the entry-point group ``lmms_eval.models``; `make
setup-eval` installs the project (editable, no dependencies) so the entry point exists. Then

    lmms-eval --model vargpt_suite --model_args ckpt=runs/world/stage2 --tasks vargpt_world_vqa \
        --include_path experiments/lmms_tasks

resolves ``vargpt_suite`` to ``experiments.lmms_eval_model.VargptSuite``. Only lmms-eval imports
this file (the optional extra); nothing else in the suite does.
"""
from __future__ import annotations

MODEL_NAME = "vargpt_suite"
CLASS_PATH = "experiments.lmms_eval_model.VargptSuite"


def manifest():
    """lmms-eval calls this when it builds its registry (a callable payload is allowed)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)

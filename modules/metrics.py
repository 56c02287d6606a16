"""Evaluation metrics: VQA accuracy, FID/IS with a configurable extractor, world attribute accuracy.

Everything here is a torchmetrics ``Metric`` (or holds them), so Lightning moves the states to
the right device and sums them across processes at ``compute()``.

  VQAAccuracy / ExactMatchAccuracy     modules/metrics_vqa.py         (lmms-eval VQAv2 scorer)
  GenMetricsConfig, GenerationMetrics  modules/metrics_generation.py  (FID / IS, cached reals)
  WorldAttributeAccuracy               modules/metrics_world.py       (prompt attributes read back: the one scorer)

Import cost: ``import torchmetrics`` (about 3-4 s on 2 cores) dominates; nothing heavier loads.
"""
from modules.metrics_generation import (  # noqa: F401
    EXTRACTORS,
    INCEPTION_WEIGHTS_FILENAME,
    INCEPTION_WEIGHTS_URL,
    GenerationMetrics,
    GenFeatureExtractor,
    GenMetricsConfig,
    InceptionExtractor,
    WorldClassifier,
    WorldExtractor,
    build_feature_extractor,
    build_gen_metrics,
    hash_state_dict,
)
from modules.metrics_vqa import (  # noqa: F401
    ExactMatchAccuracy,
    VQAAccuracy,
    exact_match,
    normalize_vqa_answer,
    vqa_accuracy,
)
from modules.metrics_world import (  # noqa: F401
    WorldAttributeAccuracy,
    attribute_scores,
    check_scene,
    predict_scenes,
    requested_groups,
    requested_objects,
    score_scenes,
    scores_by_objects,
)

__all__ = [
    "VQAAccuracy", "ExactMatchAccuracy", "vqa_accuracy", "exact_match", "normalize_vqa_answer",
    "GenMetricsConfig", "GenerationMetrics", "GenFeatureExtractor", "InceptionExtractor",
    "WorldExtractor", "WorldClassifier", "build_feature_extractor", "build_gen_metrics",
    "hash_state_dict", "EXTRACTORS", "INCEPTION_WEIGHTS_FILENAME", "INCEPTION_WEIGHTS_URL",
    "WorldAttributeAccuracy", "attribute_scores", "check_scene", "requested_groups", "predict_scenes",
    "score_scenes", "scores_by_objects", "requested_objects",
]

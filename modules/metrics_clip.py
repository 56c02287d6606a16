"""CLIP score of generated images against their texts (torchmetrics ``CLIPScore``), with the CLIP
model from a local directory: the text-image agreement number text-to-image papers report beside
FID / IS (modules/metrics_generation.py), never downloaded at run time."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import torch
from torch import Tensor

from modules.checkpoint import sha256_file
from modules.metrics_generation import _to_float01


def missing_clip_dir_message(path: str) -> str:
    return (
        f"CLIP directory not found: {path or '<empty>'} (config key eval.clip_dir). The CLIP model for "
        f"the CLIP score is never downloaded at run time. Save one once on a machine with network access, "
        f"e.g. python -c \"from transformers import CLIPModel, CLIPProcessor; n='openai/clip-vit-large-patch14'; "
        f"CLIPModel.from_pretrained(n).save_pretrained('DIR'); CLIPProcessor.from_pretrained(n).save_pretrained('DIR')\", "
        f"copy DIR here and set eval.clip_dir to it."
    )


class _ProjectedFeatures(torch.nn.Module):
    """A CLIPModel whose get_image_features / get_text_features return the projected embeddings
    as tensors: transformers 5 returns a BaseModelOutputWithPooling (the projection in
    ``pooler_output``), which torchmetrics 1.9's CLIPScore cannot normalise."""

    def __init__(self, clip: torch.nn.Module):
        super().__init__()
        self.clip = clip
        self.config = clip.config

    @staticmethod
    def _tensor(out: Any) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output

    def get_image_features(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._tensor(self.clip.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._tensor(self.clip.get_text_features(*args, **kwargs))


def _weights_sha256(d: Path) -> Dict[str, str]:
    files = sorted(p for p in d.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    return {p.name: sha256_file(str(p)) for p in files}


@torch.no_grad()
def clip_score(images: Tensor, texts: List[str], clip_dir: str, batch_size: int = 64) -> Dict[str, Any]:
    """torchmetrics ``CLIPScore`` of images (N, 3, H, W; float in [0, 1] or uint8) against their
    texts, with the CLIP model and processor saved in ``clip_dir``: mean over images of
    max(100 * cos(image, text), 0). Images go in as uint8 (what CLIP's processor expects: its own
    resize and centre crop, then its normalisation). Returns the score and its protocol (model
    directory, weights sha256, processor input size, count)."""
    d = Path(clip_dir) if clip_dir else None
    if d is None or not (d / "config.json").is_file():
        raise FileNotFoundError(missing_clip_dir_message(clip_dir))
    if len(texts) != images.shape[0]:
        raise ValueError(f"clip_score: {images.shape[0]} images but {len(texts)} texts")
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(str(d), local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(str(d), local_files_only=True)
    metric = CLIPScore(model_name_or_path=lambda: (_ProjectedFeatures(model), processor))
    u8 = images if images.dtype == torch.uint8 else (_to_float01(images).clamp(0, 1) * 255).round().to(torch.uint8)
    for i in range(0, len(texts), batch_size):
        metric.update(list(u8[i:i + batch_size].cpu()), list(texts[i:i + batch_size]))
    ip = processor.image_processor

    def size(sz: Any) -> Any:
        return {k: v for k, v in dict(getattr(sz, "__dict__", None) or sz or {}).items() if v is not None}

    return {
        "clip_score": float(metric.compute()),
        "clip_protocol": {
            "metric": "torchmetrics CLIPScore: mean of max(100 * cos(image, text), 0)",
            "clip_dir": str(d), "weights_sha256": _weights_sha256(d),
            "model_type": getattr(model.config, "model_type", ""),
            "image_input": f"uint8, CLIP processor: resize {size(getattr(ip, 'size', None))}, "
                           f"centre crop {size(getattr(ip, 'crop_size', None))}",
            "num_images": int(images.shape[0]),
        },
    }

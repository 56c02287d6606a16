"""Generation-target transform the collator applies (the model config picks the resolution).

The input-image transform is the vision encoder's own (`VisionEncoder.image_transform()`, class
`modules.components.vision_encoders.ImageTransform`), so it always matches the tower.
Picklable, so DataLoader workers can receive it under any start method.
  GenTransform    PIL -> (3, R, R) in [-1, 1] for the VQVAE: deterministic resize of the shorter
                  side + centre crop (evaluation-grade; no random crops, unlike the release).
"""
from __future__ import annotations


import numpy as np
import torch
from PIL import Image

def _to_tensor(im: Image.Image) -> torch.Tensor:
    arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)  # (3, H, W) in [0, 1]


def resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    im = im.convert("RGB")
    w, h = im.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.BICUBIC if scale > 1 else Image.LANCZOS)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return im


class GenTransform:
    def __init__(self, resolution: int = 256):
        self.resolution = resolution

    def __call__(self, im: Image.Image) -> torch.Tensor:
        return _to_tensor(resize_center_crop(im, self.resolution)).mul_(2.0).sub_(1.0)

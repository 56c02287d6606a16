"""Image transforms the collator applies (the model config picks the parameters).

Both are picklable classes so DataLoader workers can receive them under any start method.
  ImageTransform  PIL -> (3, S, S) float, normalised for the vision encoder
                  (LLaVA-1.5 pads to a square with the mean colour, then resizes: mode "pad").
  GenTransform    PIL -> (3, R, R) in [-1, 1] for the VQVAE: deterministic resize of the shorter
                  side + centre crop (evaluation-grade; no random crops, unlike the release).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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


class ImageTransform:
    def __init__(self, size: int = 336, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD, mode: str = "pad"):
        if mode not in ("pad", "crop"):
            raise ValueError(f"ImageTransform mode {mode!r}; valid: pad, crop")
        self.size, self.mode = size, mode
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, im: Image.Image) -> torch.Tensor:
        im = im.convert("RGB")
        if self.mode == "pad" and im.width != im.height:
            side = max(im.size)
            fill = tuple(int(round(m * 255)) for m in self.mean.flatten().tolist())
            canvas = Image.new("RGB", (side, side), fill)
            canvas.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
            im = canvas
        im = resize_center_crop(im, self.size)
        return (_to_tensor(im) - self.mean) / self.std


class GenTransform:
    def __init__(self, resolution: int = 256):
        self.resolution = resolution

    def __call__(self, im: Image.Image) -> torch.Tensor:
        return _to_tensor(resize_center_crop(im, self.resolution)).mul_(2.0).sub_(1.0)

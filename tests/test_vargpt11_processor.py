"""The Qwen2-VL image processor of the v1.1 family equals the official one's outputs (vendored
pixel_values) and transformers' Qwen2VLImageProcessorPil on sizes that need resizing."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from modules.components.qwen2vl import Qwen2VLConfig, preprocess_image

from tests.conftest import require_fixture

V11 = "vargpt_v11_official"


@pytest.fixture(scope="module")
def cfg():
    return Qwen2VLConfig.from_released(json.loads(require_fixture(V11, "config.json").read_text()))


def test_matches_the_official_pixel_values(cfg):
    u = torch.load(require_fixture(V11, "vectors.pt"), weights_only=True)["und"]
    parts = [preprocess_image(im, cfg) for im in u["images_uint8_HWC"]]
    assert torch.equal(torch.cat([p for p, _ in parts]), u["pixel_values"])
    assert torch.equal(torch.cat([g for _, g in parts]), u["image_grid_thw"])


@pytest.mark.parametrize("hw", [(65, 90), (120, 47), (300, 200)])
def test_matches_transformers_processor_when_resizing(cfg, hw):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    im = torch.randint(0, 256, (*hw, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    ref = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)(
        images=[Image.fromarray(im.numpy())], return_tensors="pt")
    p, g = preprocess_image(im, cfg)
    assert torch.equal(g, ref["image_grid_thw"]) and (p - ref["pixel_values"]).abs().max() == 0

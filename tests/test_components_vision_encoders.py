"""Vision encoder family: shapes, layer/CLS selection, preprocessing, local weights, meta builds."""
import time

import numpy as np
import pytest
import torch
from PIL import Image

from modules.checkpoint import StateDictMismatchError
from modules.components.registry import UnknownComponentError
from modules.config import LoadSpec
from modules.weights import load_into
from modules.components.vision_encoders import (
    OPENAI_CLIP_MEAN,
    VISION_ENCODERS,
    VisionEncoderConfig,
    build_vision_encoder,
)

TINY = dict(image_size=32, patch_size=8, width=32, depth=3, heads=2)  # 4x4 = 16 patches


def _x(b=2, size=32):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_registry_names_and_unknown_name():
    assert VISION_ENCODERS.names() == ["hf_clip", "hf_siglip", "timm_vit", "tiny_vit"]
    with pytest.raises(UnknownComponentError, match="valid choices: hf_clip, hf_siglip, timm_vit, tiny_vit"):
        build_vision_encoder(VisionEncoderConfig(name="resnet"))


@pytest.mark.parametrize("name", ["tiny_vit", "hf_clip", "hf_siglip"])
def test_shapes_by_name(name):
    enc = build_vision_encoder(VisionEncoderConfig(name=name, **TINY))
    feats_BNC = enc(_x())
    assert feats_BNC.shape == (2, 16, 32)
    assert (enc.num_tokens, enc.out_dim, enc.image_size) == (16, 32, 32)


@pytest.mark.parametrize("name,n_keep", [("tiny_vit", 17), ("hf_clip", 17), ("hf_siglip", 16)])
def test_keep_cls(name, n_keep):
    # SigLIP has no CLS token: keeping it changes nothing.
    enc = build_vision_encoder(VisionEncoderConfig(name=name, drop_cls=False, **TINY))
    assert enc(_x()).shape == (2, n_keep, 32) and enc.num_tokens == n_keep


@pytest.mark.parametrize("name", ["tiny_vit", "hf_clip"])
def test_feature_layer_selects_a_different_layer(name):
    torch.manual_seed(0)
    last = build_vision_encoder(VisionEncoderConfig(name=name, feature_layer=-1, **TINY)).eval()
    torch.manual_seed(0)
    second = build_vision_encoder(VisionEncoderConfig(name=name, feature_layer=-2, **TINY)).eval()
    assert all(torch.equal(a, b) for a, b in zip(last.state_dict().values(), second.state_dict().values()))
    x = _x()
    with torch.no_grad():
        f_last, f_second = last(x), second(x)
    assert f_last.shape == f_second.shape
    assert not torch.allclose(f_last, f_second, atol=1e-3)


def test_tiny_vit_layer_matches_manual_blocks():
    enc = build_vision_encoder(VisionEncoderConfig(name="tiny_vit", feature_layer=-2, **TINY)).eval()
    m = enc.tower
    x = _x()
    with torch.no_grad():
        h = m.norm_pre(m._pos_embed(m.patch_embed(x)))
        h = m.blocks[1](m.blocks[0](h))  # 3 blocks: -2 is block 2's output (HF indexing), no final norm
        torch.testing.assert_close(enc(x), h[:, 1:])
        # feature_layer 0 is the embedding output
        enc0 = build_vision_encoder(VisionEncoderConfig(name="tiny_vit", feature_layer=0, **TINY))
        enc0.load_state_dict(enc.state_dict())
        torch.testing.assert_close(enc0(x), m.norm_pre(m._pos_embed(m.patch_embed(x)))[:, 1:])


def test_hf_clip_layer_matches_hidden_states():
    enc = build_vision_encoder(VisionEncoderConfig(name="hf_clip", feature_layer=-2, **TINY)).eval()
    x = _x()
    with torch.no_grad():
        hs = enc.tower(pixel_values=x, output_hidden_states=True).hidden_states
        torch.testing.assert_close(enc(x), hs[-2][:, 1:])
        assert len(hs) == 4  # embeddings + 3 layers


def test_feature_layer_out_of_range():
    with pytest.raises(ValueError, match="feature_layer 4 out of range"):
        build_vision_encoder(VisionEncoderConfig(name="tiny_vit", feature_layer=4, **TINY))


def test_image_transform_pad_and_crop():
    enc = build_vision_encoder(VisionEncoderConfig(name="hf_clip", **TINY))
    tf = enc.image_transform()
    # A wide red image: padding to a square adds mean-coloured bands at top and bottom.
    img = Image.fromarray(np.full((20, 60, 3), (255, 0, 0), dtype=np.uint8))
    x_3HW = tf(img)
    assert x_3HW.shape == (3, 32, 32) and x_3HW.dtype == torch.float32
    assert x_3HW[:, 0, 0].abs().max() < 0.02  # background = mean colour -> ~0 after normalising
    assert x_3HW[0, 16, 16] > 1.5  # red channel of the object, normalised with CLIP's std
    assert tuple(tf.mean) == OPENAI_CLIP_MEAN
    crop = build_vision_encoder(VisionEncoderConfig(name="tiny_vit", resize_mode="crop", **TINY)).image_transform()
    y_3HW = crop(img)
    assert y_3HW.shape == (3, 32, 32)
    assert y_3HW[0].min() > 0.99  # all red, no padding; tiny_vit normalises with 0.5/0.5
    # Picklable, for DataLoader workers.
    import pickle

    assert torch.equal(pickle.loads(pickle.dumps(tf))(img), x_3HW)


def test_timm_vit_by_name():
    enc = build_vision_encoder(VisionEncoderConfig(name="timm_vit", model_name="vit_tiny_patch16_224", image_size=32))
    assert enc(_x()).shape == (2, 4, 192) and enc.num_tokens == 4
    with pytest.raises(ValueError, match="needs model_name"):
        build_vision_encoder(VisionEncoderConfig(name="timm_vit"))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_timm_weights_from_file(tmp_path, suffix):
    src = build_vision_encoder(VisionEncoderConfig(name="tiny_vit", **TINY)).eval()
    path = tmp_path / f"tower{suffix}"
    sd = {k: v.contiguous() for k, v in src.tower.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd}, str(path))
    # weights arrive through model.load (format timm): the encoder itself builds with random ones
    loaded = build_vision_encoder(VisionEncoderConfig(name="tiny_vit", **TINY)).eval()
    load_into(loaded, LoadSpec(path=str(path), format="timm", into="vision"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(_x()), src(_x()))
    shallower = build_vision_encoder(VisionEncoderConfig(name="tiny_vit", **{**TINY, "depth": 2}))
    with pytest.raises(StateDictMismatchError, match="unexpected keys"):
        load_into(shallower, LoadSpec(path=str(path), format="timm", into="vision"))


def test_hf_clip_from_local_full_checkpoint(tmp_path):
    """LLaVA loads CLIPVisionModel from a full CLIPModel checkpoint: same here, from a local dir."""
    import json

    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    full = CLIPModel(cfg).eval()
    full.save_pretrained(str(tmp_path / "clip"))
    (tmp_path / "clip" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6], "crop_size": {"height": 32, "width": 32}})
    )
    enc = build_vision_encoder(VisionEncoderConfig(name="hf_clip", config_dir=str(tmp_path / "clip"))).eval()
    load_into(enc, LoadSpec(path=str(tmp_path / "clip"), format="hf", into="vision"))  # text tower dropped
    x = _x()
    with torch.no_grad():
        ref = full.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(enc(x), ref)
    assert enc.image_transform().mean == (0.1, 0.2, 0.3)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        build_vision_encoder(VisionEncoderConfig(name="hf_clip", config_dir=str(tmp_path / "missing")))


def test_meta_clip_l14_336_parameter_count():
    """LLaVA-1.5's tower, config only, no weights: 303,507,456 parameters, 576 tokens of 1024."""
    t0 = time.perf_counter()
    with torch.device("meta"):
        hf = build_vision_encoder(VisionEncoderConfig(name="hf_clip", preset="clip-vit-l-14-336"))
        tm = build_vision_encoder(VisionEncoderConfig(name="timm_vit", model_name="vit_large_patch14_clip_336"))
    elapsed = time.perf_counter() - t0
    n_hf = sum(p.numel() for p in hf.parameters())
    assert n_hf == 303_507_456
    assert sum(p.numel() for p in tm.parameters()) == n_hf  # timm's copy of the same architecture
    assert (hf.num_tokens, hf.out_dim, hf.image_size) == (576, 1024, 336)
    assert (tm.num_tokens, tm.out_dim) == (576, 1024)
    assert next(hf.parameters()).device.type == "meta"
    assert elapsed < 10.0
    with pytest.raises(ValueError, match="valid: clip-vit-b-16"):
        build_vision_encoder(VisionEncoderConfig(name="hf_clip", preset="clip-h"))


def test_dtype_bfloat16():
    enc = build_vision_encoder(VisionEncoderConfig(name="hf_clip", dtype="bfloat16", **TINY))
    assert next(enc.parameters()).dtype == torch.bfloat16
    assert enc(_x()).dtype == torch.bfloat16  # float32 pixels are cast to the tower's dtype
    with pytest.raises(ValueError, match="vision_encoder.dtype"):
        build_vision_encoder(VisionEncoderConfig(name="tiny_vit", dtype="half", **TINY))

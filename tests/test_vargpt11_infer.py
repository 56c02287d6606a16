"""experiments.infer with a VARGPT-v1.1 directory: answers, generates and edits (token-id prompts,
the vendored directory has no tokenizer), batched with per-row seeds, never the clock; the
model writes no file, the launcher does."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from experiments.infer import main
from modules.vargpt11_format import build_released

from tests.conftest import require_fixture

V11 = "vargpt_v11_official"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # see tests/conftest.py
    yield


def test_cli_answers_generates_and_edits(tmp_path, capsys):
    d = require_fixture(V11)
    v = torch.load(d / "vectors.pt", weights_only=True)["edit_infer"]
    src = tmp_path / "src.png"
    Image.fromarray(v["source_uint8_HWC"].numpy()).save(src)
    edit_ids = ",".join(str(i) for i in v["prompt_ids"][0].tolist())
    out = tmp_path / "gen.png"
    rc = main([str(d), "--pn", "0.06M", "--question-ids", "201,5,9,202,201", "--max-new-tokens", "2",
               "--prompt-ids", "201,5,9,202,201,7,8", "--prompt-ids", "201,6,9,202,201,7,8",
               "--prompt-ids", edit_ids, "--edit-image", "", "--edit-image", "", "--edit-image", str(src),
               "--behaviour", "released", "--seed", "3", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "A: [" in text and "3 image(s)" in text
    img = np.asarray(Image.open(out))
    assert img.shape == (256, 3 * 256, 3)
    # the editing row (seed 3 + 2) against the official edit, drawn with seed 3: a different draw
    assert img[:, 512:].std() > 0


def test_batched_rows_draw_as_alone():
    model, _ = build_released(require_fixture(V11), pn="0.06M")
    ids = torch.tensor([[201, 5, 9, 202, 201, 7, 8], [201, 6, 9, 202, 201, 7, 8]])
    both = model.generate_image(ids, seed=[11, 12])
    alone = model.generate_image(ids[1:], seed=[12])
    assert all(torch.equal(a[1:], b) for a, b in zip(both["bits"], alone["bits"]))
    again = model.generate_image(ids, seed=[11, 12])
    assert torch.equal(again["uint8"], both["uint8"])


def test_batched_answers_equal_one_by_one():
    model, _ = build_released(require_fixture(V11), pn="0.06M")
    ids = torch.tensor([[201, 5, 9, 202, 201], [201, 6, 7, 202, 201]])
    both = model.generate_text(ids, max_new_tokens=3)
    for b in range(2):
        assert torch.equal(model.generate_text(ids[b:b + 1], max_new_tokens=3)[0], both[b])

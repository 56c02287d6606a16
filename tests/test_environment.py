"""requirements.txt (the one place pins live) and environment.yml name the same versions."""
from __future__ import annotations

import re

import yaml

from tests.conftest import REPO_ROOT

PIN = re.compile(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s;#]+)$")


def _pins(lines):
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = PIN.match(line)
        assert m, f"not an exact pin: {line!r} (an open range lets pip pick other builds)"
        out[m.group(1).lower()] = m.group(2)
    return out


def test_requirements_are_exact_pins_and_match_environment_yml():
    req = _pins((REPO_ROOT / "requirements.txt").read_text().splitlines())
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    envpins = _pins(pip_section)
    assert req == envpins
    assert req["torch"] == "2.14.1" and req["torchvision"] == "0.29.1"
    for pkg in ("lightning", "torchmetrics", "webdataset", "omegaconf", "transformers", "timm",
                "mlflow", "pycocotools", "pytest"):
        assert pkg in req, f"{pkg} missing from requirements.txt"
    assert "python=3.11" in env["dependencies"]

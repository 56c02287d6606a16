"""The vision-feature linear probe (experiments/probe.py) separates what is linearly readable."""
from __future__ import annotations

import torch

from experiments.probe import linear_probe


def test_linear_probe_reads_a_planted_attribute_and_not_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (600,), generator=g)
    x = torch.randn(600, 32, generator=g)
    x[torch.arange(600), y] += 3.0  # the label is written into one feature per class
    assert linear_probe(x, y, n_train=400) > 0.9
    y_noise = torch.randint(0, 4, (600,), generator=g)
    assert linear_probe(x, y_noise, n_train=400) < 0.45  # chance is 0.25

"""The Makefile's OpenMP wait policy: jobs that have the cores to themselves spin (ACTIVE), jobs
that share them wait passively, and a policy the user sets wins everywhere (`make -n`: nothing runs)."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def _dry(target: str, policy: str | None = None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run(["make", "-n", "--no-print-directory", target], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    return out.stdout.replace("\\\n", " ").splitlines()  # one line per command (continuations joined)


def _line(lines: list[str], needle: str) -> str:
    hits = [ln for ln in lines if needle in ln]
    assert len(hits) == 1, (needle, lines)
    return hits[0]


def test_single_job_targets_spin_and_a_user_policy_wins():
    for stage in ("stage1", "stage2", "stage3"):
        line = _line(_dry(stage), f"experiments.run experiments/world/{stage}.yaml")
        assert line.startswith("OMP_WAIT_POLICY=ACTIVE "), line
    line = _line(_dry("stage1", "PASSIVE"), "experiments/world/stage1.yaml")
    assert line.startswith("OMP_WAIT_POLICY=PASSIVE "), line


def test_pipeline_pairs_passive_jobs_then_runs_stage3_and_scoreboard_alone():
    lines = _dry("pipeline")
    paired = _line(lines, "-j2")
    # the paired sub-make inherits the exported PASSIVE policy; its jobs run one thread each
    assert not paired.startswith("OMP_WAIT_POLICY=") and "trainer.num_threads=1" in paired
    assert "stage3" not in paired and "stage2_und_only" in paired
    # the baseline hands its core over to stage 2 when it ends (trainer.threads_file)
    handover = paired.split("trainer.threads_file=")[1].split()[0].rstrip('"')
    assert f"UND_ONLY_THEN=\"echo 2 > {handover}\"" in paired
    assert f"echo 2 > {handover}" in lines[lines.index(paired) + 1:]  # run after the baseline (make -n lists it)
    # one thread while paired (no team to spin for), two that spin once it has the cores alone
    s2 = [ln for ln in lines if "experiments/world/stage2.yaml" in ln and "trainer.threads_file=" in ln]
    assert len(s2) == 1 and s2[0].startswith("OMP_WAIT_POLICY=ACTIVE "), s2
    assert not _line(lines, "experiments/world/stage2_und_only.yaml").startswith("OMP_WAIT_POLICY=ACTIVE")
    solo = _line(lines, "STAGE3_ARGS=")
    assert solo.startswith("OMP_WAIT_POLICY=ACTIVE ") and "stage3/model.safetensors" in solo
    assert lines.index(solo) > lines.index(paired)  # stage 3 starts after both paired jobs end
    assert _line(lines, "-m experiments.pipeline").startswith("OMP_WAIT_POLICY=ACTIVE ")
    # with a policy set by the user, nothing is switched to spinning
    assert not any("OMP_WAIT_POLICY=ACTIVE" in ln for ln in _dry("pipeline", "PASSIVE"))

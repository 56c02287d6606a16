"""The suite through lmms-eval, end to end, offline: the `lmms-eval` command runs the local fixture
tasks (tests/fixtures/lmms_tasks: a VQAv2-style open-ended task and a POPE-style multiple-choice
task) and the world's VQA task (experiments/lmms_tasks) on a tiny checkpoint of the suite, and its
scores equal the suite's own.

Needs the optional extra (`make setup-eval`): without it every test here fails in CI (CI=true; .ci/run
installs it) and is skipped elsewhere with the install command as the reason. Marked
``lmms_eval``: `make test-eval` runs exactly these (and the offline generation tests beside them).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, REPO_ROOT, require_fixture

# without the extra: a failure in CI (CI=true), elsewhere a skip naming `make setup-eval` (conftest)
pytestmark = [pytest.mark.lmms_eval, pytest.mark.usefixtures("lmms_eval_extra")]
POST = "\nAnswer the question using a single word or phrase."  # the tasks' lmms_eval_specific_kwargs


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny stage-2 export of the launcher (random stage-1 start, one step): what any trained
    checkpoint directory looks like to lmms-eval."""
    from datamodules.world import generate_split
    from experiments.config import load_config
    from experiments.run import fit
    from tests.tiny import tiny_tokenizer_dir

    root = tmp_path_factory.mktemp("lmms_ckpt")
    generate_split(str(root / "data" / "train"), "train", {"vqa": 8, "caption": 8, "gen": 8}, seed=0, size=32, shard_size=8)
    tok = tiny_tokenizer_dir(root)
    loaded = load_config(REPO_ROOT / "experiments/tiny/stage2.yaml", [
        f"model.tokenizer.path={tok}", f"data.root={root / 'data'}", f"output_dir={root / 'stage2'}", "init_from=''",
        f"logging.tracking_uri=sqlite:///{root / 'mlflow.db'}", f"logging.artifact_root={root / 'art'}",
        "trainer.max_steps=1", "trainer.val_every_n_steps=0"])
    fit(loaded)
    return root / "stage2"


def _docs(task: str):
    return [json.loads(l) for l in require_fixture("lmms_tasks", task, "test.jsonl").read_text().splitlines()]


def _image(doc, task_dir: Path):
    from PIL import Image

    return Image.open(task_dir / doc["image"]).convert("RGB")


def _matched_task(tasks_dir: Path, preds):
    """vqav2_local with each document's ten answers partly replaced by the model's own answer (0, 1, 2,
    3 or all ten annotators agree with it), so lmms-eval's VQAv2 score is not trivially 0."""
    src, dst = tasks_dir / "vqav2_local", tasks_dir / "vqav2_local_matched"
    dst.mkdir()
    shutil.copy(src / "utils.py", dst / "utils.py")
    (dst / "vqav2_local_matched.yaml").write_text(
        (src / "vqav2_local.yaml").read_text().replace("task: vqav2_local", "task: vqav2_local_matched"))
    rows = []
    for k, (doc, p) in enumerate(zip(_docs("vqav2_local"), preds)):
        n = [0, 1, 2, 3, 10, 5][k % 6]
        answers = [{"answer": p if j < n else a["answer"], "answer_confidence": "yes", "answer_id": j + 1}
                   for j, a in enumerate(doc["answers"])]
        rows.append(json.dumps(dict(doc, answers=answers)))
    (dst / "test.jsonl").write_text("\n".join(rows) + "\n")
    return [json.loads(r) for r in rows]


def _world(tmp_path):
    """A tiny world test split where the world task reads it (runs/data/world/test, relative to the
    working directory) and its questions and answers as the suite reads them."""
    from datamodules.world import generate_split
    from modules.evaluation import iter_records

    test = tmp_path / "cwd" / "runs" / "data" / "world" / "test"
    generate_split(str(test), "test", {"vqa": 10}, seed=3, size=32)
    return list(iter_records("vqa-*.tar", str(test)))


def _lmms_eval_command():
    exe = Path(sys.executable).parent / "lmms-eval"
    if not exe.is_file():
        pytest.fail(f"{exe} missing: the extra is installed but not its console script (make setup-eval)")
    return [str(exe)]


def test_lmms_eval_cli_runs_local_tasks_and_scores_like_the_suite(tiny_ckpt, tmp_path):
    import torch

    from experiments.infer import load_exported
    from modules.metrics import VQAAccuracy
    from modules.scoring import answer_batch, generation_settings, loglikelihood

    # The fixture tasks, copied with the images they point at (same relative layout), plus one
    # derived task whose references contain the model's own answers.
    tasks_dir = tmp_path / "fixtures" / "lmms_tasks"
    shutil.copytree(FIXTURES / "lmms_tasks", tasks_dir)
    shutil.copytree(FIXTURES / "formats" / "vqav2" / "images", tmp_path / "fixtures" / "formats" / "vqav2" / "images")
    net, _ = load_exported(tiny_ckpt)
    vqa_docs = _docs("vqav2_local")
    vdir = FIXTURES / "lmms_tasks" / "vqav2_local"
    with torch.no_grad():
        expected = answer_batch(net, [_image(d, vdir) for d in vqa_docs], [d["question"] + POST for d in vqa_docs],
                                generation_settings({"max_new_tokens": 16, "until": ["\n\n"]}))
    matched_docs = _matched_task(tasks_dir, expected)
    # the world's VQA test split, the task file as shipped in experiments/lmms_tasks
    shutil.copytree(REPO_ROOT / "experiments" / "lmms_tasks" / "vargpt_world", tasks_dir / "vargpt_world")
    world = _world(tmp_path)
    wq = [next(m["content"] for m in s["record"]["messages"] if m["role"] == "user").replace("<image>", "").strip()
          for s in world]
    with torch.no_grad():
        world_expected = net.answer([s["images"][0] for s in world], wq, max_new_tokens=4)

    out = tmp_path / "out"
    env = dict(os.environ, HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    cmd = _lmms_eval_command() + [
        "--model", "vargpt_suite", "--model_args", f"ckpt={tiny_ckpt},dtype=float32",
        "--tasks", "vqav2_local,pope_local,vqav2_local_matched,vargpt_world_vqa", "--include_path", str(tasks_dir),
        "--batch_size", "4", "--output_path", str(out), "--log_samples", "--verbosity", "WARNING"]
    # working directory: where the world task finds runs/data/world (the fixture tasks' data is
    # anchored at their YAML files)
    proc = subprocess.run(cmd, cwd=tmp_path / "cwd", env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (results_file,) = out.rglob("*_results.json")
    results = json.loads(results_file.read_text())["results"]

    def samples(task):
        (f,) = out.rglob(f"*_samples_{task}.jsonl")
        return sorted((json.loads(l) for l in f.read_text().splitlines()), key=lambda s: s["doc_id"])

    # VQAv2-style: lmms-eval scored what net.answer says, and its score is VQAAccuracy's
    for task, docs in (("vqav2_local", vqa_docs), ("vqav2_local_matched", matched_docs)):
        preds = [s["filtered_resps"] if isinstance(s["filtered_resps"], str) else s["filtered_resps"][0]
                 for s in samples(task)]
        assert preds == expected
        ours = VQAAccuracy()
        ours.update(preds, [[a["answer"] for a in d["answers"]] for d in docs])
        assert results[task]["exact_match,none"] == pytest.approx(float(ours.compute()), abs=1e-6)
    # 0, 1, 2, 3, 10 and 5 of the ten references are the model's answer: at least
    # (0 + 0.3 + 0.6 + 0.9 + 1 + 1) / 6 (more if an original reference happens to match too)
    assert results["vqav2_local_matched"]["exact_match,none"] >= 3.8 / 6 - 1e-6

    # the world task: lmms-eval's VQAv2 rule on the world's answers is the suite's VQA accuracy
    wpreds = [s["filtered_resps"] for s in samples("vargpt_world_vqa")]
    assert wpreds == world_expected
    ours = VQAAccuracy()
    ours.update(wpreds, [s["record"]["answers"] for s in world])
    assert results["vargpt_world_vqa"]["exact_match,none"] == pytest.approx(float(ours.compute()), abs=1e-6)

    # POPE-style multiple choice: lmms-eval takes the choice with the lowest mean token loss
    pope = _docs("pope_local")
    pdir = FIXTURES / "lmms_tasks" / "pope_local"
    with torch.no_grad():
        acc = []
        for d in pope:
            im = _image(d, pdir)
            yes, no = loglikelihood(net, [im, im], [d["question"] + POST] * 2, [" yes", " no"], include_eos=True)
            acc.append(float(("yes" if yes.mean_nll <= no.mean_nll else "no") == d["answer"]))
    assert results["pope_local"]["acc,none"] == pytest.approx(sum(acc) / len(acc), abs=1e-6)
    assert len(samples("pope_local")) == len(pope)


def test_world_task_scores_with_the_vqav2_rule():
    """The world task's scorer on its ten (equal) answers: right 1, wrong 0, like VQAAccuracy."""
    import importlib.util as iu

    from modules.metrics import VQAAccuracy

    spec = iu.spec_from_file_location("world_utils", REPO_ROOT / "experiments/lmms_tasks/vargpt_world/utils.py")
    utils = iu.module_from_spec(spec)
    spec.loader.exec_module(utils)
    doc = {"json": {"id": "w0", "answers": ["green"] * 10,
                    "messages": [{"role": "user", "content": "<image>\nWhat colour is it? Answer with a single word."}]}}
    assert utils.world_doc_to_text(doc) == "What colour is it? Answer with a single word."
    for pred in ("green", "Green.", "red", ""):
        ours = VQAAccuracy()
        ours.update([pred], [doc["json"]["answers"]])
        assert utils.world_process_results(doc, [pred])["exact_match"] == pytest.approx(float(ours.compute()))
    assert utils.world_process_results(doc, ["green"])["exact_match"] == 1.0


def test_python_api_on_the_released_layout(tmp_path, monkeypatch):
    """The equivalent Python API (lmms_eval.evaluator.simple_evaluate, the model found through the
    entry point by name) on a released VARGPT-layout directory (the tiny official checkpoint
    fixture, through experiments.infer's `vargpt` loader), both request kinds."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    ckpt = require_fixture("vargpt_official")
    out = simple_evaluate(model="vargpt_suite", model_args=f"ckpt={ckpt},dtype=float32",
                          tasks=["vqav2_local", "pope_local"], batch_size=3,
                          task_manager=TaskManager(include_path=str(FIXTURES / "lmms_tasks")), log_samples=True)
    assert out is not None, "simple_evaluate returned nothing (see its log)"
    res = out["results"]
    assert 0.0 <= res["vqav2_local"]["exact_match,none"] <= 1.0 and 0.0 <= res["pope_local"]["acc,none"] <= 1.0
    assert len(out["samples"]["pope_local"]) == 6 and len(out["samples"]["vqav2_local"]) == 6

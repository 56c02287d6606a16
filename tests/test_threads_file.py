"""trainer.threads_file: a run takes up the thread count a scheduler writes while it trains."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from experiments.config import load_config
from modules.stages.callbacks import ThreadsFromFile


def test_thread_count_from_file_is_applied_when_it_changes(tmp_path, capsys):
    n0 = torch.get_num_threads()
    target = 1 if n0 != 1 else 2
    path = tmp_path / "threads"
    cb = ThreadsFromFile(path, every=10)
    logged = []
    trainer = SimpleNamespace(global_step=10, logger=SimpleNamespace(log_metrics=lambda m, step: logged.append((m, step))))
    try:
        cb.on_train_batch_end(trainer, None, None, None, 0)  # no file yet: nothing changes
        assert torch.get_num_threads() == n0
        path.write_text(f"{target}\n")
        trainer.global_step = 15  # between reads
        cb.on_train_batch_end(trainer, None, None, None, 0)
        assert torch.get_num_threads() == n0
        trainer.global_step = 20
        cb.on_train_batch_end(trainer, None, None, None, 0)
        assert torch.get_num_threads() == target
        assert logged == [({"trainer/num_threads": float(target)}, 20)]
        path.write_text("two")  # not a count: reported, ignored
        trainer.global_step = 30
        cb.on_train_batch_end(trainer, None, None, None, 0)
        assert torch.get_num_threads() == target
        out = capsys.readouterr().out
        assert "expected a thread count" in out and str(path) in out
    finally:
        torch.set_num_threads(n0)


def test_threads_file_does_not_change_the_config_hash():
    a = load_config("experiments/world/stage2.yaml", [])
    b = load_config("experiments/world/stage2.yaml", ["trainer.threads_file=runs/world/.stage2-threads"])
    assert b.cfg.trainer.threads_file == "runs/world/.stage2-threads"
    assert a.hash == b.hash

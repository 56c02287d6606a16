"""The metrics sync across processes: 2 gloo ranks, each updating half, equal the full set.

One spawn serves every metric (each child pays the torch + torchmetrics import, ~5 s). Plain
torch.multiprocessing spawn with a fresh port and a timeout, not Lightning DDP (which relaunches
pytest for rank 1).
"""
import json
import socket
import statistics

import pytest
import torch
import torch.multiprocessing as mp

from tests.test_metrics_generation import TinyWorldClassifier, blob_images, make_cfg
from tests.test_metrics_vqa import load_cases
from tests.test_metrics_world import PREDICTED, REQUESTED

WORLD_SIZE = 2
TIMEOUT_S = 120
N_REAL, N_FAKE = 64, 48


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, tmp: str, cases: list) -> None:
    import pathlib

    import torch.distributed as dist

    from modules.metrics import (
        ExactMatchAccuracy, VQAAccuracy, WorldAttributeAccuracy, build_gen_metrics,
    )

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        out = {}
        half = len(cases) // 2
        mine = cases[:half] if rank == 0 else cases[half:]
        vqa = VQAAccuracy()
        vqa.update([c["prediction"] for c in mine], [c["answers"] for c in mine])
        out["vqa"] = vqa.compute().item()  # compute() gathers score_sum / count over ranks

        em = ExactMatchAccuracy()
        em.update(["yes", "no"] if rank == 0 else ["2"], ["yes", "yes"] if rank == 0 else ["two"])
        out["exact_match"] = em.compute().item()

        world = WorldAttributeAccuracy()
        sl = slice(0, 1) if rank == 0 else slice(1, 4)  # uneven on purpose
        world.update(PREDICTED[sl], REQUESTED[sl])
        out["world"] = {k: v.item() for k, v in world.compute().items()}

        tmp_path = pathlib.Path(tmp)
        gm = build_gen_metrics(make_cfg(tmp_path, num_real_images=N_REAL), TinyWorldClassifier())
        reals_called = []

        def reals():
            reals_called.append(rank)
            return iter(blob_images(N_REAL, seed=1).split(16))

        gm.prepare_reals(reals)
        fakes = blob_images(N_FAKE, seed=7)
        gm.update(fakes[: N_FAKE // 2] if rank == 0 else fakes[N_FAKE // 2:])
        res = gm.compute()
        out["fid"] = res["fid"].item()
        out["is_mean"] = res["is_mean"].item()
        out["reals_called"] = reals_called
        (tmp_path / f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    cases = load_cases()
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, port, str(tmp), cases)) for r in range(WORLD_SIZE)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    alive = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    assert not alive, f"ranks still running after {TIMEOUT_S} s (pids {alive}); killed"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return tmp, cases, [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]


def test_vqa_and_exact_match_gather(two_rank_results):
    _, cases, results = two_rank_results
    expected = statistics.mean(c["accuracy"] for c in cases)
    for r in results:
        assert abs(r["vqa"] - expected) < 1e-12
        assert r["exact_match"] == pytest.approx(2 / 3)


def test_world_attribute_accuracy_gathers(two_rank_results):
    _, _, results = two_rank_results
    for r in results:
        assert r["world"]["n"] == 4
        assert r["world"]["all"] == pytest.approx(1 / 4)
        assert r["world"]["mean"] == pytest.approx(6 / 10)  # the single-process value (test_metrics_world)


def test_fid_is_gather_with_reals_counted_once(two_rank_results):
    tmp, _, results = two_rank_results
    from modules.metrics import build_gen_metrics

    assert results[0]["reals_called"] == [0] and results[1]["reals_called"] == []
    # Single process, fresh statistics (other cache dir), all fakes at once.
    ref = build_gen_metrics(
        make_cfg(tmp / "single", num_real_images=N_REAL), TinyWorldClassifier()
    )
    assert ref.prepare_reals(lambda: [blob_images(N_REAL, seed=1)]) is False
    ref.update(blob_images(N_FAKE, seed=7))
    full = ref.compute()
    for r in results:
        assert r["fid"] == pytest.approx(full["fid"].item(), rel=1e-4)
        assert r["is_mean"] == pytest.approx(full["is_mean"].item(), rel=1e-5)
    # The cache rank 0 wrote is the one a later single-process run picks up.
    again = build_gen_metrics(make_cfg(tmp, num_real_images=N_REAL), TinyWorldClassifier())
    assert again.prepare_reals(lambda: 1 / 0) is True

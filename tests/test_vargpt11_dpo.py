"""DPO on image bits (modules/dpo.py, stage v11_dpo): pairs in the shard format round-trip; the loss
and its gradient equal a direct computation on a tiny v1.1 model; at initialisation the loss is
log 2 with shared flips and not with the released (separate) draws; the config is validated; the
stage trains through experiments.run on pairs made from world shards."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from experiments.config import REPO_ROOT, ConfigError, load_config
from modules.dpo import DPOConfig, dpo_step, reference_tensors
from tests.test_vargpt11_release_stages import TINY
from tests.tiny import tiny_tokenizer_dir

BETA = 0.5


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # see tests/conftest.py
    yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from datamodules.pairs import PairCollator, pairs_from_generation, write_pairs
    from datamodules.schema import iter_tar
    from datamodules.stream import decode_sample, expand_shards
    from datamodules.world import generate_split
    from modules.dpo_stage import V11DPO

    root = tmp_path_factory.mktemp("v11dpo")
    generate_split(str(root / "world" / "train"), "train", {"gen": 4}, seed=0, size=32, shard_size=8)
    shards = expand_shards(str(root / "world" / "train" / "gen-*.tar"))
    write_pairs(str(root / "pairs"), pairs_from_generation(shards), source="test")
    samples = [decode_sample(r, "pairs", "dpo") for p in expand_shards(str(root / "pairs" / "dpo-*.tar")) for r in iter_tar(p)]
    tok = tiny_tokenizer_dir(root)
    cfg = load_config(REPO_ROOT / "experiments/v11/world_dpo.yaml", [f"model.tokenizer.path={tok}", *TINY]).cfg
    torch.manual_seed(0)
    module = V11DPO(cfg)
    batch = PairCollator(module.net.collator(cfg.data, train=True))(samples[:2])
    return root, tok, cfg, module, batch, samples, shards


def _cfg(**kw):
    return DPOConfig(**{"beta": BETA, **kw})


def test_pairs_round_trip_through_the_shard_format(setup):
    from datamodules.schema import iter_tar

    _, _, _, _, batch, samples, shards = setup
    raws = [r for p in shards for r in iter_tar(p)]
    targets = [r[[k for k in r if k.startswith("img") and k.endswith(".png")][-1]] for r in raws]
    assert len(samples) == 4
    for i, s in enumerate(samples):  # chosen: the sample's own target; rejected: the next sample's
        assert s["task"] == "dpo" and s["record"]["rejected"] == ["rej0.png"]
        assert s["images"][-1].tobytes() != s["rejected"][0].tobytes()
        assert s["record"]["rejected_from"] == raws[(i + 1) % 4]["__key__"]
    from PIL import Image
    import io

    assert samples[0]["rejected"][0].tobytes() == Image.open(io.BytesIO(targets[1])).tobytes()
    assert batch["rejected_images"].shape == batch["gen_images"].shape == (2, 3, 64, 64)
    assert not torch.equal(batch["rejected_images"], batch["gen_images"])


def test_a_sample_without_a_rejected_image_is_refused_by_key(setup):
    from datamodules.pairs import PairCollator

    _, _, cfg, module, _, samples, _ = setup
    bad = dict(samples[0], rejected=[])
    with pytest.raises(ValueError, match=repr(samples[0]["key"])):
        PairCollator(module.net.collator(cfg.data))([bad])


def test_at_initialisation_the_loss_is_log_2_and_the_released_flips_differ(setup):
    _, _, _, module, batch, _, _ = setup
    ref = module.reference.params()
    same = dpo_step(module.net, batch, ref, _cfg(), (1, 2))
    assert abs(same["loss"].item() - math.log(2)) < 1e-6 and same["margin"].abs().max().item() < 1e-4
    assert all(torch.equal(a, b) for a, b in zip(same["ref_flips"], same["policy_flips"]))
    rel = dpo_step(module.net, batch, ref, _cfg(flips="released"), (1, 2))
    assert not all(torch.equal(a, b) for a, b in zip(rel["ref_flips"], rel["policy_flips"]))
    assert abs(rel["loss"].item() - math.log(2)) > 1e-3  # the draw noise the release trains on
    # the reference draw is the seed's, whatever the mode; the released policy draws from its own seed
    assert all(torch.equal(a, b) for a, b in zip(rel["ref_flips"], same["ref_flips"]))
    again = dpo_step(module.net, batch, ref, _cfg(flips="released"), (1, 3))
    assert not all(torch.equal(a, b) for a, b in zip(rel["policy_flips"], again["policy_flips"]))


def _direct_logps(net, batch, rows, pixels, flips):
    """Sum of log p(label bit) over one image per row, by cross-entropy, from its own forward."""
    out = net.forward_train(batch["input_ids"][rows], batch["attention_mask"][rows], batch["labels"][rows],
                            None, None, pixels, train=True, cond_drop_B=torch.zeros(len(rows), dtype=torch.bool),
                            flipped=flips)
    lab = out["gen_state"]["labels"].long()
    ce = F.cross_entropy(out["image_logits"].float().reshape(-1, 2), lab.reshape(-1), reduction="none")
    return -ce.view(lab.shape[0], -1).sum(1)


def test_loss_and_gradient_equal_a_direct_computation(setup):
    _, _, _, module, batch, _, _ = setup
    policy = copy.deepcopy(module.net)
    ref = {k: v.clone() for k, v in module.reference.params().items()}
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # move the policy away from the reference
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    res = dpo_step(policy, batch, ref, _cfg(), (7, 8))
    res["loss"].backward()
    got = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    # direct: a separate reference model, chosen and rejected in their own forwards, the same flips
    direct = copy.deepcopy(policy)
    direct.zero_grad(set_to_none=True)
    reference = copy.deepcopy(module.net)
    N = batch["input_ids"].shape[0]
    rows = list(range(N))
    fl_c = [f[:N] for f in res["ref_flips"]]
    fl_r = [f[N:] for f in res["ref_flips"]]
    with torch.no_grad():
        rc = _direct_logps(reference, batch, rows, batch["gen_images"], fl_c)
        rr = _direct_logps(reference, batch, rows, batch["rejected_images"], fl_r)
    pc = _direct_logps(direct, batch, rows, batch["gen_images"], fl_c)
    pr = _direct_logps(direct, batch, rows, batch["rejected_images"], fl_r)
    loss = -F.logsigmoid(BETA * ((pc - rc) - (pr - rr))).mean()
    loss.backward()
    assert abs(loss.item() - math.log(2)) > 1e-3, "the policy should differ from the reference here"
    torch.testing.assert_close(res["loss"], loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res["ref_chosen"], rc, atol=1e-3, rtol=1e-5)
    want = {n: p.grad for n, p in direct.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and got
    assert all(n.startswith(("gen.",)) for n in got)  # dpo.trainable v11_stage0: the generation side
    for n in got:
        torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-3, msg=n)


def test_config_is_validated():
    assert DPOConfig().problems() == []
    keys = {k for k, _ in DPOConfig(beta=0.0, flips="x", reference="file", trainable="stage3").problems()}
    assert keys == {"dpo.beta", "dpo.flips", "dpo.trainable", "dpo.reference_path"}
    with pytest.raises(ConfigError, match="dpo.beta"):
        load_config(REPO_ROOT / "experiments/v11/world_dpo.yaml", ["dpo.beta=-1"])


def test_reference_from_a_file(setup, tmp_path):
    from modules.checkpoint import save_state_dict

    _, _, _, module, _, _, _ = setup
    path = tmp_path / "ref.safetensors"
    save_state_dict({k: v.clone() for k, v in module.net.state_dict().items()}, path)
    ref = reference_tensors(module.net, DPOConfig(reference="file", reference_path=str(path)))
    init = module.reference.params()
    assert ref.keys() == init.keys() and all(torch.equal(ref[k], init[k]) for k in ref)
    save_state_dict({"x": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="trainable parameters"):
        reference_tensors(module.net, DPOConfig(reference="file", reference_path=str(path)))


def test_dpo_trains_through_the_launcher(setup, tmp_path, tracking_uri):
    from experiments.run import main
    from modules.checkpoint import read_state_dict
    from modules.stages.v11_stages import RELEASE_STAGES

    root, tok, _, module, _, _, _ = setup
    out = tmp_path / "run"
    assert main([str(REPO_ROOT / "experiments/v11/world_dpo.yaml"), f"model.tokenizer.path={tok}",
                 f"data.root={root / 'pairs'}", f"output_dir={out}", f"logging.tracking_uri={tracking_uri}",
                 f"logging.artifact_root={tmp_path / 'art'}", "logging.enabled=false", "trainer.max_steps=2",
                 "data.batch_size=2", "trainer.num_threads=1", "checkpoint.at_end=false", "optim.lr=1e-2", *TINY]) == 0
    after = read_state_dict(out / "model.safetensors")
    before = module.reference.params()  # the same seed builds the same start (experiments.run seeds 0)
    init = dict(module.net.named_parameters())
    assert all(torch.equal(before[n], init[n]) for n in before)
    changed = {n for n, p in init.items() if not torch.equal(p.detach(), after[n])}
    assert changed and all(n.startswith(RELEASE_STAGES["v11_stage0"]) for n in changed), sorted(changed)[:5]

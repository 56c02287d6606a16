"""Sharded training (``trainer.strategy: fsdp``): PyTorch's per-parameter sharding (FSDP2,
``torch.distributed.fsdp.fully_shard``) applied in the stage's ``configure_model``, trained by a
Lightning ``ModelParallelStrategy`` (data parallel over every rank, no tensor parallelism).

The same code runs on CUDA ranks (NCCL) and on CPU ranks (gloo): the device mesh is built on the
accelerator's device type, so `tests/test_sharded.py` runs the recipe's path on 2 CPU ranks.

What ``trainer.fsdp`` selects (experiments/config.py, FSDPConfig):
  wrap                      layer groups (modules/parallel.py) that become their own sharding
                            unit: their parameters are gathered just before their forward and
                            freed after it; everything else (embeddings, projectors, norms, the
                            VAR's front end) is one unit at the root, gathered for the whole step
  activation_checkpointing  layer groups whose forward is recomputed in backward (activations of
                            only the block inputs are kept, (B, T, D) per block)
  mixed_precision           "" follows trainer.precision; bf16 (or bf16-mixed): the layer units'
                            parameters are gathered and computed in bf16, gradients reduced in fp32
                            into the fp32 sharded parameters (the optimizer's master weights); the
                            root unit keeps its parameters' dtype (autocast runs its matmuls in bf16)
  sharding_strategy         FULL_SHARD: units free their gathered parameters after forward and
                            gather again in backward; SHARD_GRAD_OP: they keep them until backward
  state_dict_type           sharded: each rank writes its shards (torch.distributed.checkpoint
                            directory); full: rank 0 writes one file of gathered tensors
  cpu_offload               sharded parameters, gradients and optimizer state live in CPU memory

The VQVAE is kept whole (not sharded): it is frozen, used by every sample's target encoding outside
any unit's forward, and small next to the LLM. Each rank holds the same copy (built from the same
config and weights). Frozen parameters are sharded like trainable ones (FSDP2 reduces gradients of
the trainable ones only), so a frozen 7B LLM costs each of N ranks 1/N of its bytes.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

import lightning as L
import torch
import torch.nn as nn
from lightning.pytorch.strategies import ModelParallelStrategy

from modules.parallel import layer_classes, sharding_units

# The part of the composed model that stays whole on every rank (see the module docstring).
KEPT_WHOLE = ("vqvae",)


class ShardedStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` with every rank in one data-parallel (sharding) dimension, the
    ``trainer.fsdp`` section attached for the stage's ``configure_model`` (``shard_model``), and a
    resume that reads only what the stage saved: checkpoints hold the trainable parameters (the
    frozen ones are rebuilt from the config and checked by hash), so loading the frozen keys from a
    sharded checkpoint directory would fail on keys it never had."""

    def __init__(self, fsdp: Any, precision: str, world_size: int):
        super().__init__(data_parallel_size=world_size, tensor_parallel_size=1,
                         save_distributed_checkpoint=fsdp.state_dict_type == "sharded")
        self.fsdp = fsdp
        self.precision_name = precision

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> Dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if not path.is_dir():  # state_dict_type full: one file of gathered tensors
            # Lightning takes the tensors out of what it returns; the stage checks their keys
            keys = list(torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)["state_dict"])
            meta = super().load_checkpoint(path, weights_only=weights_only)
            meta["state_dict"] = dict.fromkeys(keys)
            return meta
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict, set_model_state_dict,
                                                             set_optimizer_state_dict)

        module = self.lightning_module
        frozen = module.frozen_keys()  # not in the checkpoint: rebuilt from the config, checked by hash
        # in place: the values are this rank's DTensor shards, filled from the directory
        model_sd = {k: v for k, v in get_model_state_dict(self.model).items() if k not in frozen}
        state: Dict[str, Any] = {"state_dict": model_sd}
        for i, opt in enumerate(self.optimizers):
            state[f"optimizer_{i}"] = get_optimizer_state_dict(self.model, opt)
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(self.model, model_sd, options=StateDictOptions(strict=False))
        for i, opt in enumerate(self.optimizers):
            set_optimizer_state_dict(self.model, opt, optim_state_dict=state[f"optimizer_{i}"])
        # everything that is not a tensor shard: loops, schedulers, callbacks, the stage's run state
        meta = torch.load(path / "meta.pt", weights_only=weights_only)
        meta["state_dict"] = model_sd  # what the stage's on_load_checkpoint checks the keys of
        return meta


def mixed_precision_policy(fsdp: Any, precision: str) -> Any:
    """The layer units' policy: bf16 gathers and compute over fp32 master weights with fp32
    gradient reduction (bf16-mixed, or trainer.fsdp.mixed_precision bf16), else no casting
    (parameters gathered and computed in their own dtype)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if fsdp.mixed_precision == "bf16" or (fsdp.mixed_precision == "" and precision == "bf16-mixed"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def recompute_in_backward(module: nn.Module) -> None:
    """Activation checkpointing of one block: its forward keeps only its inputs and reruns in
    backward. Set on the instance's ``forward`` (not a wrapper module), so parameter names and
    state-dict keys stay those of the unwrapped model; the sharding unit's hooks run around it
    (``__call__``), so the gathered parameters are there when backward reruns it."""
    inner = module.forward
    module.forward_runs = 0  # counted, so the sharding report can show the rerun in backward

    def run(*args: Any, **kwargs: Any) -> Any:
        module.forward_runs += 1
        return inner(*args, **kwargs)

    def forward(*args: Any, **kwargs: Any) -> Any:
        # a Hugging Face layer with gradient checkpointing on (model.llm.gradient_checkpointing)
        # already reruns itself in training mode: once is enough
        hf = getattr(module, "gradient_checkpointing", False) and module.training
        if torch.is_grad_enabled() and not hf:
            return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)
        return run(*args, **kwargs)

    module.forward = forward  # type: ignore[method-assign]


def shard_model(net: nn.Module, mesh: Any, fsdp: Any, precision: str) -> Dict[str, Any]:
    """Apply activation checkpointing and ``fully_shard`` to ``net`` in place (layer units first,
    then the root for the rest; the parts in KEPT_WHOLE stay plain tensors). Returns what was done,
    for the run's sharding report."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    units, recompute = tuple(layer_classes(fsdp.wrap)), tuple(layer_classes(fsdp.activation_checkpointing))
    mp = mixed_precision_policy(fsdp, precision)
    kw = dict(mesh=mesh, mp_policy=mp, offload_policy=CPUOffloadPolicy() if fsdp.cpu_offload else OffloadPolicy(),
              reshard_after_forward=fsdp.sharding_strategy == "FULL_SHARD")
    whole = [getattr(net, n) for n in KEPT_WHOLE if isinstance(getattr(net, n, None), nn.Module)]
    kept = {p for m in whole for p in m.parameters()}
    wrapped: List[str] = []
    recomputed: List[str] = []
    for name, m in list(net.named_modules()):
        if not name or name.split(".")[0] in KEPT_WHOLE:
            continue
        if recompute and isinstance(m, recompute):
            recompute_in_backward(m)
            recomputed.append(name)
        if units and isinstance(m, units):
            for part in sharding_units(m):
                fully_shard(part, **kw)
                wrapped.append(next(n for n, x in m.named_modules(prefix=name) if x is part))
    if fsdp.activation_checkpointing and not recomputed:
        raise ValueError(f"trainer.fsdp.activation_checkpointing={list(fsdp.activation_checkpointing)} matches no "
                         f"layer of this model; name a group it has ({', '.join(fsdp.wrap) or 'none wrapped'}) or []")
    # The root unit (embeddings, logit heads, projectors, norms, the VAR's front end and
    # cross-attention: a few % of the parameters) computes in the parameters' own dtype: the model
    # feeds some of these parts fp32 inputs on purpose (logit heads, the prompt context), which a
    # bf16 LayerNorm weight would refuse, and bf16-mixed autocast runs their matmuls in bf16 anyway.
    fully_shard(net, **{**kw, "mp_policy": MixedPrecisionPolicy(reduce_dtype=mp.reduce_dtype)}, ignored_params=kept)
    if hasattr(net, "run_every_part"):  # the same units on every rank, whatever a rank's batch holds
        net.run_every_part = True
    return {"units": wrapped, "recomputed": recomputed, "kept_whole": [n for n in KEPT_WHOLE if hasattr(net, n)],
            "param_dtype": str(mp.param_dtype).replace("torch.", "") if mp.param_dtype else "",  # the layer units'
            "root_param_dtype": "",  # the root unit: the parameters' own
            "reduce_dtype": str(mp.reduce_dtype).replace("torch.", "") if mp.reduce_dtype else "",
            "reshard_after_forward": kw["reshard_after_forward"], "cpu_offload": bool(fsdp.cpu_offload),
            "mesh": {"device_type": mesh.device_type, "size": mesh.size()}}


def full_state_dict(net: nn.Module) -> Dict[str, torch.Tensor]:
    """The whole ``net`` gathered onto rank 0's CPU (a collective: every rank calls it; the other
    ranks get {}). Sharded parameters come back at their full shapes, the kept-whole ones as they are."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def is_sharded(trainer: Any) -> bool:
    return isinstance(getattr(trainer, "strategy", None), ShardedStrategy)


# ------------------------------------------------------------------------------------------
# the per-rank report: what each rank holds, in what dtype, and what a step did
# ------------------------------------------------------------------------------------------


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _sha(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()


def state_bytes(net: nn.Module, optimizers: List[Any]) -> Dict[str, int]:
    """Bytes this rank holds of the parameters (its shards, plus the kept-whole parts, counted
    apart as kept_whole_bytes) and of the optimizer state (AdamW: step, exp_avg, exp_avg_sq per
    trainable shard): the sizes of the tensors themselves, so the halving at 2 ranks is read off
    the state, not off a timing."""
    params = kept = 0
    for name, p in net.named_parameters():
        n = _local(p).numel() * p.element_size()
        params += n
        kept += n if name.split(".")[0] in KEPT_WHOLE else 0
    opt = 0
    for o in optimizers:
        for st in o.state.values():
            opt += sum(_local(v).numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
    return {"param_bytes": int(params), "optimizer_bytes": int(opt), "total_bytes": int(params + opt),
            "kept_whole_bytes": int(kept), "sharded_bytes": int(params + opt - kept)}


def planned_bytes(net: nn.Module, world_size: int, rank: int = 0, master_dtype: Optional[torch.dtype] = None) -> Dict[str, int]:
    """What ``state_bytes`` will measure on ``rank`` of ``world_size`` after a sharded step, from
    the parameters' shapes alone (a meta-device model will do): each parameter's rows
    [rank*ceil(n/R), (rank+1)*ceil(n/R)) of its first dimension n (the kept-whole parts in full), in
    ``master_dtype`` (None: the parameters' own); AdamW's two moments of the trainable rows in the
    same dtype, plus its step counter (one fp32 scalar per trainable parameter, on every rank)."""
    params = kept = opt = 0
    for name, p in net.named_parameters():
        size = torch.finfo(master_dtype).bits // 8 if master_dtype is not None and p.is_floating_point() else p.element_size()
        whole = name.split(".")[0] in KEPT_WHOLE
        if whole or p.dim() == 0:
            local = p.numel()
        else:
            n, chunk = p.shape[0], math.ceil(p.shape[0] / world_size)
            local = max(0, min(n, (rank + 1) * chunk) - rank * chunk) * (p.numel() // max(n, 1))
        params += local * size
        kept += local * size if whole else 0
        if p.requires_grad:
            opt += 2 * local * size + 4
    return {"param_bytes": params, "optimizer_bytes": opt, "total_bytes": params + opt, "kept_whole_bytes": kept,
            "sharded_bytes": params + opt - kept}


class ShardingReport(L.Callback):
    """``trainer.fsdp.report``: writes ``<output_dir>/sharding.rank<r>.json`` at the end of fit:
    each parameter's global and local shape, dtype and the sha256 of the local shard; the bytes of
    parameters and optimizer state this rank holds; the loss of every step; the dtype a wrapped
    unit's Linear weight had during forward (bf16 under mixed precision, while the stored shard
    stays fp32); how often each recomputed block ran its forward per step (2: the forward and the
    rerun in backward; 1 where no gradient flows through it, e.g. a frozen LLM run forward only). Written by any strategy (one process:
    local = global), so one- and multi-rank runs compare."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.losses: List[float] = []
        self.compute_dtype: Optional[str] = None
        self.forward_calls: Dict[str, List[int]] = {}
        self._blocks: Dict[str, nn.Module] = {}
        self._seen: Dict[str, int] = {}
        self._hooks: List[Any] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        info = getattr(pl_module, "shard_info", None) or {}
        net = pl_module.net
        for name in info.get("recomputed", []):
            self._blocks[name] = net.get_submodule(name)
            self.forward_calls[name] = []
        names = info.get("units") or info.get("recomputed") or []
        if names:
            block = net.get_submodule(names[0])
            lin = next((m for m in block.modules() if isinstance(m, nn.Linear)), None)
            if lin is not None:
                self._hooks.append(lin.register_forward_pre_hook(self._dtype))

    def _dtype(self, module: nn.Module, args: Any) -> None:
        if self.compute_dtype is None:
            self.compute_dtype = str(module.weight.dtype).replace("torch.", "")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        for name, block in self._blocks.items():  # this step's runs only (not validation's)
            self._seen[name] = block.forward_runs

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach().float()) if torch.is_tensor(loss) else math.nan)
        for name, block in self._blocks.items():  # 2 when recomputed; 1 when no backward reached it
            self.forward_calls[name].append(block.forward_runs - self._seen[name])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for h in self._hooks:
            h.remove()
        net = pl_module.net
        params = {}
        for name, p in net.named_parameters():
            loc = _local(p)
            params[name] = {"shape": list(p.shape), "local_shape": list(loc.shape), "dtype": str(p.dtype).replace("torch.", ""),
                            "sharded": hasattr(p, "to_local"), "trainable": p.requires_grad, "sha256": _sha(loc)}
        doc = {"rank": trainer.global_rank, "world_size": trainer.world_size, "strategy": type(trainer.strategy).__name__,
               "precision": trainer.precision, "sharding": getattr(pl_module, "shard_info", None) or {},
               "memory": state_bytes(net, [o for o in trainer.optimizers]), "losses": self.losses,
               "compute_dtype": self.compute_dtype, "forward_calls_per_step": self.forward_calls,
               "steps": trainer.global_step, "params": params}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"sharding.rank{trainer.global_rank}.json").write_text(json.dumps(doc, indent=1) + "\n")

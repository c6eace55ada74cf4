"""How the objective is spread over ranks: DDP (a full copy per rank) or FSDP2 (PyTorch's ``fully_shard``).

FSDP2 shards every transformer block and DINO head (student and EMA teacher alike) as its own unit and the rest
of the objective as the root unit, so a rank holds 1/world of the weights, gradients and AdamW state; a block's
full weights exist only while it runs. Parameters become ``DTensor``s: the optimiser and the EMA update work on
the local shards, which is the same arithmetic as on full tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.distributed as dist
from timm.models.vision_transformer import Block
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from foundation.models.heads import DINOHead

log = logging.getLogger(__name__)

PARALLEL_MODES = ("ddp", "fsdp")


def transformer_blocks(objective: nn.Module) -> list[nn.Module]:
    """Every transformer block of the objective (student, teacher, MAE decoder)."""
    return [m for m in objective.modules() if isinstance(m, Block)]


def shard_units(objective: nn.Module) -> list[nn.Module]:
    """The modules that become their own FSDP unit: transformer blocks (backbone and MAE decoder) and DINO
    heads, innermost first. Each is called as a module, so FSDP's hooks gather it just before it runs."""
    return [m for m in objective.modules() if isinstance(m, Block | DINOHead)]


def can_shard() -> bool:
    """FSDP needs a process group; one process started without torchrun has none."""
    return dist.is_available() and dist.is_initialized()


def apply_fsdp(objective: nn.Module, device: torch.device, amp_dtype: torch.dtype | None) -> nn.Module:
    """``fully_shard`` each unit, then the objective (the root unit: embeddings, norms, loss buffers).

    With ``amp_dtype`` (bf16 on GPU) the gathered weights and the compute are in that dtype while the shards,
    the optimiser and the gradient reduction stay float32; without it everything is float32 (CPU, gloo).
    """
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (
        MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32)
        if amp_dtype is not None
        else MixedPrecisionPolicy()
    )
    for unit in shard_units(objective):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(objective, mesh=mesh, mp_policy=policy)
    return objective


def wrap(
    objective: nn.Module, parallel: str, device: torch.device, amp_dtype: torch.dtype | None
) -> nn.Module:
    """The module the loop calls: FSDP2-sharded ``objective`` itself, a DDP wrapper, or ``objective`` alone.

    ``fsdp`` in a single process without a process group shards nothing: it trains exactly as one DDP process
    (and still writes sharded checkpoints); under torchrun with one process it shards over a 1-rank mesh.
    """
    if parallel == "fsdp":
        sharded = can_shard()
        if not sharded or dist.get_world_size() == 1:
            log.warning(
                "train.parallel=fsdp with a world size of 1: DDP-equivalent, each rank would hold everything "
                "anyway (%s; checkpoints are still sharded DCP folders)",
                "FSDP over a 1-rank mesh" if sharded else "not wrapped: no process group",
            )
        return apply_fsdp(objective, device, amp_dtype) if sharded else objective
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        ids = [device.index] if device.type == "cuda" else None
        return DDP(objective, device_ids=ids, broadcast_buffers=False)
    return objective


def is_sharded(module: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (the tensor itself otherwise)."""
    return t.to_local() if isinstance(t, DTensor) else t


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> float:
    """``clip_grad_norm_`` on the global norm also when the gradients are shards (the norm is reduced first)."""
    params = [p for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params])
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


def full_state_dict(module: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The module's full state on CPU, gathered one tensor at a time (a collective: every rank calls it). With
    ``keep=False`` this rank only takes part and returns nothing (a node's ranks need not each hold a copy)."""
    out = {}
    for key, value in module.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        if keep:
            out[key] = value.detach().to("cpu", copy=True)
    return out

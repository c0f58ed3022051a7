"""Scale-out pieces, each applied to a plain :class:`~minitrain.model.Baichuan2` in place:

- :func:`init_distributed` — ``torchrun`` sets RANK/WORLD_SIZE/LOCAL_RANK; NCCL on GPU, gloo on CPU.
- :func:`apply_activation_checkpointing` — ``torch.utils.checkpoint`` (non-reentrant) around every
  decoder layer ("full"), every ``every``-th one ("selective", torchtitan's layer-level selective AC)
  or every layer with an op-level policy ("op", torchtitan's op-level selective AC: the outputs of the
  matmuls and of attention are saved, everything else — RMSNorm, split_qkv_rope, SwiGLU, casts — is
  recomputed in backward, so only memory-bound work is redone). The layer's ``forward`` is replaced
  on the instance, so parameter names (and checkpoints) do not change.
- :func:`apply_compile` — ``torch.compile`` of each decoder layer (``nn.Module.compile``: in place);
  ``fullgraph=True`` makes a graph break an error (dense batches: every op of a layer traces).
- :func:`apply_fsdp` — FSDP2: ``fully_shard`` on every decoder layer, then on the root (embedding,
  final norm, head), with a :class:`MixedPrecisionPolicy` (bf16 parameters for compute, fp32 gradient
  reduction; the sharded fp32 parameters are the master weights, so the optimizer state is fp32).

Order (as torchtitan): checkpointing, then compile, then FSDP — FSDP's unshard hooks run around the
checkpointed layer call, so the recomputation in backward sees gathered parameters.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["AC_MODES", "init_distributed", "apply_activation_checkpointing", "apply_compile", "apply_fsdp", "cast_embedding_output",
           "is_main", "shutdown_distributed", "finish", "barrier", "all_reduce", "world"]


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def init_distributed(device: str) -> tuple[int, int, torch.device]:
    """Join the process group that torchrun describes (no-op when WORLD_SIZE is 1 or unset)."""
    n = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local if n > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if n > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    rank, n = world()
    return rank, n, dev


def shutdown_distributed(sync: bool = True) -> None:
    """Leave the process group (torchrun runs). ``sync`` waits for the other ranks first (skip it on an
    error path: they may never arrive)."""
    if dist.is_available() and dist.is_initialized():
        if sync:
            dist.barrier()
        dist.destroy_process_group()


def finish(code: int, sync: bool = True) -> int:
    """Leave the process group (see :func:`shutdown_distributed`) and return ``code``; a torchrun worker
    instead ends the process with ``code`` at once, without interpreter finalization.

    After the last collective returns, a gloo worker thread can still hold the last reference to a
    finished collective (a barrier keeps the collectives before it alive) and drop it a moment later;
    freeing its tensors takes the GIL, and a thread that takes the GIL during finalization is unwound
    through a noexcept destructor: SIGABRT, "terminate called without an active exception", after a
    run that succeeded (seen in about 1 of 30 two-rank runs on a loaded machine; core dump:
    ``runLoop -> ~AsyncBarrierWork -> ~AsyncAllgatherCoalescedWork -> decref_pyobject -> take_gil ->
    pthread_exit``). Everything the trainer writes is closed and synced before this is called."""
    distributed = world()[1] > 1
    shutdown_distributed(sync)
    if not distributed:
        return code
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if world()[1] > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


AC_MODES = ("none", "full", "selective", "op")

# Ops whose outputs the "op" policy saves (by schema name, overload ignored): the GEMMs and attention
# (compute-bound, expensive to redo); every other op of the layer is recomputed.
SAVED_OPS = frozenset({
    "aten::mm", "aten::addmm", "aten::bmm", "aten::linear",
    "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention", "aten::_flash_attention_forward",
    "baichuan::attention_fwd", "baichuan_triton::attention_fwd",
})


def _op_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    name = op.name().split(".")[0] if hasattr(op, "name") else str(op)
    return CheckpointPolicy.MUST_SAVE if name in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _op_context():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_op_policy)


def _checkpointed_forward(layer: nn.Module, *args, **kwargs):
    return checkpoint(type(layer).forward, layer, *args, use_reentrant=False, **kwargs)


def _op_checkpointed_forward(layer: nn.Module, *args, **kwargs):
    return checkpoint(type(layer).forward, layer, *args, use_reentrant=False, context_fn=_op_context, **kwargs)


def apply_activation_checkpointing(model: nn.Module, mode: str = "full", every: int = 2) -> int:
    """Recompute (parts of) decoder layers in backward; returns how many layers were wrapped."""
    if mode == "none":
        return 0
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing mode must be {'|'.join(AC_MODES)}, got {mode!r}")
    if mode == "selective" and (not isinstance(every, int) or every < 1):
        raise ValueError(f"ac_every must be a positive int, got {every!r}")
    wrapper = _op_checkpointed_forward if mode == "op" else _checkpointed_forward
    n = 0
    for i, layer in enumerate(model.model.layers):
        if mode != "selective" or i % every == 0:
            layer.forward = functools.partial(wrapper, layer)
            n += 1
    return n


def cast_embedding_output(model: nn.Module, dtype: torch.dtype) -> None:
    """For autocast: the embedding lookup is not autocast, so its fp32 output would make the residual
    stream fp32 while the layers return ``dtype``; cast it (as FSDP's bf16 parameters would)."""
    model.model.embed_tokens.register_forward_hook(lambda _m, _i, out: out.to(dtype))


def apply_compile(model: nn.Module, fullgraph: bool = False) -> None:
    """``torch.compile`` each decoder layer in place (after activation checkpointing, before FSDP).
    ``fullgraph=True`` for dense batches: a graph break raises instead of splitting the layer
    (packed-sequence attention reads ``cu_seqlens`` on the host and would break)."""
    for layer in model.model.layers:
        layer.compile(fullgraph=fullgraph)


def apply_fsdp(model: nn.Module, device: torch.device, param_dtype: Optional[torch.dtype] = None,
               reduce_dtype: Optional[torch.dtype] = torch.float32) -> nn.Module:
    """Shard every decoder layer and the root over a 1-D mesh of all ranks (ZeRO-3 style)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # the layers return views (e.g. the embedding as the first residual) that nothing modifies in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (world()[1],))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    layers = list(model.model.layers)
    for i, layer in enumerate(layers):
        # the last layer's parameters are needed again at once in backward: keep them gathered
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model

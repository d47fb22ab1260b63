"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for a quantized student.

Lightning's `trainer=fsdp` (FSDPStrategy, FSDP1) flattens parameters and takes qgplm's students
as they are. FSDP2 shards every parameter on dim 0 and refuses scalar parameters, and QuantGPT's
per-tensor gamma is one (shape ()). `fully_shard_quantized` therefore shards the weights and
keeps the quantizer scales replicated (`ignored_params`: a few floats per layer); FSDP does not
reduce their gradients, so `sync_scale_grads` averages them across ranks after backward (call it
before the optimizer step). Quantize and initialise the scales *before* sharding: a scale
initialised from a shard would see a slice of the weight (tests/test_fsdp.py).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.distributed as dist
from torch import nn

from qgplm.quant import scale_parameters
from qgplm.quant.quantizers import WeightQuantizer


def fully_shard_quantized(model: nn.Module, blocks: Iterable[nn.Module] = (), **kwargs) -> nn.Module:
    """fully_shard each of `blocks` (e.g. the transformer layers), then `model`, with every
    quantizer scale left unsharded. Refuses a model whose quantizers were never initialised."""
    from torch.distributed.fsdp import fully_shard

    quantizers = [m for m in model.modules() if isinstance(m, WeightQuantizer)]
    missing = [q for q in quantizers if not bool(q.initialized)]
    if missing:
        raise RuntimeError(f"{len(missing)} of {len(quantizers)} weight quantizers are not initialised: call "
                           f"qgplm.quant.initialize_quantizers(model) before sharding (scales must see full weights)")
    ignored = set(scale_parameters(model))
    for block in blocks:
        fully_shard(block, ignored_params=ignored, **kwargs)
    fully_shard(model, ignored_params=ignored, **kwargs)
    return model


def sync_scale_grads(model: nn.Module) -> None:
    """Average the replicated scales' gradients over the ranks (what FSDP does for the sharded
    weights by reduce-scatter)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for p in scale_parameters(model):
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)

"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for a quantized student: `trainer=fsdp2`.

Two FSDP paths exist:
- `trainer=fsdp2` / `trainer=fsdp2_sim` (Lightning's ModelParallelStrategy): the LightningModule's
  `configure_model` (qgplm.train.module.LMModule) shards the trained model with `fully_shard_quantized`
  per transformer block (`transformer_blocks`), over the strategy's device mesh (`shard_mesh`).
  It runs on CPU processes with gloo (`trainer=fsdp2_sim`, tests/test_fsdp.py) as on GPUs.
- `trainer=fsdp` (Lightning's FSDPStrategy, FSDP1, flat parameters): GPUs only. Lightning's
  accelerator connector refuses it with accelerator=cpu, and torch itself ("FSDP needs a non-CPU
  accelerator device") refuses FSDP1 on CPU, so the CPU suite only composes its config.

FSDP2 shards every parameter on dim 0 and refuses scalar parameters, and QuantGPT's per-tensor
gamma is one (shape ()). `fully_shard_quantized` therefore shards the weights and keeps the
quantizer scales replicated (`ignored_params`: a few floats per layer); FSDP does not reduce their
gradients, so `sync_replicated_grads` / `sync_scale_grads` average them across ranks after backward
(before gradient clipping and the optimizer step), and `clip_grad_norm_` clips a mix of sharded
(DTensor) and replicated gradients by their global norm. Quantize and initialise the scales
*before* sharding: a scale initialised from a shard would see a slice of the weight
(ScaleWarmupCallback.setup runs before configure_model in Lightning's fit; `fully_shard_quantized`
refuses uninitialised quantizers).

After training, `meta_template` (taken before sharding) and `gather_full_model` give every rank
an ordinary, unsharded copy of the model (export, saving, generation, sizes run on it).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

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


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer layers of a HF model, found by structure rather than by name: the elements
    of every outermost nn.ModuleList whose elements all have one type and hold parameters
    (GPT-2: transformer.h; BART: model.encoder.layers and model.decoder.layers)."""
    lists: list[tuple[str, nn.ModuleList]] = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0:
            continue
        if len({type(b) for b in m}) != 1 or not any(True for _ in m.parameters()):
            continue
        if any(name.startswith(f"{outer}.") for outer, _ in lists):
            continue  # a list inside a block (named_modules walks parents first)
        lists.append((name, m))
    return [b for _, m in lists for b in m]


def unsharded(t: Tensor) -> Tensor:
    """The whole tensor of a DTensor shard (trainer=fsdp2: collective, every rank must call it);
    any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def shard_mesh(device_mesh: Any) -> Any:
    """The mesh to fully_shard over, from ModelParallelStrategy's 2-D ("data_parallel",
    "tensor_parallel") mesh (qgplm does no tensor parallelism): the dimension of size > 1 when
    only one is (one node with data_parallel_size=1, the "auto" default; or
    data_parallel_size=<world>, tensor_parallel_size=1: full sharding over every rank); both
    (several nodes with "auto"): the 2-D mesh, i.e. HSDP, replicated across "data_parallel"
    (nodes) and sharded within "tensor_parallel" (a node's devices)."""
    dp, tp = device_mesh["data_parallel"], device_mesh["tensor_parallel"]
    if tp.size() == 1:
        return dp
    if dp.size() == 1:
        return tp
    return device_mesh


def _replicated_grads(params: Iterable[nn.Parameter]) -> list[Tensor]:
    from torch.distributed.tensor import DTensor

    seen: set[int] = set()
    grads = []
    for p in params:
        if id(p) in seen or p.grad is None or isinstance(p, DTensor) or isinstance(p.grad, DTensor):
            continue
        seen.add(id(p))
        grads.append(p.grad)
    return grads


def sync_replicated_grads(params: Iterable[nn.Parameter]) -> int:
    """Average the gradients of the replicated (non-DTensor) parameters among `params` over the
    ranks, what FSDP's reduce-scatter does for the sharded ones: one all-reduce per dtype and
    device (flattened). Returns how many gradients were averaged. Every rank must call it with
    the same parameters having gradients."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = _replicated_grads(params)
    world = dist.get_world_size()
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    for group in groups.values():
        flat = _flatten_dense_tensors(group)
        dist.all_reduce(flat)
        flat.div_(world)
        for g, synced in zip(group, _unflatten_dense_tensors(flat, group), strict=True):
            g.copy_(synced)
    return len(grads)


def sync_scale_grads(model: nn.Module) -> None:
    """Average the replicated scales' gradients over the ranks (what FSDP does for the sharded
    weights by reduce-scatter)."""
    sync_replicated_grads(scale_parameters(model))


@torch.no_grad()
def clip_grad_norm_(params: Iterable[nn.Parameter], max_norm: float) -> Tensor:
    """torch.nn.utils.clip_grad_norm_ (L2) for a mix of sharded (DTensor) and replicated gradients,
    which torch's own refuses to stack: the sharded part's norm is reduced over its mesh, the
    replicated part (already averaged, the same on every rank) counted once. Returns the total norm."""
    from torch.distributed.tensor import DTensor

    grads = list({id(p): p.grad for p in params if p.grad is not None}.values())
    sharded = [g for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    total = torch.zeros((), dtype=torch.float32)
    if sharded:
        norm = torch.nn.utils.get_total_norm(sharded, 2.0)
        total = total.to(norm.device) + unsharded(norm).float() ** 2
    if plain:
        norm = torch.nn.utils.get_total_norm(plain, 2.0)
        total = total.to(norm.device) + norm.float() ** 2
    total = total.sqrt()
    coef = min(1.0, float(max_norm) / (float(total) + 1e-6))
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total


def meta_template(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters are on the meta device (no memory) and whose buffers
    are real copies (HF models keep non-persistent buffers, e.g. causal masks, that no state dict
    restores); parameter sharing (tied embeddings, shared quantizers) is kept. Take it before
    sharding; `gather_full_model` fills it in."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        if id(p) not in memo:
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


def gather_full_model(sharded: nn.Module, template: nn.Module, device: torch.device | str) -> nn.Module:
    """An ordinary (unsharded) model equal to `sharded`, on every rank (collective: all ranks call
    it): its full state dict gathered into `template` (from `meta_template`, taken before sharding)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    made: dict[int, nn.Parameter] = {}
    for m in template.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_meta:
                if id(p) not in made:
                    made[id(p)] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
                m._parameters[name] = made[id(p)]
    template.to(device)
    missing, unexpected = template.load_state_dict(full, strict=False)
    tensors = template.state_dict(keep_vars=True)
    loaded = {id(t) for k, t in tensors.items() if k in full}
    untied = [k for k in missing if id(tensors[k]) not in loaded]
    if unexpected or untied:
        raise RuntimeError(f"gathering the sharded model: unexpected keys {unexpected}, missing keys {untied}")
    return template.train(sharded.training)

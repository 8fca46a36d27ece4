"""Multi-GPU training with PyTorch FSDP2: quantized bases sharded and frozen, adapters sharded and trained.

quantplug has no sharding of its own. :func:`shard` is the FSDP2 recipe that
accelerate and torchtune apply, written once for quantized models:
``torch.distributed.fsdp.fully_shard`` on every transformer block, then on
the root, with only the adapters trainable. Before it touches the model it
checks that every quantized layer's backend declares ``shardable`` (and that
the layer is not a variant the backend lists under ``"shardable:<variant>"``
in its limits), and names the layer, backend and reason when one does not.

Every rank runs the same code::

    import torch.distributed as dist
    import quantplug as qp

    dist.init_process_group("nccl")                 # torchrun sets rank and world size
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    model = ...                                     # the same quantized model on every rank
    qp.attach(model, qp.LoraConfig(r=16, target_modules="all-linear"))
    qp.prepare_for_training(model)
    qp.distributed.shard(model)                     # blocks + root, adapters trainable
    optimizer = torch.optim.AdamW(qp.trainable_parameters(model), lr=1e-4)
    for batch in loader:                            # each rank: its own part of the global batch
        model(**batch).loss.backward()              # FSDP2 averages gradients over ranks
        optimizer.step(); optimizer.zero_grad()
    qp.save_adapter(model, "out")                   # every rank calls it; rank 0 writes

Saving gathers each sharded adapter tensor (``DTensor.full_tensor()``, a
collective) and writes the same PEFT-format files as single-device training.
Merging needs whole quantized weights: load the saved adapter into an
unsharded model (one process, or rank 0) and merge there, see
``docs/distributed.md``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn

from quantplug._lora import LoraLayer
from quantplug._model import detect, lora_layers, trainable_parameters
from quantplug._registry import hook, load_plugins

__all__ = ["ShardingError", "check_shardable", "find_blocks", "full_tensor", "is_main_process", "shard"]

SHARDABLE = "shardable"


class ShardingError(ValueError):
    """A layer of the model cannot be sharded by FSDP2; names the layer, its backend and why."""


# --------------------------------------------------------------------------
# Which layers can shard
# --------------------------------------------------------------------------


def _refusal(module: nn.Module, backend: str) -> str | None:
    """Why ``module`` (a backend's quantized layer) cannot shard, or ``None`` if it can."""
    status = load_plugins().status(backend)
    info = status.info
    if info is None:
        return f"the backend is {status.status}: {status.reason}"
    if not info.shardable:
        return info.limits.get(SHARDABLE, "the backend does not declare BackendInfo.shardable")
    limited = {
        key.split(":", 1)[1]: why for key, why in info.limits.items() if key.startswith(SHARDABLE + ":")
    }
    limited.pop("", None)
    if not limited:
        return None
    variant = hook().quantplug_layer_variant(module=module, backend=backend)
    if variant is None:
        return (
            f"the backend limits FSDP2 to some variants ({', '.join(sorted(limited))} cannot shard) but does "
            "not say which variant this layer is (quantplug_layer_variant returned None)"
        )
    if variant in limited:
        return f"variant {variant!r}: {limited[variant]}"
    return None


def check_shardable(model: nn.Module) -> None:
    """Raise :class:`ShardingError` unless every quantized layer of ``model`` can be sharded by FSDP2.

    Every adapter layer's base is checked, and every quantized layer no adapter
    wraps (FSDP2 shards those too). A backend shards when its
    :class:`~quantplug.BackendInfo` says ``shardable=True``, except for the
    variants it lists in ``limits`` as ``"shardable:<variant>"`` (bnb: ``int8``).
    """
    refused: dict[tuple[str, str, str], list[str]] = {}
    claimed: set[int] = set()  # modules inside a quantized layer: checked as part of it
    for path, module in model.named_modules():
        if id(module) in claimed:
            continue
        if isinstance(module, LoraLayer):
            base, backend = module.base, module.backend
        else:
            backend = detect(module, model)
            if backend is None:
                continue
            base = module
        claimed.update(id(m) for m in module.modules())
        why = _refusal(base, backend)
        if why is not None:
            refused.setdefault((backend, type(base).__name__, why), []).append(path or "<root>")
    if refused:
        lines = []
        for (backend, kind, why), paths in refused.items():
            shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
            lines.append(
                f"  backend {backend!r}, {kind} ({len(paths)} layer{'s' * (len(paths) != 1)}: {shown}): {why}"
            )
        raise ShardingError(
            "FSDP2 cannot shard these layers:\n" + "\n".join(lines) + "\n"
            "Quantize them in a format that shards (quantplug doctor: column fsdp2, -v for the reasons) "
            "or train on one device."
        )


# --------------------------------------------------------------------------
# Sharding
# --------------------------------------------------------------------------


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks, which :func:`shard` wraps one by one.

    A transformers model names them in ``_no_split_modules`` (``LlamaDecoderLayer``);
    otherwise the ``nn.ModuleList`` holding the most adapter layers
    (``model.model.layers``, ``transformer.h``). Empty when neither is found.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    if blocks:
        return blocks
    best: list[nn.Module] = []
    best_count = 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            count = sum(len(lora_layers(child)) for child in module)
            if count > best_count:
                best, best_count = list(module), count
    return best


def _depth(model: nn.Module) -> dict[int, int]:
    return {id(m): path.count(".") + 1 if path else 0 for path, m in model.named_modules()}


def shard(
    model: nn.Module,
    *,
    mesh=None,
    blocks: Iterable[nn.Module] | None = None,
    reshard_after_forward: bool = True,
    mp_policy=None,
    offload_policy=None,
) -> nn.Module:
    """Shard ``model`` with FSDP2 for adapter training; in place, returns ``model``.

    Applies ``fully_shard`` to each block (deepest first), then to the root,
    after freezing everything but the adapters (the quantized bases are
    sharded and frozen; the adapters are sharded, trained, and their
    gradients averaged over the ranks). Call it on every rank, after
    :func:`quantplug.attach` (and :func:`quantplug.prepare_for_training`)
    and after ``torch.distributed.init_process_group``.

    :param mesh: a ``DeviceMesh`` (1-D: FSDP; 2-D: HSDP); defaults to all ranks
        on the device type the model's adapters live on.
    :param blocks: the modules to shard one by one; default :func:`find_blocks`.
        ``[]`` shards the root only (one all-gather of the whole model per step).
    :param reshard_after_forward, mp_policy, offload_policy: passed to
        ``fully_shard``. An ``mp_policy`` with a ``param_dtype`` casts every
        floating-point parameter, quantized storage included: with bnb's bf16
        ``quant_storage`` use ``param_dtype=torch.bfloat16`` (a no-op on it) or none.
    :raises ShardingError: a quantized layer's backend (or variant) cannot shard.
    :raises ValueError: the model has no adapters, or is already sharded.
    :raises RuntimeError: no process group is initialized.
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        raise ValueError(f"{type(model).__name__} is already sharded (fully_shard was applied to it)")
    adapters = trainable_parameters(model)
    if not adapters:
        raise ValueError("the model has no adapters: call qp.attach(model, config) before shard()")
    check_shardable(model)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "no process group: call torch.distributed.init_process_group() on every rank first "
            "(torchrun --nproc-per-node N sets the rank and world size)"
        )
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(adapters[0].device.type, (dist.get_world_size(),))
    trainable = {id(p) for p in adapters}
    for param in model.parameters():
        param.requires_grad_(id(param) in trainable)
    if blocks is None:
        blocks = find_blocks(model)
        if not blocks:
            warnings.warn(
                f"found no transformer blocks in {type(model).__name__}: sharding the root only, which "
                "all-gathers the whole model at once; pass blocks=[...] to shard layer by layer",
                stacklevel=2,
            )
    blocks = list(blocks)
    depth = _depth(model)
    for block in blocks:
        if id(block) not in depth or block is model:
            raise ValueError(
                f"blocks must be submodules of the model, not the model itself: got {type(block).__name__}"
            )
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    if offload_policy is not None:
        kwargs["offload_policy"] = offload_policy
    for block in sorted(blocks, key=lambda b: -depth[id(b)]):  # FSDP2 wants inner modules first
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def is_main_process() -> bool:
    """Rank 0, or no process group at all: the process that writes files and prints."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole: a sharded ``DTensor`` is all-gathered (a collective: every rank must call it)."""
    gather = getattr(tensor, "full_tensor", None)
    return gather() if gather is not None else tensor

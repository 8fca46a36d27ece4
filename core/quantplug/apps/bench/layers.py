"""Layer rows: per backend, shape and token count, the bare quantized layer against quantplug's adapter
layer (fast and reference kernels), PEFT's LoRA layer on the same base, the dense-merged layer, and a
batch of 8 distinct adapters against one."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from quantplug.apps.bench.backends import importable, layer_backends, peft_markers, variant_of
from quantplug.apps.bench.timing import Timer

REQUIRED_KEYS = (
    "backend",
    "shape",
    "tokens",
    "library",
    "kernel",
    "bare_us",
    "wrapped_us",
    "wrapped_over_bare",
)


def _tensors_of(obj, seen: dict, depth: int = 0) -> None:
    """Record every tensor reachable from ``obj``: plain tensors by storage, tensor subclasses (torchao's)
    by their inner tensors, and the tensors a library hangs on a parameter or in a plain object or dict
    (bitsandbytes' ``quant_state``, HQQ's ``meta``), a few levels deep."""
    import torch
    from torch import nn

    if depth > 3 or isinstance(obj, nn.Module):
        return
    if isinstance(obj, torch.Tensor):
        inner = getattr(obj, "__tensor_flatten__", None)
        if inner is not None and type(obj) not in (torch.Tensor, nn.Parameter):
            for name in inner()[0]:
                _tensors_of(getattr(obj, name), seen, depth + 1)
        elif obj.device.type != "meta":
            seen.setdefault((obj.data_ptr(), obj.nbytes), obj.nbytes)
        values = vars(obj).values() if type(obj) not in (torch.Tensor, nn.Parameter) else ()
    elif isinstance(obj, dict):
        values = obj.values()
    elif isinstance(obj, (list, tuple)):
        values = obj
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        values = vars(obj).values()
    else:
        return
    for value in values:
        _tensors_of(value, seen, depth + 1)


def storage_bytes(module) -> int:
    """Bytes a forward of ``module`` must read at least: its tensors, and the scales libraries keep outside
    parameters (on a parameter, as bitsandbytes' ``quant_state``, or on the module, as HQQ's ``meta``)."""
    seen: dict = {}
    for tensor in (*module.parameters(), *module.buffers()):
        _tensors_of(tensor, seen)
    for name, value in vars(module).items():
        if not name.startswith("_"):
            _tensors_of(value, seen)
    return sum(seen.values())


class _Holder:
    """A one-layer model (built lazily so this module imports without torch)."""

    @staticmethod
    def make(layer):
        from torch import nn

        class Holder(nn.Module):
            def __init__(self, proj):
                super().__init__()
                self.proj = proj

        return Holder(layer)


def _quantized(backend: str, variant: str | None, out_features: int, in_features: int, device: str, dtype):
    import torch
    from torch import nn

    import quantplug as qp

    linear = nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02)
    linear.requires_grad_(False)
    return qp.quantize(linear, backend, variant)


def _copy_of(base, quantized_args: tuple):
    """A deep copy of ``base`` (quantizing anew is slow for some libraries: gptqmodel packs 4096x4096 on the
    CPU in 7 s), or ``_quantized(*quantized_args)`` where the library's layer cannot be copied."""
    import copy

    try:
        return copy.deepcopy(base)
    except Exception:
        return _quantized(*quantized_args)


def _peft_wrap(base, rank: int, names: Sequence[str] = ("default",)):
    """PEFT's LoRA layer on ``base`` (shared, not copied), as PEFT dispatches it for this base."""
    from peft import LoraConfig as PeftConfig
    from peft import inject_adapter_in_model

    holder = _Holder.make(base)
    peft_markers(holder, holder)
    for name in names:
        config = PeftConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"], init_lora_weights=False)
        inject_adapter_in_model(config, holder, adapter_name=name)
    layer = holder.proj
    layer.set_adapter(names[0])
    return layer


def layer_rows(args, device: str, dtype, env: dict, log, rows: list[dict], save: Callable[[], None]) -> None:
    """Append the layer timings to ``rows``, calling ``save`` after each backend and shape."""
    import torch

    import quantplug as qp

    shapes = _parse_shapes(args.shapes or ("64x128,96x256" if args.quick else "4096x4096,11008x4096"))
    tokens_list = [int(t) for t in (args.tokens or ("1,16,64" if args.quick else "1,16,2048")).split(",")]
    statuses = layer_backends(args.backends, device, log)
    timer = Timer(device, args.quick)
    peft_ok = not args.no_peft and importable("peft")
    l2 = env.get("l2_bytes") or 0
    rank = args.rank
    for status in statuses:
        backend, variant = status.name, variant_of(status)
        for out_features, in_features in shapes:
            shape = f"{out_features}x{in_features}"
            try:
                first = _quantized(backend, variant, out_features, in_features, device, dtype)
            except Exception as exc:
                log(f"skip {backend} {shape}: cannot build the layer: {type(exc).__name__}: {exc}")
                continue
            base_bytes = storage_bytes(first)
            copies = 1 if not l2 else max(1, min(8, math.ceil(2.5 * l2 / max(base_bytes, 1))))
            bases = [first] + [
                _copy_of(first, (backend, variant, out_features, in_features, device, dtype))
                for _ in range(copies - 1)
            ]
            models = []
            for base in bases:
                model = _Holder.make(base)
                config = qp.LoraConfig(r=rank, alpha=2 * rank, target_modules=["proj"], init="random")
                qp.attach(model, config)
                for i in range(7):  # the other adapters of the 8-adapter batch
                    qp.attach(model, config, adapter=f"extra{i}")
                qp.set_adapter(model, "default")
                model.eval()
                models.append(model)
            peft_layers, peft_note = [], None
            if peft_ok:  # where PEFT has no LoRA class for this base, the row says so
                try:
                    peft_layers = [_peft_wrap(base, rank) for base in bases]
                except Exception as exc:
                    peft_note = f"PEFT could not wrap it: {type(exc).__name__}: {str(exc)[:120]}"
            adapter_bytes = sum(
                t.nbytes for t in (models[0].proj.lora_A["default"], models[0].proj.lora_B["default"])
            )
            # the kernel quantplug's registry serves this call site (a kernel may pick its own path per
            # call, e.g. eager against CUDA-graph capture: docs/performance.md says which)
            kernel = qp.load_plugins().kernels.resolve("lora_add", backend, device, dtype).name
            fused = qp.load_plugins().kernels.find("fused_lora_linear", backend, device, dtype)
            for tokens in tokens_list:
                x = torch.randn(tokens, in_features, device=device, dtype=dtype)
                io_bytes = x.nbytes + tokens * out_features * x.element_size()
                graphs = device == "cuda" and tokens <= 16
                with torch.no_grad():
                    served = kernel  # or a plugin's fused kernel, where it serves this call:
                    if fused is not None and fused.priority > 0:
                        probe = models[0].proj
                        args = (probe.lora_A["default"], probe.lora_B["default"], probe.scaling["default"])
                        if fused.fn(probe.base, x, x, *args) is not None:
                            served = fused.name
                    bare = [lambda b=b, x=x: b(x) for b in bases]
                    wrapped = [lambda m=m, x=x: m.proj(x) for m in models]
                    row = {
                        "backend": backend,
                        "variant": variant,
                        "shape": shape,
                        "tokens": tokens,
                        "rank": rank,
                        "dtype": str(dtype).replace("torch.", ""),
                        "copies": copies,
                        "base_bytes": base_bytes,
                    }
                    bare_us = timer.eager(bare)
                    bare_graph_us = timer.graph(bare) if graphs else None
                    fast_us = timer.eager(wrapped)
                    fast_graph_us = timer.graph(wrapped) if graphs else None
                    qp.use_reference_kernels(True)
                    try:
                        ref_us = timer.eager(wrapped)
                        ref_graph_us = timer.graph(wrapped) if graphs else None
                    finally:
                        qp.use_reference_kernels(False)
                    common = {"bare_us": bare_us, "bare_graph_us": bare_graph_us}
                    rows.append(
                        _finish(
                            {**row, **common, "library": "quantplug", "kernel": served, "kernels": "fast", "wrapped_us": fast_us,
                             "wrapped_graph_us": fast_graph_us},
                            base_bytes, adapter_bytes, io_bytes, env,
                        )
                    )  # fmt: skip
                    rows.append(
                        _finish(
                            {**row, **common, "library": "quantplug", "kernel": "reference", "kernels": "reference",
                             "wrapped_us": ref_us,
                             "wrapped_graph_us": ref_graph_us},
                            base_bytes, adapter_bytes, io_bytes, env,
                        )
                    )  # fmt: skip
                    if peft_layers:
                        peft_calls = [lambda p=p, x=x: p(x) for p in peft_layers]
                        try:
                            peft_us = timer.eager(peft_calls)
                            peft_graph_us = timer.graph(peft_calls) if graphs else None
                            peft_kernel = (
                                f"peft:{type(peft_layers[0]).__module__}.{type(peft_layers[0]).__name__}"
                            )
                            rows.append(
                                _finish(
                                    {**row, **common, "library": "peft", "kernel": peft_kernel,
                                     "wrapped_us": peft_us, "wrapped_graph_us": peft_graph_us},
                                    base_bytes, adapter_bytes, io_bytes, env,
                                )
                            )  # fmt: skip
                        except Exception as exc:
                            peft_note = f"PEFT's forward failed: {type(exc).__name__}: {str(exc)[:120]}"
                    if peft_note:
                        rows.append({**row, **common, "library": "peft", "kernel": "none", "wrapped_us": None,
                                     "wrapped_over_bare": None, "note": peft_note, "env": env})  # fmt: skip
                    if tokens == 16:
                        single = {"fast": (fast_us, fast_graph_us), "reference": (ref_us, ref_graph_us)}
                        rows.extend(_mixed_rows(timer, models, x, row, common, single, env))
                log(_progress(rows, backend, shape, tokens))
            # dense merge last: it changes the models
            for model in models:
                qp.merge(model, adapter="default", mode="dense")
            merged_bytes = storage_bytes(models[0].proj.base)
            # the dense layer is in the backend's compute dtype, which may differ from --dtype
            merged_dtype = models[0].proj.base.weight.dtype
            for tokens in tokens_list:
                x = torch.randn(tokens, in_features, device=device, dtype=merged_dtype)
                with torch.no_grad():
                    # the merged dense layer itself, what a serving engine runs (a plugin's adapter-layer
                    # subclass may keep its own base_forward for its quantized base)
                    merged_us = timer.eager([lambda m=m, x=x: m.proj.base(x) for m in models])
                for row in rows:
                    if (row["backend"], row["shape"], row["tokens"]) == (backend, shape, tokens) and row[
                        "library"
                    ] == "quantplug":
                        row["merged_us"] = merged_us
                        row["merged_bytes"] = merged_bytes
            del models, bases, peft_layers, first
            if device == "cuda":
                torch.cuda.empty_cache()
            save()


def _mixed_rows(timer, models, x, row, common, single, env) -> list[dict]:
    """8 distinct adapters over the rows of ``x`` against one adapter (``single``: kernels -> (eager, graph) us).

    Eager: the layer's ``adapter_names=`` forward as users call it. Graph: the
    base plus the registered ``lora_mixed_add`` kernel with the row index built
    beforehand (the eager forward builds it from the names on the host each
    call, which a CUDA graph cannot replay).
    """
    import torch

    import quantplug as qp

    names = ["default", *(f"extra{i}" for i in range(7))]
    batch = [names[i % len(names)] for i in range(x.shape[0])]
    rows_index = torch.tensor([names.index(n) for n in batch], device=x.device)
    calls = [lambda m=m: m.proj(x, adapter_names=batch) for m in models]

    def kernel_call(layer, kernel):
        As = [layer.lora_A[n] for n in names]
        Bs = [layer.lora_B[n] for n in names]
        scales = [layer.scaling[n] for n in names]
        return lambda: kernel.fn(layer.base_call(x), x, As, Bs, scales, rows_index)

    out = []
    for kernels in ("fast", "reference"):
        qp.use_reference_kernels(kernels == "reference")
        try:
            us = timer.eager(calls)
            kernel = qp.load_plugins().kernels.resolve(
                "lora_mixed_add", row["backend"], x.device.type, x.dtype
            )
            graph_us = timer.graph([kernel_call(m.proj, kernel) for m in models])
        finally:
            qp.use_reference_kernels(False)
        single_us, single_graph_us = single[kernels]
        result = {
            **row,
            **common,
            "library": "quantplug",
            "kernel": f"{kernel.name} x{len(set(batch))} adapters",
            "kernels": kernels,
            "wrapped_us": us,
            "wrapped_graph_us": graph_us,
            "wrapped_over_bare": us / common["bare_us"],
            "adapters": len(set(batch)),
            "single_adapter_us": single_us,
            "mixed_over_single": us / single_us,
            "env": env,
        }
        if graph_us and single_graph_us:
            result["single_adapter_graph_us"] = single_graph_us
            result["graph_mixed_over_single"] = graph_us / single_graph_us
        out.append(result)
    return out


def _finish(row: dict, base_bytes: int, adapter_bytes: int, io_bytes: int, env: dict) -> dict:
    row["wrapped_over_bare"] = row["wrapped_us"] / row["bare_us"]
    if row.get("wrapped_graph_us") and row.get("bare_graph_us"):
        row["graph_wrapped_over_bare"] = row["wrapped_graph_us"] / row["bare_graph_us"]
    row["bare_gbs"] = (base_bytes + io_bytes) / (row["bare_us"] * 1e-6) / 1e9
    # from GPU time: the library's own bare layer and the wrapped layer, both graph-replayed in this run;
    # the bytes the wrapped layer must read (packed weights, scales, the adapter) over its replay time
    row["library_bare_graph_us"] = row.get("bare_graph_us")
    if row.get("wrapped_graph_us"):
        row["graph_wrapped_gbs"] = (base_bytes + adapter_bytes) / (row["wrapped_graph_us"] * 1e-6) / 1e9
        if env.get("copy_gbs"):
            row["graph_wrapped_bw_fraction"] = row["graph_wrapped_gbs"] / env["copy_gbs"]
    row["wrapped_gbs"] = (base_bytes + adapter_bytes + io_bytes) / (row["wrapped_us"] * 1e-6) / 1e9
    if env.get("copy_gbs"):
        row["bare_bw_fraction"] = row["bare_gbs"] / env["copy_gbs"]
        row["wrapped_bw_fraction"] = row["wrapped_gbs"] / env["copy_gbs"]
    row["env"] = env
    return row


def _progress(rows, backend, shape, tokens) -> str:
    parts = [f"{backend:8s} {shape:>11s} t={tokens:<5d}"]
    for row in rows:
        if (row["backend"], row["shape"], row["tokens"]) != (backend, shape, tokens) or row.get(
            "wrapped_us"
        ) is None:
            continue
        parts.append(f"{row['library']}/{row['kernel'].split(':')[0][:14]} {row['wrapped_over_bare']:.2f}x")
    return "  ".join(parts)


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        out_features, in_features = item.lower().split("x")
        shapes.append((int(out_features), int(in_features)))
    return shapes

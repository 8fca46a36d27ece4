"""``quantplug bench``: bare vs adapter vs merged layers per backend, beside PEFT, in one run.

Per backend that is ok here and per shape, at each token count, it times:

- ``bare``: the backend's quantized layer alone;
- quantplug's adapter layer with the fast kernels (``kernel`` names the one
  that served) and with the references forced (``kernel="reference"``);
- the same layer after a dense merge (``merged_us``);
- PEFT's LoRA layer on the very same base module, where PEFT wraps it;
- on CUDA at <= 16 tokens, each of these again captured in a CUDA graph
  (``*_graph_us``): the GPU's own time, without Python's launch overhead;
- at 16 tokens, a batch of 8 distinct adapters through ``adapter_names=``
  against one adapter (``mixed_over_single``).

Timing: CUDA events (or the host clock on CPU) around a loop, after warm-up;
the median over trials. Each measurement cycles through enough copies of
the layer to overflow the GPU's L2 cache, so weights come from device
memory as they do in a model. Achieved bandwidth counts the bytes a call
must move at least (weights and their scales, adapters, input, output)
against the device's measured copy bandwidth (read + write).

``--model`` adds a ~1.1B LLaMA (TinyLlama's shape, random weights, built
from a config) with every linear in bitsandbytes NF4: greedy decode
tokens/s with the adapter unmerged, disabled and merged, and QLoRA training
tokens/s and peak memory, for quantplug and PEFT.

The output is a JSON list of rows, each with at least ``backend``,
``shape``, ``tokens``, ``library``, ``kernel``, ``bare_us``, ``wrapped_us``,
``wrapped_over_bare`` and the run's environment; a PNG chart is written
beside it, and ``--render`` turns such a file into ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

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
# backend -> variant timed by default (the plugin's first variant when absent)
DEFAULT_VARIANTS = {"bnb": "nf4", "hqq": "4bit-g64", "torchao": "int8wo", "linear": None}
PEFT_BACKENDS = ("linear", "bnb", "hqq", "torchao")
TARGETS = {
    "decode_ratio": 1.10,
    "model_ratio": 0.90,
    "training_speedup": 1.3,
    "mixed_ratio": 1.5,
}


# --------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------


def capture_graph(fn: Callable[[], object], repeat: int = 1):
    """``fn`` warmed up three times on a side stream (Triton compiles, allocations, lazy caches),
    then ``repeat`` calls of it captured in one CUDA graph, which is returned."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            fn()
    return graph


class Timer:
    """Median time per call of ``fn`` in microseconds, on ``device``."""

    def __init__(self, device: str, quick: bool):
        import torch

        self.torch = torch
        self.cuda = device == "cuda"
        self.trials = 5 if quick else 15
        self.trial_ms = 1.0 if quick else 3.0

    def _sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def _elapsed_ms(self, body: Callable[[], None]) -> float:
        if self.cuda:
            start = self.torch.cuda.Event(enable_timing=True)
            end = self.torch.cuda.Event(enable_timing=True)
            start.record()
            body()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        start = time.perf_counter()
        body()
        return (time.perf_counter() - start) * 1e3

    def eager(self, fns: Sequence[Callable[[], object]]) -> float:
        def one_pass():
            for fn in fns:
                fn()

        for _ in range(3):
            one_pass()
        self._sync()
        first = self._elapsed_ms(one_pass)
        inner = max(1, min(500, math.ceil(self.trial_ms / max(first, 1e-3))))

        def body():
            for _ in range(inner):
                one_pass()

        times = [self._elapsed_ms(body) / (inner * len(fns)) for _ in range(self.trials)]
        return statistics.median(times) * 1e3

    def graph(self, fns: Sequence[Callable[[], object]]) -> float | None:
        """The same calls captured once in a CUDA graph and replayed (``None`` if capture fails)."""
        if not self.cuda:
            return None
        torch = self.torch
        repeat = max(1, 32 // len(fns))
        try:
            graph = capture_graph(lambda: [fn() for fn in fns], repeat)
        except Exception as exc:  # a base that cannot be captured: say so in the row
            self.last_graph_error = f"{type(exc).__name__}: {str(exc)[:160]}"
            torch.cuda.synchronize()
            return None
        calls = repeat * len(fns)
        graph.replay()
        torch.cuda.synchronize()
        first = self._elapsed_ms(graph.replay)
        inner = max(1, min(200, math.ceil(self.trial_ms / max(first, 1e-3))))

        def body():
            for _ in range(inner):
                graph.replay()

        times = [self._elapsed_ms(body) / (inner * calls) for _ in range(self.trials)]
        return statistics.median(times) * 1e3


# --------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------


def copy_bandwidth_gbs(device: str) -> float | None:
    """Device-to-device copy bandwidth, bytes read plus written, in GB/s."""
    import torch

    if device != "cuda":
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    timer = Timer(device, quick=True)
    timer.trial_ms = 20.0
    us = timer.eager([lambda: dst.copy_(src)])
    return 2 * (1 << 30) / (us * 1e-6) / 1e9


def environment(device: str, argv: Sequence[str]) -> dict:
    import importlib.metadata as md

    import torch

    versions = {}
    for dist in ("quantplug", "torch", "triton", "bitsandbytes", "peft", "hqq", "torchao", "transformers"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[dist] = md.version(dist)
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "gpu": torch.cuda.get_device_name(0)
        if device == "cuda"
        else platform.processor() or platform.machine(),
        "cuda": torch.version.cuda if device == "cuda" else None,
        "python": platform.python_version(),
        "versions": versions,
        "command": "quantplug bench " + " ".join(argv),
    }
    if device == "cuda":
        env["l2_bytes"] = torch.cuda.get_device_properties(0).L2_cache_size
    env["copy_gbs"] = copy_bandwidth_gbs(device)
    return env


# --------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------


def _tensors_of(obj, seen: dict, depth: int = 0) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        if obj.device.type != "meta":
            seen.setdefault((obj.data_ptr(), obj.nbytes), obj.nbytes)
        return
    if depth > 2:
        return
    if isinstance(obj, dict):
        for value in obj.values():
            _tensors_of(value, seen, depth + 1)
    elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in (
        "bitsandbytes",
        "hqq",
        "torchao",
    ):
        for value in vars(obj).values():
            _tensors_of(value, seen, depth + 1)


def storage_bytes(module) -> int:
    """Bytes a forward of ``module`` must read at least: its tensors, and the scales libraries keep outside
    parameters (bitsandbytes' ``quant_state``, HQQ's ``meta``)."""
    seen: dict = {}
    for tensor in (*module.parameters(), *module.buffers()):
        _tensors_of(tensor, seen)
    weight = getattr(module, "weight", None)
    for extra in (getattr(weight, "quant_state", None), getattr(module, "meta", None)):
        if extra is not None:
            _tensors_of(extra, seen)
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
    if backend == "linear":
        linear.weight.requires_grad_(False)
        return linear
    return qp.quantize(linear, backend, variant)


def _peft_wrap(base, backend: str, rank: int, names: Sequence[str] = ("default",)):
    """PEFT's LoRA layer on ``base`` (shared, not copied), as PEFT dispatches it for this backend."""
    from peft import LoraConfig as PeftConfig
    from peft import inject_adapter_in_model

    holder = _Holder.make(base)
    if backend == "bnb":
        # PEFT picks its bnb classes only for models carrying transformers' markers
        kind = type(base).__name__
        holder.is_loaded_in_4bit = kind == "Linear4bit"
        holder.is_loaded_in_8bit = kind == "Linear8bitLt"
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
    from quantplug._registry import load_plugins

    shapes = _parse_shapes(args.shapes or ("64x128,96x256" if args.quick else "4096x4096,11008x4096"))
    tokens_list = [int(t) for t in (args.tokens or ("1,16,64" if args.quick else "1,16,2048")).split(",")]
    registry = load_plugins()
    wanted = args.backends.split(",") if args.backends else None
    backends = []
    for name, status in sorted(registry.backends.items()):
        if wanted is not None and name not in wanted:
            continue
        if wanted is None and name not in DEFAULT_VARIANTS:
            continue  # the default run: the backends PEFT also covers, with a GPU path
        if not status.ok or (status.info and device not in status.info.devices):
            log(f"skip {name}: {status.status} {status.reason or ''}")
            continue
        backends.append(name)
    timer = Timer(device, args.quick)
    peft_ok = not args.no_peft and _importable("peft")
    l2 = env.get("l2_bytes") or 0
    rank = args.rank
    for backend in backends:
        variant = DEFAULT_VARIANTS.get(backend)
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
                _quantized(backend, variant, out_features, in_features, device, dtype)
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
            if peft_ok and backend in PEFT_BACKENDS:
                try:
                    peft_layers = [_peft_wrap(base, backend, rank) for base in bases]
                except Exception as exc:
                    peft_note = f"PEFT could not wrap it: {type(exc).__name__}: {str(exc)[:120]}"
            adapter_bytes = sum(
                t.nbytes for t in (models[0].proj.lora_A["default"], models[0].proj.lora_B["default"])
            )
            kernel = registry.kernels.resolve("lora_add", backend, device, dtype).name
            for tokens in tokens_list:
                x = torch.randn(tokens, in_features, device=device, dtype=dtype)
                io_bytes = x.nbytes + tokens * out_features * x.element_size()
                graphs = device == "cuda" and tokens <= 16
                with torch.no_grad():
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
                    path = kernel
                    if kernel == "triton-splitk":
                        path = (
                            "cublas-addmm"
                            if tokens > _splitk_max_tokens()
                            else "eager cublas-addmm, graph triton-splitk"
                        )
                    common = {"bare_us": bare_us, "bare_graph_us": bare_graph_us}
                    rows.append(
                        _finish(
                            {**row, **common, "library": "quantplug", "kernel": path, "kernels": "fast", "wrapped_us": fast_us,
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
            for tokens in tokens_list:
                x = torch.randn(tokens, in_features, device=device, dtype=dtype)
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
        return lambda: kernel.fn(layer.base_forward(x), x, As, Bs, scales, rows_index)

    out = []
    for kernels in ("fast", "reference"):
        qp.use_reference_kernels(kernels == "reference")
        try:
            us = timer.eager(calls)
            kernel = models[0].proj._kernels.resolve("lora_mixed_add", row["backend"], x.device.type, x.dtype)
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
    row["wrapped_gbs"] = (base_bytes + adapter_bytes + io_bytes) / (row["wrapped_us"] * 1e-6) / 1e9
    if env.get("copy_gbs"):
        row["bare_bw_fraction"] = row["bare_gbs"] / env["copy_gbs"]
        row["wrapped_bw_fraction"] = row["wrapped_gbs"] / env["copy_gbs"]
    row["env"] = env
    return row


def _splitk_max_tokens() -> int:
    try:
        from quantplug._triton import SPLITK_MAX_TOKENS

        return SPLITK_MAX_TOKENS
    except Exception:
        return 64


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


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# --------------------------------------------------------------------------
# whole model
# --------------------------------------------------------------------------

TINYLLAMA = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
    num_key_value_heads=4, max_position_embeddings=2048,
)  # fmt: skip
QUICK_LLAMA = dict(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256,
)  # fmt: skip
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama(backend: str, variant: str | None, device: str, dtype, quick: bool, seed: int = 0):
    import torch

    import quantplug as qp
    from quantplug.testing.models import tiny_llama

    with torch.device(device):
        model = tiny_llama(seed, **(QUICK_LLAMA if quick else TINYLLAMA), torch_dtype=dtype).to(dtype)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, 0, 0.02)
    qp.quantize(model.model, backend, variant)
    model.requires_grad_(False)
    model.eval()
    return model


def _decode_tps(model, prompt, new_tokens: int, device: str) -> float:
    import torch

    def generate():
        return model.generate(
            prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )

    with torch.no_grad():
        generate()  # warm-up: kernels compile, caches fill
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = generate()
        if device == "cuda":
            torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return prompt.shape[0] * (out.shape[1] - prompt.shape[1]) / elapsed


def _static_cache(model, length: int):
    from transformers import StaticCache

    try:  # transformers 5: the cache allocates on its first update
        return StaticCache(config=model.config, max_cache_len=length)
    except TypeError:  # transformers 4.x
        param = next(model.parameters())
        return StaticCache(
            config=model.config,
            max_batch_size=1,
            max_cache_len=length,
            device=param.device,
            dtype=param.dtype,
        )


def _graph_decode_tps(model, vocab: int, position: int, replays: int = 50) -> float:
    """Tokens/s of one-token decode steps of the whole model, captured once in a CUDA graph and replayed.

    A static KV cache holds ``position`` earlier tokens; the step is the forward of one new
    token (what a server running decode under CUDA graphs, or ``torch.compile(mode=
    "reduce-overhead")``, replays), so the host's Python is out of the time. Raises if the
    model cannot be captured.
    """
    import torch

    # transformers 5's static cache writes each step at its own running count (a tensor the graph
    # advances), not at cache_position: room for the warm-up, the capture and every replay
    length = position + replays + 8
    cache = _static_cache(model, length)
    ids = torch.randint(0, vocab, (1, 1), device="cuda")
    where = torch.tensor([position], device="cuda")
    # a 4-D mask over the whole static cache: transformers then builds none (its checks sync the host);
    # attention reads every slot whatever the mask says, so the step costs the same
    mask = torch.zeros(1, 1, 1, length, device="cuda", dtype=next(model.parameters()).dtype)

    def step():
        return model(
            input_ids=ids, attention_mask=mask, past_key_values=cache, cache_position=where, use_cache=True
        ).logits

    with torch.no_grad():
        graph = capture_graph(step)
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
    return replays / (start.elapsed_time(end) / 1e3)


def _graph_decode_pair(model, disable, vocab: int, position: int, log) -> dict:
    """Graph-replayed decode with the adapters on and under ``disable()``; empty where capture failed."""
    if next(model.parameters()).device.type != "cuda":
        return {}
    try:
        on = _graph_decode_tps(model, vocab, position)
        with disable():
            off = _graph_decode_tps(model, vocab, position)
    except Exception as exc:  # a layer that cannot be captured: the eager numbers still stand
        log(f"graph-captured decode failed: {type(exc).__name__}: {str(exc)[:300]}")
        return {"graph_error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    log(f"graph-replayed decode: unmerged {on:.1f} tok/s, disabled {off:.1f} tok/s")
    return {
        "graph_tokens_per_s": on,
        "graph_disabled_tokens_per_s": off,
        "graph_unmerged_over_disabled": on / off,
    }


def _train_tps(model, params, batch, seq, steps: int, device: str, vocab: int) -> tuple[float, float | None]:
    import torch

    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    model.train()

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    model.eval()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return batch * seq * steps / elapsed, peak


def model_rows(args, device: str, dtype, env: dict, log) -> list[dict]:
    import torch

    import quantplug as qp

    backend = (args.backends or "bnb").split(",")[0]
    variant = DEFAULT_VARIANTS.get(backend)
    quick = args.quick
    shape = "llama-tiny" if quick else "llama-1.1b"
    vocab = (QUICK_LLAMA if quick else TINYLLAMA)["vocab_size"]
    new_tokens = 8 if quick else 64
    batch, seq, steps = (2, 32, 2) if quick else (4, 1024, 8)
    prompt = torch.randint(0, vocab, (1, 16), device=device)
    rows = []
    base_row = {"backend": backend, "variant": variant, "shape": shape, "rank": args.rank, "env": env}

    def add(kind, library, kernel, bare, wrapped, **extra):
        rows.append({**base_row, "tokens": kind, "library": library, "kernel": kernel, "bare_us": bare,
                     "wrapped_us": wrapped, "wrapped_over_bare": wrapped / bare if bare and wrapped else None,
                     **extra})  # fmt: skip

    # quantplug
    model = _llama(backend, variant, device, dtype, quick)
    qp.attach(model, qp.LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules=LINEARS, init="random"))
    unmerged = _decode_tps(model, prompt, new_tokens, device)
    with qp.disable_adapters(model):
        disabled = _decode_tps(model, prompt, new_tokens, device)
    log(f"quantplug decode: unmerged {unmerged:.1f} tok/s, disabled {disabled:.1f} tok/s")
    graphed = _graph_decode_pair(model, lambda: qp.disable_adapters(model), vocab, prompt.shape[1], log)
    qp.prepare_for_training(model)
    train_tps, train_peak = _train_tps(
        model, qp.trainable_parameters(model), batch, seq, steps, device, vocab
    )
    log(f"quantplug train: {train_tps:.0f} tok/s, peak {train_peak} GiB")
    model.requires_grad_(False)
    try:
        qp.merge(model, mode="requantize")
        merged = _decode_tps(model, prompt, new_tokens, device)
    except Exception as exc:
        log(f"quantplug merge failed: {exc}")
        merged = None
    # decode rows: times are microseconds per generated token; bare = adapter disabled
    add("decode", "quantplug", "unmerged", 1e6 / disabled, 1e6 / unmerged, tokens_per_s=unmerged,
        disabled_tokens_per_s=disabled, merged_tokens_per_s=merged,
        unmerged_over_disabled=unmerged / disabled, **graphed)  # fmt: skip
    qp_train = {"tokens_per_s": train_tps, "peak_gib": train_peak}
    del model
    if device == "cuda":
        torch.cuda.empty_cache()

    # PEFT on an identical model
    if args.no_peft or not _importable("peft"):
        add("train", "quantplug", "qlora", None, 1e6 / train_tps, **qp_train, batch=batch, seq=seq)
        return rows
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    model = _llama(backend, variant, device, dtype, quick)
    if backend == "bnb":
        model.is_loaded_in_4bit = variant != "int8"
        model.is_loaded_in_8bit = variant == "int8"
    peft_model = get_peft_model(
        model,
        PeftConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=LINEARS, init_lora_weights=False),
    )
    peft_unmerged = _decode_tps(peft_model, prompt, new_tokens, device)
    with peft_model.disable_adapter():
        peft_disabled = _decode_tps(peft_model, prompt, new_tokens, device)
    log(f"PEFT decode: unmerged {peft_unmerged:.1f} tok/s, disabled {peft_disabled:.1f} tok/s")
    peft_graphed = _graph_decode_pair(peft_model, peft_model.disable_adapter, vocab, prompt.shape[1], log)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    peft_train_tps, peft_peak = _train_tps(peft_model, params, batch, seq, steps, device, vocab)
    log(f"PEFT train: {peft_train_tps:.0f} tok/s, peak {peft_peak} GiB")
    try:
        merged_model = peft_model.merge_and_unload()
        peft_merged = _decode_tps(merged_model, prompt, new_tokens, device)
    except Exception as exc:
        log(f"PEFT merge failed: {exc}")
        peft_merged = None
    add("decode", "peft", "unmerged", 1e6 / peft_disabled, 1e6 / peft_unmerged, tokens_per_s=peft_unmerged,
        disabled_tokens_per_s=peft_disabled, merged_tokens_per_s=peft_merged,
        unmerged_over_disabled=peft_unmerged / peft_disabled, **peft_graphed)  # fmt: skip
    # training rows: bare_us = PEFT's time per token, so wrapped_over_bare < 1 means faster than PEFT
    add("train", "quantplug", "qlora", 1e6 / peft_train_tps, 1e6 / train_tps, **qp_train, batch=batch, seq=seq,
        speedup_over_peft=train_tps / peft_train_tps, peft_peak_gib=peft_peak)  # fmt: skip
    add("train", "peft", "qlora", 1e6 / peft_train_tps, 1e6 / peft_train_tps, tokens_per_s=peft_train_tps,
        peak_gib=peft_peak, batch=batch, seq=seq)  # fmt: skip
    return rows


# --------------------------------------------------------------------------
# output: table, chart, markdown
# --------------------------------------------------------------------------


def _fmt(value, spec=".1f", none="-") -> str:
    return none if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    """The short table printed last: one line per backend, shape and token count."""
    lines = [
        f"{'backend':8s} {'shape':>11s} {'tok':>5s} {'bare us':>8s} {'fast':>6s} {'fast/g':>6s} {'ref':>6s} "
        f"{'peft':>6s} {'peft/g':>6s} {'merged':>6s} {'GB/s':>6s} {'%copy':>5s}  kernel"
    ]
    for key, fast, ref, peft in _layer_groups(rows):
        merged = fast.get("merged_us")
        lines.append(
            f"{key[0]:8s} {key[1]:>11s} {key[2]:>5d} {fast['bare_us']:8.1f} {fast['wrapped_over_bare']:6.2f} "
            f"{_fmt(fast.get('graph_wrapped_over_bare'), '.2f'):>6s} {_fmt(ref and ref['wrapped_over_bare'], '.2f'):>6s} "
            f"{_fmt(peft and peft['wrapped_over_bare'], '.2f'):>6s} "
            f"{_fmt(peft and peft.get('graph_wrapped_over_bare'), '.2f'):>6s} "
            f"{_fmt(merged and merged / fast['bare_us'], '.2f'):>6s} {_fmt(fast.get('wrapped_gbs'), '.0f'):>6s} "
            f"{_fmt(fast.get('wrapped_bw_fraction') and 100 * fast['wrapped_bw_fraction'], '.0f'):>5s}  {fast['kernel']}"
        )
    for row in rows:
        if "mixed_over_single" in row:
            lines.append(
                f"mixed {row['backend']} {row['shape']} t={row['tokens']}: {row['kernel']}: "
                f"{row['wrapped_us']:.1f} us = {row['mixed_over_single']:.2f}x one adapter; graph "
                f"{_fmt(row.get('wrapped_graph_us'))} us = {_fmt(row.get('graph_mixed_over_single'), '.2f')}x"
            )
        if row["tokens"] in ("decode", "train"):
            extra = (
                f"unmerged/disabled {row['unmerged_over_disabled']:.2f} (merged {_fmt(row.get('merged_tokens_per_s'))} tok/s)"
                if row["tokens"] == "decode"
                else f"{row.get('tokens_per_s', 0):.0f} tok/s, peak {_fmt(row.get('peak_gib'), '.2f')} GiB"
            )
            lines.append(f"model {row['shape']} {row['tokens']} {row['library']}: {extra}")
    lines.append(
        "ratios are wrapped/bare (fast: quantplug fast kernels eager; /g: CUDA-graph replay; ref: reference kernels; "
        "merged: dense merge)"
    )
    return "\n".join(lines)


def chart(rows: list[dict], path: Path) -> Path | None:
    """A PNG a person can read: wrapped/bare per backend and shape, one panel per token count."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    layer = [
        r for r in rows if isinstance(r["tokens"], int) and "adapters" not in r and r.get("wrapped_over_bare")
    ]
    if not layer:
        return None
    tokens_list = sorted({r["tokens"] for r in layer})
    series = [
        ("quantplug fast", lambda r: r.get("kernels") == "fast", "wrapped_over_bare"),
        ("quantplug fast, CUDA graph", lambda r: r.get("kernels") == "fast",
         "graph_wrapped_over_bare"),
        ("quantplug reference", lambda r: r.get("kernels") == "reference",
         "wrapped_over_bare"),
        ("PEFT", lambda r: r["library"] == "peft", "wrapped_over_bare"),
        ("PEFT, CUDA graph", lambda r: r["library"] == "peft", "graph_wrapped_over_bare"),
    ]  # fmt: skip
    fig, axes = plt.subplots(len(tokens_list), 1, figsize=(11, 3.6 * len(tokens_list)), squeeze=False)
    for ax, tokens in zip(axes[:, 0], tokens_list):
        groups = []
        for r in layer:
            label = f"{r['backend']}\n{r['shape']}"
            if r["tokens"] == tokens and label not in groups:
                groups.append(label)
        width = 0.8 / len(series)
        for i, (name, pick, key) in enumerate(series):
            values = []
            for label in groups:
                match = [
                    r
                    for r in layer
                    if r["tokens"] == tokens and f"{r['backend']}\n{r['shape']}" == label and pick(r)
                ]
                values.append(match[0].get(key) or 0.0 if match else 0.0)
            xs = [g + (i - len(series) / 2 + 0.5) * width for g in range(len(groups))]
            bars = ax.bar(xs, values, width, label=name)
            for bar, value in zip(bars, values):
                if value:
                    ax.annotate(f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, value), ha="center",
                                va="bottom", fontsize=6, rotation=90)  # fmt: skip
        ax.axhline(1.0, color="black", linewidth=0.8)
        if tokens == 1:
            ax.axhline(
                TARGETS["decode_ratio"], color="red", linestyle="--", linewidth=0.8, label="target 1.10"
            )
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, fontsize=8)
        ax.set_ylabel("time / bare layer")
        ax.set_title(
            f"{tokens} token{'s' if tokens > 1 else ''}: adapter layer time over the bare quantized layer"
        )
        ax.legend(fontsize=7, ncol=3, loc="upper left")
    env = rows[0].get("env", {})
    fig.suptitle(
        f"quantplug bench on {env.get('gpu', '?')} ({env.get('date', '')}): lower is better", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


GENERATED_START = "<!-- generated by `quantplug bench --render`: edit outside these markers -->"
GENERATED_END = "<!-- end of generated section -->"


def render(json_path: Path, md_path: Path) -> str:
    """Rewrite the generated section of ``md_path`` from the rows in ``json_path``; keep the rest."""
    rows = json.loads(Path(json_path).read_text())
    body = _render_body(rows, json_path)
    section = f"{GENERATED_START}\n\n{body}\n{GENERATED_END}"
    old = (
        md_path.read_text()
        if md_path.exists()
        else "# Performance\n\n" + GENERATED_START + "\n" + GENERATED_END + "\n"
    )
    if GENERATED_START in old and GENERATED_END in old:
        head, rest = old.split(GENERATED_START, 1)
        tail = rest.split(GENERATED_END, 1)[1]
        text = head + section + tail
    else:
        text = old.rstrip() + "\n\n" + section + "\n"
    md_path.write_text(text)
    return text


def _render_body(rows: list[dict], json_path) -> str:
    env = next((r["env"] for r in rows if r.get("env")), {})
    out = [
        f"Measured {env.get('date', '?')} on **{env.get('gpu', '?')}** (CUDA {env.get('cuda')}, Python "
        f"{env.get('python')}); device copy bandwidth {_fmt(env.get('copy_gbs'), '.0f')} GB/s (read + write).",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items()) + ".",
        "",
        f"Command: `{env.get('command', '?')}` (rows in `{Path(json_path).name}`).",
        "",
        "### Layers: adapter layer time over the bare quantized layer",
        "",
        "r=16, bf16, eager unless marked *graph* (the same calls captured in one CUDA graph and replayed: the GPU's "
        "time without Python's launch overhead). *fast*: quantplug with its registered kernels; *ref*: "
        "`QUANTPLUG_KERNELS=reference`; *merged*: after a dense merge, over bare.",
        "",
        "| backend | shape | tokens | bare µs | bare graph µs | fast | fast graph | ref | PEFT | PEFT graph | merged "
        "| fast GB/s (% copy) | kernel |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for line in _layer_table_rows(rows):
        out.append(line)
    mixed = [r for r in rows if "mixed_over_single" in r]
    if mixed:
        out += ["", "### Multi-adapter batches (`adapter_names=`, one adapter per row)", "",
                "Eager: the layer's `adapter_names=` forward; graph: the base and the `lora_mixed_add` kernel "
                "replayed in a CUDA graph, against one adapter's plain forward timed the same way.", "",
                "| backend | shape | rows | kernel | eager µs | one adapter eager µs | eager ratio | graph µs "
                "| one adapter graph µs | graph ratio |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in mixed:
            out.append(
                f"| {r['backend']} | {r['shape']} | {r['tokens']} | {r['kernel']} | {r['wrapped_us']:.1f} | "
                f"{r['single_adapter_us']:.1f} | {r['mixed_over_single']:.2f} | {_fmt(r.get('wrapped_graph_us'))} | "
                f"{_fmt(r.get('single_adapter_graph_us'))} | {_fmt(r.get('graph_mixed_over_single'), '.2f')} |"
            )
    model = [r for r in rows if r["tokens"] in ("decode", "train")]
    if model:
        out += ["", "### Whole model (LLaMA 1.1B shape, random weights, every linear quantized, LoRA on all)", "",
                "| model | library | what | tokens/s | vs disabled / vs PEFT | merged tokens/s | peak GiB |",
                "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in model:
            if r["tokens"] == "decode":
                out.append(
                    f"| {r['backend']} {r['shape']} | {r['library']} | decode, batch 1, adapter unmerged "
                    f"(disabled: {r['disabled_tokens_per_s']:.1f}) | {r['tokens_per_s']:.1f} | "
                    f"{r['unmerged_over_disabled']:.2f}x | {_fmt(r.get('merged_tokens_per_s'))} | - |"
                )
                if r.get("graph_tokens_per_s"):
                    out.append(
                        f"| {r['backend']} {r['shape']} | {r['library']} | one-token decode step replayed in a "
                        f"CUDA graph, adapter unmerged (disabled: {r['graph_disabled_tokens_per_s']:.1f}) | "
                        f"{r['graph_tokens_per_s']:.1f} | {r['graph_unmerged_over_disabled']:.2f}x | - | - |"
                    )
                elif r.get("graph_error"):
                    out.append(
                        f"| {r['backend']} {r['shape']} | {r['library']} | decode step in a CUDA graph | "
                        f"capture failed: {r['graph_error'][:120]} | - | - | - |"
                    )
            else:
                speed = r.get("speedup_over_peft")
                out.append(
                    f"| {r['backend']} {r['shape']} | {r['library']} | QLoRA training, batch {r.get('batch')}x"
                    f"{r.get('seq')} | {r['tokens_per_s']:.0f} | {_fmt(speed, '.2f')}{'x' if speed else ''} | - | "
                    f"{_fmt(r.get('peak_gib'), '.2f')} |"
                )
    out += ["", "### Targets (issue 6)", ""]
    out += _targets(rows)
    return "\n".join(out) + "\n"


def _layer_groups(rows):
    """Per (backend, shape, tokens) of the one-adapter layer rows: the key, then quantplug's fast-kernel,
    reference-kernel and PEFT rows (``None`` where missing); keys without a fast row are skipped."""
    keys = []
    for r in rows:
        key = (r["backend"], r["shape"], r["tokens"])
        if isinstance(r["tokens"], int) and key not in keys:
            keys.append(key)
    for key in keys:
        group = [r for r in rows if (r["backend"], r["shape"], r["tokens"]) == key and "adapters" not in r]
        fast = next((r for r in group if r["library"] == "quantplug" and r.get("kernels") == "fast"), None)
        ref = next(
            (r for r in group if r["library"] == "quantplug" and r.get("kernels") == "reference"), None
        )
        peft = next((r for r in group if r["library"] == "peft" and r.get("wrapped_us")), None)
        if fast is not None:
            yield key, fast, ref, peft


def _layer_table_rows(rows):
    for key, fast, ref, peft in _layer_groups(rows):
        peft_ratio = _fmt(peft and peft.get("wrapped_over_bare"), ".2f", "n/a")
        bw = fast.get("wrapped_gbs")
        frac = fast.get("wrapped_bw_fraction")
        yield (
            f"| {key[0]} | {key[1]} | {key[2]} | {fast['bare_us']:.1f} | {_fmt(fast.get('bare_graph_us'))} | "
            f"**{fast['wrapped_over_bare']:.2f}** | {_fmt(fast.get('graph_wrapped_over_bare'), '.2f')} | "
            f"{_fmt(ref and ref['wrapped_over_bare'], '.2f')} | {peft_ratio} | "
            f"{_fmt(peft and peft.get('graph_wrapped_over_bare'), '.2f')} | "
            f"{_fmt(fast.get('merged_us') and fast['merged_us'] / fast['bare_us'], '.2f')} | "
            f"{_fmt(bw, '.0f')} ({_fmt(frac and 100 * frac, '.0f')}%) | {fast['kernel']} |"
        )


def _verdict(value, target, lower_is_better=True) -> str:
    if value is None:
        return "not measured"
    met = value <= target if lower_is_better else value >= target
    if met:
        return f"**met** ({value:.2f} vs {target})"
    gap = value / target - 1 if lower_is_better else 1 - value / target
    return f"**missed** by {100 * gap:.0f}% ({value:.2f} vs {target})"


def _targets(rows) -> list[str]:
    out = []
    decode = [
        r for r in rows
        if r["tokens"] == 1 and r["library"] == "quantplug" and r.get("kernels") == "fast" and "adapters" not in r
    ]  # fmt: skip
    if decode:
        out.append(f"- Decode (1 token) wrapped/bare ≤ {TARGETS['decode_ratio']}, eager or graph-captured:")
        for r in decode:
            best = min(v for v in (r["wrapped_over_bare"], r.get("graph_wrapped_over_bare")) if v)
            peft = next(
                (p for p in rows if p["library"] == "peft" and p.get("wrapped_over_bare")
                 and (p["backend"], p["shape"], p["tokens"]) == (r["backend"], r["shape"], 1)), None
            )  # fmt: skip
            out.append(
                f"  - {r['backend']} {r['shape']}: eager {r['wrapped_over_bare']:.2f}, graph "
                f"{_fmt(r.get('graph_wrapped_over_bare'), '.2f')}: {_verdict(best, TARGETS['decode_ratio'])}; "
                f"PEFT {_fmt(peft and peft['wrapped_over_bare'], '.2f', 'n/a')} eager, "
                f"{_fmt(peft and peft.get('graph_wrapped_over_bare'), '.2f', 'n/a')} graph"
            )
    else:
        out.append("- Decode wrapped/bare: not measured in this file.")
    decodes = [r for r in rows if r["tokens"] == "decode" and r["library"] == "quantplug"]
    if decodes:
        out.append(
            f"- Whole-model decode unmerged/disabled ≥ {TARGETS['model_ratio']} (PEFT in the same run):"
        )
    for model in decodes:
        peft_model = next(
            (
                r
                for r in rows
                if r["tokens"] == "decode" and r["library"] == "peft" and r["backend"] == model["backend"]
            ),
            {},
        )
        graph = model.get("graph_unmerged_over_disabled")
        graph_verdict = (
            f"; CUDA-graph replay {graph:.2f}: {_verdict(graph, TARGETS['model_ratio'], lower_is_better=False)} "
            f"(PEFT {_fmt(peft_model.get('graph_unmerged_over_disabled'), '.2f', 'n/a')})"
            if graph
            else ""
        )
        out.append(
            f"  - {model['backend']} {model.get('variant') or ''}: eager `generate` {model['unmerged_over_disabled']:.2f}: "
            f"{_verdict(model['unmerged_over_disabled'], TARGETS['model_ratio'], lower_is_better=False)} "
            f"(PEFT {_fmt(peft_model.get('unmerged_over_disabled'), '.2f', 'n/a')}){graph_verdict}"
        )
    if not decodes:
        out.append("- Whole-model decode: not measured (no `--model` rows in this file).")
    trains = [
        r
        for r in rows
        if r["tokens"] == "train" and r["library"] == "quantplug" and r.get("speedup_over_peft")
    ]
    if trains:
        out.append(f"- QLoRA training tokens/s ≥ {TARGETS['training_speedup']}x PEFT, at no more memory:")
    for train in trains:
        mem = ""
        if train.get("peak_gib") and train.get("peft_peak_gib"):
            more = train["peak_gib"] > train["peft_peak_gib"]
            mem = (
                f"; peak memory {train['peak_gib']:.2f} GiB vs PEFT {train['peft_peak_gib']:.2f} GiB"
                f" ({'more: missed' if more else 'no more: met'})"
            )
        out.append(
            f"  - {train['backend']} {train.get('variant') or ''}: {train['speedup_over_peft']:.2f}x: "
            f"{_verdict(train['speedup_over_peft'], TARGETS['training_speedup'], lower_is_better=False)}{mem}"
        )
    if not trains:
        out.append("- QLoRA training vs PEFT: not measured (no `--model` training rows in this file).")
    mixed = [r for r in rows if "mixed_over_single" in r and r.get("kernels") == "fast"]
    if mixed:
        out.append(f"- 8 distinct adapters at 16 tokens ≤ {TARGETS['mixed_ratio']}x one adapter:")
        for r in mixed:
            best = min(v for v in (r["mixed_over_single"], r.get("graph_mixed_over_single")) if v)
            out.append(
                f"  - {r['backend']} {r['shape']}: eager {r['mixed_over_single']:.2f}x, graph "
                f"{_fmt(r.get('graph_mixed_over_single'), '.2f')}x: {_verdict(best, TARGETS['mixed_ratio'])}"
            )
    else:
        out.append("- Multi-adapter batch: not measured in this file.")
    return out


# --------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------


def run_bench(args: argparse.Namespace) -> int:
    if getattr(args, "render", None):
        md = Path(args.render).with_suffix(".md")
        render(Path(args.render), md)
        print(f"wrote {md}")
        return 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    if device == "cuda" and not torch.cuda.is_available():
        print("quantplug bench: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    argv = getattr(args, "argv", None) or sys.argv[2:]
    env = environment(device, argv)
    log(f"device {env['gpu']}, copy bandwidth {_fmt(env.get('copy_gbs'), '.0f')} GB/s")
    rows: list[dict] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(rows, indent=1, default=str) + "\n")

    if not getattr(args, "no_layers", False):
        torch.manual_seed(0)
        layer_rows(args, device, dtype, env, log, rows, save)
        save()
    if args.model:
        if not _importable("transformers"):
            log("--model needs transformers; skipped")
        else:
            torch.manual_seed(0)
            rows += model_rows(args, device, dtype, env, log)
    save()
    png = chart(rows, out.with_suffix(".png"))
    print(table(rows))
    print(f"\nwrote {out}" + (f" and {png}" if png else ""))
    return 0


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - convenience for python -m
    from quantplug.apps.cli import main as cli_main

    return cli_main(["bench", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

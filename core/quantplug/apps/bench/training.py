"""QLoRA training rows: quantplug against PEFT on identical quantized LLaMAs, measured so the figure reproduces.

One process holds both models. Each trial runs ``warmup`` steps, then times
``steps`` steps (GPU time between synchronisations); trials alternate
quantplug and PEFT, so drift in clocks or temperature hits both alike. A row
gives the median tokens/s with its min and max over the trials, the peak
memory (of the process: both models' weights stay resident, so the two
libraries' peaks differ only by what their steps allocate), the batch
shape, gradient checkpointing and the optimizer.

quantplug runs twice: eagerly, and (unless ``--no-compile``) as
``qp.prepare_for_training(..., compile=True)`` gives it, the whole model under
``torch.compile`` with each adapter layer one opaque op (``quantplug._lean``).
Both share one model, so both sit in the same memory; each row says which path
it timed.

The same run checks correctness: from the same initial adapter and batches
(of the timed shape, so the compiled model compiles once), each quantplug
path's loss curve over ``check_steps`` steps is compared with PEFT's and with
a reference that is the same adapter math in plain PyTorch
(``F.linear(x, W) + scale * (x @ A.T) @ B.T``) on the backend's dequantized
weights, to a stated tolerance.
"""

from __future__ import annotations

import statistics
import time

from quantplug.apps.bench.backends import importable, model_backend, peft_markers, variant_of
from quantplug.apps.bench.model import LINEARS, _llama, llama_shape

LOSS_TOLERANCE = 2e-2  # relative, per step: bf16 compute and different kernel orders, not a different update
PATHS = {
    "quantplug": "lean node, eager",
    "quantplug-compiled": "lean custom ops, torch.compile of the model",
    "peft": "PEFT, eager",
}


def _synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


class _Run:
    """One model, its optimizer and its batches; ``trial()`` times steps, ``losses()`` records a curve."""

    def __init__(self, model, params, device: str, batches) -> None:
        import torch

        self.model, self.params, self.device, self.batches = model, params, device, batches
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step(self, ids) -> float:
        loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def trial(self, warmup: int, steps: int) -> float:
        self.model.train()
        for i in range(warmup):
            self.step(self.batches[i % len(self.batches)])
        _synchronize(self.device)
        start = time.perf_counter()
        for i in range(steps):
            self.step(self.batches[i % len(self.batches)])
        _synchronize(self.device)
        elapsed = time.perf_counter() - start
        tokens = self.batches[0].numel() * steps
        return tokens / elapsed


def _plain_lora_reference(qp_model, dtype, device, config: dict):
    """The same LLaMA with each adapted linear replaced by ``W`` (the backend's dequantized weight) plus the
    same adapter, in plain PyTorch: what quantplug's training must reproduce."""
    import torch
    from torch import nn

    import quantplug as qp
    from quantplug.testing import tiny_llama

    class PlainLora(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.weight = nn.Parameter(layer.dequantized_weight().detach().to(dtype), requires_grad=False)
            bias = layer.bias
            self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
            self.A = nn.Parameter(layer.lora_A["default"].detach().clone())
            self.B = nn.Parameter(layer.lora_B["default"].detach().clone())
            self.scale = layer.scaling["default"]

        def forward(self, x):
            y = nn.functional.linear(x, self.weight, self.bias)
            return y + ((x.to(self.A.dtype) @ self.A.T) @ self.B.T * self.scale).to(y.dtype)

    with torch.device(device):
        reference = tiny_llama(0, **config, torch_dtype=dtype).to(dtype)
    reference.load_state_dict(
        {k: v for k, v in qp_model.state_dict().items() if "lora" not in k and ".base." not in k},
        strict=False,
    )
    for path, layer in qp.lora_layers(qp_model).items():
        reference.set_submodule(path, PlainLora(layer))
    reference.requires_grad_(False)
    reference.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for name, p in reference.named_parameters() if name.endswith((".A", ".B"))]
    for p in params:
        p.requires_grad_(True)
    return reference, params


def _copy_adapter_into_peft(qp_model, peft_model) -> None:
    import torch

    import quantplug as qp

    layers = qp.lora_layers(qp_model)
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            path = name.removeprefix("base_model.model.")
            if path in layers and hasattr(module, "lora_A"):
                module.lora_A["default"].weight.copy_(layers[path].lora_A["default"])
                module.lora_B["default"].weight.copy_(layers[path].lora_B["default"])


def training_rows(args, device: str, dtype, env: dict, log) -> list[dict]:
    """Rows ``tokens == "train"`` for quantplug and PEFT, and one ``"train-check"`` row (loss curves)."""
    import torch

    import quantplug as qp

    status = model_backend(args.backends, device)
    if status is None or args.no_peft or not importable("peft"):
        log("training rows need a quantizing backend usable here and PEFT; skipped")
        return []
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    backend, variant, quick = status.name, variant_of(status), args.quick
    compiled = not getattr(args, "no_compile", False)
    shape, llama = llama_shape(args)
    vocab = llama["vocab_size"]
    batch, seq = (2, 32) if quick else (4, 1024)
    warmup, steps, trials = (1, 2, 2) if quick else (3, 20, getattr(args, "trials", 5))
    check_steps, check_batch = (4 if quick else getattr(args, "check_steps", 50)), (batch, seq)
    checkpointing = True
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab, (batch, seq), generator=generator).to(device) for _ in range(4)]
    checks = [
        torch.randint(0, vocab, check_batch, generator=generator).to(device) for _ in range(check_steps)
    ]
    config = dict(r=args.rank, alpha=2 * args.rank, target_modules=LINEARS, init="random")

    torch.manual_seed(0)
    ours = _llama(backend, variant, device, dtype, llama)
    qp.attach(ours, qp.LoraConfig(**config))
    ours_compiled = qp.prepare_for_training(ours, gradient_checkpointing=checkpointing, compile=compiled)
    theirs = _llama(backend, variant, device, dtype, llama)
    peft_markers(theirs, theirs)
    theirs = get_peft_model(
        theirs,
        PeftConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=LINEARS, init_lora_weights=False),
    )
    _copy_adapter_into_peft(ours, theirs)
    theirs.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    theirs.enable_input_require_grads()

    # correctness first, from the same initial adapter: loss curves over check_steps
    reference, reference_params = _plain_lora_reference(ours, dtype, device, llama)
    ours_params, their_params = (
        qp.trainable_parameters(ours),
        [p for p in theirs.parameters() if p.requires_grad],
    )
    models = {"quantplug": (ours, ours_params), "peft": (theirs, their_params)}
    if compiled:
        models["quantplug-compiled"] = (ours_compiled, ours_params)
    curves = {}
    for name, (model, params) in [*models.items(), ("reference", (reference, reference_params))]:
        state = [p.detach().clone() for p in params]
        run = _Run(model, params, device, checks)
        model.train()
        curves[name] = [float(run.step(ids)) for ids in checks]
        with torch.no_grad():  # back to the initial adapter for the timed trials
            for p, saved in zip(params, state):
                p.copy_(saved)
    del reference, model, params, run  # the loop's last model is the dense reference: not in the trials' peak
    ours_names = [name for name in models if name != "peft"]
    worst = {
        (name, other): max(abs(a - b) / abs(b) for a, b in zip(curves[name], curves[other]))
        for name in ours_names
        for other in ("reference", "peft")
    }
    for (name, other), diff in worst.items():
        log(
            f"loss curves over {check_steps} steps: {name} vs {other} {diff:.2e} (tolerance {LOSS_TOLERANCE})"
        )

    # timed trials, alternating
    runs = {name: _Run(model, params, device, batches) for name, (model, params) in models.items()}
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    peaks: dict[str, float | None] = dict.fromkeys(runs)
    for trial in range(trials):
        for name, run in runs.items():
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            speeds[name].append(run.trial(warmup, steps))
            if device == "cuda":
                peak = torch.cuda.max_memory_allocated() / 2**30
                peaks[name] = max(peaks[name] or 0.0, peak)
            log(f"trial {trial + 1}/{trials} {name}: {speeds[name][-1]:.0f} tok/s")
    common = {
        "backend": backend, "variant": variant, "shape": shape, "rank": args.rank, "env": env, "tokens": "train",
        "kernel": "qlora", "batch": batch, "seq": seq, "gradient_checkpointing": checkpointing,
        "optimizer": "AdamW (fp32 states over compute-dtype adapters)", "warmup_steps": warmup,
        "timed_steps": steps, "trials": trials,
    }  # fmt: skip
    rows = []
    median = {name: statistics.median(values) for name, values in speeds.items()}
    for name in runs:
        rows.append({
            **common, "library": name, "path": PATHS[name], "compiled": name == "quantplug-compiled",
            "tokens_per_s": median[name], "tokens_per_s_min": min(speeds[name]),
            "tokens_per_s_max": max(speeds[name]), "tokens_per_s_trials": speeds[name], "peak_gib": peaks[name],
            "bare_us": 1e6 / median["peft"], "wrapped_us": 1e6 / median[name],
            "wrapped_over_bare": median["peft"] / median[name],
        })  # fmt: skip
        if name != "peft":
            rows[-1].update(speedup_over_peft=median[name] / median["peft"], peft_peak_gib=peaks["peft"])
    rows.append({
        **common, "tokens": "train-check", "library": "quantplug", "check_steps": check_steps,
        "check_batch": list(check_batch), "loss_tolerance": LOSS_TOLERANCE,
        "max_rel_loss_diff_vs_reference": max(worst[name, "reference"] for name in ours_names),
        "max_rel_loss_diff_vs_peft": max(worst[name, "peft"] for name in ours_names),
        "paths_checked": ours_names, "passed": max(worst.values()) <= LOSS_TOLERANCE, "loss_curves": curves,
    })  # fmt: skip
    return rows

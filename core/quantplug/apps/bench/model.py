"""Whole-model rows: a LLaMA (TinyLlama's 1.1B shape, random weights) with every linear quantized.

Greedy decode tokens/s with the adapter unmerged, disabled and merged (eager
``generate``, and one decode step replayed in a CUDA graph),
for quantplug and for PEFT on an identical model. Training rows: training.py.
"""

from __future__ import annotations

import contextlib
import time

from quantplug.apps.bench.backends import importable, model_backend, peft_markers, variant_of
from quantplug.apps.bench.timing import capture_graph

TINYLLAMA = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
    num_key_value_heads=4, max_position_embeddings=2048,
)  # fmt: skip
LLAMA_8B = dict(  # Llama-3-8B's shape
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=2048,
)  # fmt: skip
QUICK_LLAMA = dict(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256,
)  # fmt: skip
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODEL_SHAPES = {"1.1b": TINYLLAMA, "8b": LLAMA_8B}


def llama_shape(args) -> tuple[str, dict]:
    """The bench's model: (its name in the rows, its config), from ``--model-shape`` (``--quick``: tiny)."""
    if args.quick:
        return "llama-tiny", QUICK_LLAMA
    size = getattr(args, "model_shape", None) or "1.1b"
    return f"llama-{size}", MODEL_SHAPES[size]


def _llama(backend: str, variant: str | None, device: str, dtype, config: dict, seed: int = 0):
    import torch

    import quantplug as qp
    from quantplug.testing import tiny_llama

    with torch.device(device):
        model = tiny_llama(seed, **config, torch_dtype=dtype).to(dtype)
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


@contextlib.contextmanager
def _library_disabled(model):
    """Adapters disabled and every layer on the library's own forward (a fused kernel would serve the base
    of a disabled layer too): the baseline of the decode rows."""
    import quantplug as qp

    qp.use_reference_kernels(True)
    try:
        with qp.disable_adapters(model):
            yield
    finally:
        qp.use_reference_kernels(False)


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
        # disabled adapters leave every layer on the library's own kernels (issue 17's baseline)
        "graph_unmerged_over_library_disabled": on / off,
    }


def _linear_outputs(config: dict) -> dict[str, int]:
    """Each of :data:`LINEARS`' output features in a LLaMA of ``config``."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv = config["num_key_value_heads"] * (hidden // heads)
    ffn = config["intermediate_size"]
    return dict(
        q_proj=hidden, k_proj=kv, v_proj=kv, o_proj=hidden, gate_proj=ffn, up_proj=ffn, down_proj=hidden
    )


def without_linears(model, config: dict) -> int:
    """Replace every :data:`LINEARS` module of ``model`` with one that runs no kernel (it returns a zero
    output of the right width, a view of one buffer): what is left of a one-token decode step is what
    no linear kernel can speed up. Returns how many it replaced. The model is spoilt for anything else."""
    import torch

    class NoKernel(torch.nn.Module):
        runs_no_kernel = True

        def __init__(self, width: int, like: torch.Tensor):
            super().__init__()
            self.register_buffer("out", torch.zeros(1, 1, width, device=like.device, dtype=like.dtype))

        def forward(self, x):
            return self.out.expand(*x.shape[:-1], self.out.shape[-1])

    widths = _linear_outputs(config)
    like = next(model.parameters())
    found = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if name in widths and not getattr(child, "runs_no_kernel", False)
    ]
    for parent, name in found:
        setattr(parent, name, NoKernel(widths[name], like))
    return len(found)


def _graph_floor(model, config: dict, disabled: float, vocab: int, position: int, log) -> dict:
    """The graph-replayed decode step with no linear kernel (:func:`without_linears`), against the library's
    step with the adapters disabled: the most any linear kernel could give (``disabled``: its tokens/s)."""
    without_linears(model, config)
    try:
        floor = _graph_decode_tps(model, vocab, position)
    except Exception as exc:
        log(f"graph-captured decode without linears failed: {type(exc).__name__}: {str(exc)[:300]}")
        return {}
    log(f"graph-replayed decode without linear kernels: {floor:.1f} tok/s ({floor / disabled:.2f}x disabled)")
    return {"graph_no_linears_tokens_per_s": floor, "graph_ceiling_over_library_disabled": floor / disabled}


def model_rows(args, device: str, dtype, env: dict, log) -> list[dict]:
    import torch

    import quantplug as qp

    status = model_backend(args.backends, device)
    if status is None:
        log(f"--model: no backend usable on {device} among {args.backends or 'the installed ones'}; skipped")
        return []
    backend, variant = status.name, variant_of(status)
    quick = args.quick
    shape, config = llama_shape(args)
    vocab = config["vocab_size"]
    new_tokens = 8 if quick else 64
    prompt = torch.randint(0, vocab, (1, 16), device=device)
    rows = []
    base_row = {"backend": backend, "variant": variant, "shape": shape, "rank": args.rank, "env": env}

    def add(kind, library, kernel, bare, wrapped, **extra):
        rows.append({**base_row, "tokens": kind, "library": library, "kernel": kernel, "bare_us": bare,
                     "wrapped_us": wrapped, "wrapped_over_bare": wrapped / bare if bare and wrapped else None,
                     **extra})  # fmt: skip

    # quantplug
    model = _llama(backend, variant, device, dtype, config)
    qp.attach(model, qp.LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules=LINEARS, init="random"))
    unmerged = _decode_tps(model, prompt, new_tokens, device)
    with _library_disabled(model):
        disabled = _decode_tps(model, prompt, new_tokens, device)
    log(f"quantplug decode: unmerged {unmerged:.1f} tok/s, disabled {disabled:.1f} tok/s")
    graphed = _graph_decode_pair(model, lambda: _library_disabled(model), vocab, prompt.shape[1], log)
    try:
        qp.merge(model, mode="requantize")
        merged = _decode_tps(model, prompt, new_tokens, device)
    except Exception as exc:
        log(f"quantplug merge failed: {exc}")
        merged = None
    if graphed.get("graph_disabled_tokens_per_s"):  # last: it takes the model's linears out
        graphed |= _graph_floor(
            model, config, graphed["graph_disabled_tokens_per_s"], vocab, prompt.shape[1], log
        )
    # decode rows: times are microseconds per generated token; bare = adapter disabled
    add("decode", "quantplug", "unmerged", 1e6 / disabled, 1e6 / unmerged, tokens_per_s=unmerged,
        disabled_tokens_per_s=disabled, merged_tokens_per_s=merged,
        unmerged_over_disabled=unmerged / disabled, **graphed)  # fmt: skip
    del model
    if device == "cuda":
        torch.cuda.empty_cache()

    # PEFT on an identical model
    if args.no_peft or not importable("peft"):
        return rows
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    model = _llama(backend, variant, device, dtype, config)
    peft_markers(model, model)
    try:
        peft_model = get_peft_model(
            model,
            PeftConfig(
                r=args.rank, lora_alpha=2 * args.rank, target_modules=LINEARS, init_lora_weights=False
            ),
        )
    except Exception as exc:  # PEFT's dispatchers may raise on an unrelated install (peft 0.21: gptqmodel
        # without optimum): quantplug's rows stand, the log says why PEFT's are missing
        log(f"PEFT could not wrap the model, no PEFT rows: {type(exc).__name__}: {str(exc)[:200]}")
        return rows
    peft_unmerged = _decode_tps(peft_model, prompt, new_tokens, device)
    with peft_model.disable_adapter():
        peft_disabled = _decode_tps(peft_model, prompt, new_tokens, device)
    log(f"PEFT decode: unmerged {peft_unmerged:.1f} tok/s, disabled {peft_disabled:.1f} tok/s")
    peft_graphed = _graph_decode_pair(peft_model, peft_model.disable_adapter, vocab, prompt.shape[1], log)
    try:
        merged_model = peft_model.merge_and_unload()
        peft_merged = _decode_tps(merged_model, prompt, new_tokens, device)
    except Exception as exc:
        log(f"PEFT merge failed: {exc}")
        peft_merged = None
    add("decode", "peft", "unmerged", 1e6 / peft_disabled, 1e6 / peft_unmerged, tokens_per_s=peft_unmerged,
        disabled_tokens_per_s=peft_disabled, merged_tokens_per_s=peft_merged,
        unmerged_over_disabled=peft_unmerged / peft_disabled, **peft_graphed)  # fmt: skip
    return rows

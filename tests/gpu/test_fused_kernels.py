"""The plugins' fused quantized-GEMV + LoRA kernels (op ``fused_lora_linear``) against the reference path.

bnb NF4/FP4 (nested and plain absmax), hqq 4-bit g64, torchao int8
weight-only, gptqmodel's packed GPTQ 4-bit (g128 symmetric, g32
asymmetric) and its AWQ 4-bit GEMM layout (g128 and g32, asymmetric),
each built by its own library. For every layer:
fresh random inputs, bf16 and fp16, ranks 1-64, tokens 1-64 (above 16 the
kernel declines and the library's forward serves, or, where the plugin
says ``DENSE``, its dequantization kernel and cuBLAS: checked too), outputs
poisoned with NaN before each call, odd shapes, CUDA-graph capture and
``torch.compile(fullgraph=True)``, and mixed-adapter batches. Truth is the
layer's dequantized weight (the plugin's own ``quantplug_dequantize``) in
float64; the fast path must be as close to it as the reference path is.
"""

import importlib
import re

import pytest
import quantplug as qp
import torch
from quantplug.apps.bench import capture_graph
from quantplug.testing import Holder

RANKS = (1, 16, 64)
TOKENS = (1, 2, 3, 5, 16, 64)
# (backend, variant, plugin module); the bnb "nf4-plain" layer is built without nested absmax
FORMATS = [
    ("bnb", "nf4", "quantplug_bnb"),
    ("bnb", "fp4", "quantplug_bnb"),
    ("bnb", "nf4-plain", "quantplug_bnb"),
    ("hqq", "4bit-g64", "quantplug_hqq"),
    ("torchao", "int8wo", "quantplug_torchao"),
    ("gptq", "int4-g128-sym", "quantplug_gptqmodel.gptq"),
    ("gptq", "int4-g32-asym", "quantplug_gptqmodel.gptq"),
    ("awq", "int4-g128-asym", "quantplug_gptqmodel.awq"),
    ("awq", "int4-g32-asym", "quantplug_gptqmodel.awq"),
]
SHAPES = [(1024, 2048), (1000, 1536)]  # (out, in); the second: out not a multiple of any block
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


def kernels_module(plugin):
    pytest.importorskip("triton", reason="the fused kernels are Triton kernels")
    return importlib.import_module(f"{plugin}._cuda_kernels")


def require(backend):
    status = {row.name: row for row in qp.backends()}.get(backend)
    if status is None or not status.ok:
        pytest.skip(f"backend {backend!r} is not usable here: {getattr(status, 'reason', 'not installed')}")


def build_base(backend, variant, out_features, in_features, dtype):
    torch.manual_seed(out_features + in_features)
    linear = torch.nn.Linear(in_features, out_features, bias=True, device="cuda", dtype=dtype)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02)
        linear.bias.normal_(0, 0.1)
    if variant == "nf4-plain":
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(
            in_features,
            out_features,
            bias=True,
            compute_dtype=dtype,
            compress_statistics=False,
            quant_type="nf4",
        )
        layer.weight = bnb.nn.Params4bit(linear.weight.detach().cpu(), requires_grad=False, quant_type="nf4")
        layer.bias = torch.nn.Parameter(linear.bias.detach().cpu(), requires_grad=False)
        return layer.cuda()
    return qp.quantize(linear, backend, variant)


def wrapped(backend, variant, shape, dtype, ranks=RANKS):
    require(backend)
    base = build_base(backend, variant, *shape, dtype)
    model = qp.attach(
        Holder(base), qp.LoraConfig(r=ranks[0], alpha=2 * ranks[0], target_modules=["proj"], init="random")
    )
    layer = model.proj
    for r in ranks[1:]:
        layer.add_adapter(f"r{r}", qp.LoraConfig(r=r, alpha=r, target_modules=["proj"], init="random"), dtype)
    model.eval()
    return layer


def truth(layer, x, names):
    from quantplug._registry import hook

    # hqq's from the library itself: the plugin's dequantization on CUDA is one of the kernels under test
    if layer.backend == "hqq":
        weight = layer.base.dequantize().double()
    else:
        weight = hook().quantplug_dequantize(module=layer.base, backend=layer.backend).double()
    out = x.double() @ weight.T
    if layer.bias is not None:
        out = out + layer.bias.double()
    for name in names:
        A, B = layer.lora_A[name].double(), layer.lora_B[name].double()
        out = out + layer.scaling[name] * (x.double() @ A.T) @ B.T
    return out


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def poison(numel, dtype):
    """Fill a freed block of the caching allocator with NaN, so an unwritten output element shows."""
    block = torch.full((numel,), float("nan"), device="cuda", dtype=dtype)
    del block


def reference(layer, x):
    qp.use_reference_kernels(True)
    try:
        return layer(x)
    finally:
        qp.use_reference_kernels(False)


def adapter_name(r):
    return "default" if r == RANKS[0] else f"r{r}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=["1024x2048", "1000x1536"])
@pytest.mark.parametrize(("backend", "variant", "plugin"), FORMATS, ids=[f"{b}-{v}" for b, v, _ in FORMATS])
def test_fused_matches_reference(backend, variant, plugin, shape, dtype):
    fused = kernels_module(plugin)
    layer = wrapped(backend, variant, shape, dtype)
    kernel = layer.kernels.find("fused_lora_linear", backend, "cuda", dtype)
    registered = kernel is not None and kernel.priority > 0
    assert registered == fused.SERVE, f"{backend}: fused kernel registered {registered}, SERVE {fused.SERVE}"
    with torch.no_grad():
        for r in RANKS:
            layer.set_adapter(adapter_name(r))
            for tokens in TOKENS:
                x = torch.randn(tokens, shape[1], device="cuda", dtype=dtype)
                name = adapter_name(r)
                args = (x, layer.lora_A[name], layer.lora_B[name], layer.scaling[name])
                served = fused.fused_lora_linear(layer.base, x, *args, force=True)
                # above MAX_TOKENS a plugin with DENSE serves through its dequantization and cuBLAS
                assert (served is not None) == (tokens <= fused.MAX_TOKENS or fused.DENSE), (tokens, r)
                poison(tokens * shape[0] * 4, dtype)
                got = layer(x)
                want = truth(layer, x, [name])
                err, ref_err = rel(got, want), rel(reference(layer, x), want)
                assert torch.isfinite(got).all(), f"unwritten or non-finite output, r={r} tokens={tokens}"
                assert err < TOL[dtype] and err <= 2 * ref_err + 1e-3, (r, tokens, err, ref_err)


@pytest.mark.parametrize(("backend", "variant", "plugin"), FORMATS, ids=[f"{b}-{v}" for b, v, _ in FORMATS])
def test_fused_base_only_and_three_dim_input(backend, variant, plugin):
    """``A=None`` computes the base alone (the tuning script's bare kernel); inputs may be (batch, seq, in)."""
    fused = kernels_module(plugin)
    dtype = torch.bfloat16
    layer = wrapped(backend, variant, (768, 1024), dtype, ranks=(8,))
    with torch.no_grad():
        x = torch.randn(2, 3, 1024, device="cuda", dtype=dtype)
        base = fused.fused_lora_linear(layer.base, x, None, None, None, 0.0, force=True)
        assert base.shape == (2, 3, 768)
        assert rel(base, truth(layer, x, [])) < TOL[dtype]
        got = layer(x)
        assert got.shape == (2, 3, 768)
        assert rel(got, truth(layer, x, ["default"])) < TOL[dtype]


@pytest.mark.parametrize(("backend", "variant", "plugin"), FORMATS, ids=[f"{b}-{v}" for b, v, _ in FORMATS])
@pytest.mark.parametrize("tokens", [1, 4, 16])
def test_cuda_graph_replays_fresh_inputs(backend, variant, plugin, tokens):
    """Captured once, replayed on new inputs: the one-launch path's counters reset on every replay."""
    fused = kernels_module(plugin)
    dtype = torch.bfloat16
    layer = wrapped(backend, variant, (2048, 2048), dtype, ranks=(16,))
    static_x = torch.randn(tokens, 2048, device="cuda", dtype=dtype)
    with torch.no_grad():
        outputs = []
        graph = capture_graph(lambda: outputs.append(layer(static_x)), repeat=1)
        if fused.ONE_LAUNCH:
            assert layer.base in fused._sync, "the eager warm-up did not give the layer its counters"
        static_y = outputs[-1]
        for _ in range(3):
            fresh = torch.randn_like(static_x)
            static_x.copy_(fresh)
            graph.replay()
            want = truth(layer, fresh, ["default"])
            assert rel(static_y, want) < TOL[dtype]
        if fused.ONE_LAUNCH:
            assert fused._sync[layer.base][:3].tolist() == [0, 0, 0]


@pytest.mark.parametrize(("backend", "variant", "plugin"), FORMATS, ids=[f"{b}-{v}" for b, v, _ in FORMATS])
def test_one_and_two_launch_paths(backend, variant, plugin):
    """Both ways to run the adapter: the shrink as its own launch (LORA=1) and inside the GEMV launch (LORA=2)."""
    fused = kernels_module(plugin)
    dtype = torch.bfloat16
    layer = wrapped(backend, variant, (1024, 2048), dtype, ranks=(16,))
    x = torch.randn(2, 2048, device="cuda", dtype=dtype)  # (one token takes the GEMV kernel: shrink launched)
    args = (x, layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"])
    with torch.no_grad():
        for mode in (1, 2):
            got = fused.fused_lora_linear(layer.base, x, *args, lora_mode=mode, force=True)
            assert rel(got, truth(layer, x, ["default"])) < TOL[dtype], mode


@pytest.mark.parametrize(("backend", "variant", "plugin"), FORMATS, ids=[f"{b}-{v}" for b, v, _ in FORMATS])
@pytest.mark.parametrize("shape", SHAPES, ids=["1024x2048", "1000x1536"])
def test_one_token_paths(backend, variant, plugin, shape):
    """One token (the GEMV kernel): with and without programmatic dependent launch, unsplit and split-K
    over three slices, base alone and with the adapter, eager and replayed from a CUDA graph on fresh
    inputs."""
    fused = kernels_module(plugin)
    dtype = torch.bfloat16
    layer = wrapped(backend, variant, shape, dtype, ranks=(16,))
    A, B, s = layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"]
    gemv_config = fused.CONFIGS["gemv"]
    k_split = (shape[1] // 3 // 256 + 1) * 256  # three slices of whole 256-input blocks
    split = (gemv_config[0], 256, gemv_config[2], gemv_config[3], shape[1] // k_split + 1)
    with torch.no_grad():
        for pdl, config, lora in [(p, c, lo) for p in (True, False) for c in (None, split) for lo in (0, 1)]:
            static_x = torch.randn(1, shape[1], device="cuda", dtype=dtype)

            def call(static_x=static_x, lora=lora, pdl=pdl, config=config):
                args = (static_x, A, B, s) if lora else (None, None, None, 0.0)
                return fused.fused_lora_linear(
                    layer.base, static_x, *args, force=True, pdl=pdl, config=config
                )

            poison(shape[0] * 4, dtype)
            eager = call()
            names = ["default"] if lora else []
            case = (pdl, config, lora)
            assert torch.isfinite(eager).all(), case
            assert rel(eager, truth(layer, static_x, names)) < TOL[dtype], case
            outputs = []
            graph = capture_graph(lambda outputs=outputs, call=call: outputs.append(call()), repeat=1)
            for _ in range(2):
                static_x.copy_(torch.randn_like(static_x))
                graph.replay()
                assert rel(outputs[-1], truth(layer, static_x, names)) < TOL[dtype], case


@pytest.mark.parametrize(("backend", "variant", "plugin"), FORMATS, ids=[f"{b}-{v}" for b, v, _ in FORMATS])
def test_one_token_input_views(backend, variant, plugin):
    """One token given as a view at an odd element offset (not 4- or 16-byte aligned) and as a strided
    view: served, correct, and the view itself untouched."""
    fused = kernels_module(plugin)
    dtype = torch.bfloat16
    layer = wrapped(backend, variant, (1024, 2048), dtype, ranks=(16,))
    A, B, s = layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"]
    buffer = torch.randn(2 * 2048 + 8, device="cuda", dtype=dtype)
    views = {
        "odd offset": buffer[3 : 3 + 2048].view(1, 2048),
        "strided": buffer[1 : 1 + 2 * 2048 : 2].view(1, 2048),
    }
    with torch.no_grad():
        for name, x in views.items():
            before = buffer.clone()
            got = fused.fused_lora_linear(layer.base, x, x, A, B, s, force=True)
            assert got is not None, name
            assert rel(got, truth(layer, x, ["default"])) < TOL[dtype], name
            assert torch.equal(buffer, before), name


@pytest.mark.parametrize(("backend", "variant", "plugin"), FORMATS, ids=[f"{b}-{v}" for b, v, _ in FORMATS])
def test_torch_compile_fullgraph(backend, variant, plugin):
    kernels_module(plugin)
    dtype = torch.bfloat16
    layer = wrapped(backend, variant, (1024, 2048), dtype, ranks=(16,))
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        for tokens in (1, 16):
            x = torch.randn(tokens, 2048, device="cuda", dtype=dtype)
            assert rel(compiled(x), truth(layer, x, ["default"])) < TOL[dtype]


@pytest.mark.parametrize(("backend", "variant", "plugin"), FORMATS, ids=[f"{b}-{v}" for b, v, _ in FORMATS])
def test_mixed_adapter_batch(backend, variant, plugin):
    """``adapter_names=`` rows beside the fused single-adapter path: each row equals its own adapter's output."""
    kernels_module(plugin)
    dtype = torch.bfloat16
    layer = wrapped(backend, variant, (1024, 2048), dtype, ranks=(4, 16))
    names = ["default", "r16", "__base__", "r16"]
    x = torch.randn(len(names), 2048, device="cuda", dtype=dtype)
    with torch.no_grad():
        got = layer(x, adapter_names=names)
        for row, name in enumerate(names):
            want = truth(layer, x[row : row + 1], [] if name == "__base__" else [name])
            assert rel(got[row : row + 1], want) < TOL[dtype], name
            if name != "__base__":
                layer.set_adapter(name)
                assert rel(layer(x[row : row + 1]), want) < TOL[dtype], name


FUSED_KERNEL_NAME = re.compile(r"_(nf4|hqq4|int8|gptq4|awq4)_(word_)?(gemv|lora)_kernel")


def fused_kernels_launched(fn):
    """The names of the fused Triton kernels ``fn()`` launches (from the CUDA profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if FUSED_KERNEL_NAME.search(e.name)}


@pytest.mark.parametrize(("backend", "variant", "plugin"), FORMATS, ids=[f"{b}-{v}" for b, v, _ in FORMATS])
@pytest.mark.parametrize("tokens", [1, 16])
def test_disabled_and_mixed_batches_run_the_fused_base(backend, variant, plugin, tokens):
    """With no adapter to add (disabled, ``adapter_names=`` batches) the layer's base is the fused kernel
    with ``A=None``; under forced references it is the library's own forward. A plugin with
    ``LIBRARY_EAGER_ONE_TOKEN_BASE`` (bnb) leaves one token's base to its library eagerly after the
    layer's first such call, and its fused kernel serves that call inside a CUDA-graph capture."""
    fused = kernels_module(plugin)
    eager_fused = not (tokens == 1 and getattr(fused, "LIBRARY_EAGER_ONE_TOKEN_BASE", False))
    dtype = torch.bfloat16
    layer = wrapped(backend, variant, (1024, 2048), dtype, ranks=(4, 16))
    x = torch.randn(tokens, 2048, device="cuda", dtype=dtype)
    names = [("default", "r16", "__base__")[i % 3] for i in range(tokens)]
    with torch.no_grad():
        layer.disabled = True
        try:
            first = fused_kernels_launched(lambda: layer(x))
            assert first, "the layer's first base-alone call is not the fused kernel (nothing loads it)"
            launched = fused_kernels_launched(lambda: layer(x))
            assert bool(launched) == eager_fused, f"eager disabled base: fused kernels {launched}"
            poison(tokens * 1024, dtype)
            assert rel(layer(x), truth(layer, x, [])) < TOL[dtype]
            if not eager_fused:
                assert_captured_base_is_fused(layer, x, dtype)
            qp.use_reference_kernels(True)
            try:
                assert not fused_kernels_launched(lambda: layer(x)), "forced references still launch it"
            finally:
                qp.use_reference_kernels(False)
        finally:
            layer.disabled = False
        launched = fused_kernels_launched(lambda: layer(x, adapter_names=names))
        assert bool(launched) == eager_fused, f"eager mixed batch's base: fused kernels {launched}"
        got = layer(x, adapter_names=names)
        for row, name in enumerate(names):
            want = truth(layer, x[row : row + 1], [] if name == "__base__" else [name])
            assert rel(got[row : row + 1], want) < TOL[dtype], (row, name)


def assert_captured_base_is_fused(layer, x, dtype):
    """The disabled layer's base, captured in a CUDA graph, is not the library's forward (its eager
    warm-up is), and the replay on a fresh input is right."""
    library, captured = layer.base_forward, []

    def spy(inputs):
        captured.append(torch.cuda.is_current_stream_capturing())
        return library(inputs)

    layer.base_forward = spy
    static_x, outputs = x.clone(), []
    try:
        graph = capture_graph(lambda: outputs.append(layer(static_x)), repeat=1)
    finally:
        del layer.base_forward
    assert False in captured and True not in captured, captured
    static_x.copy_(torch.randn_like(static_x))
    graph.replay()
    assert rel(outputs[-1], truth(layer, static_x, [])) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    ("shape", "group"),
    [
        (SHAPES[0], 64),
        (SHAPES[1], 64),
        ((2048, 5632), 64),
        ((6, 64), 64),
        ((1000, 1536), 128),
        ((64, 4096), 1024),
    ],
    ids=["1024x2048", "1000x1536", "2048x5632", "6x64", "1000x1536-g128", "64x4096-g1024"],
)
def test_hqq_dequantize_kernel_is_the_library_bit_for_bit(shape, group, dtype):
    """hqq's one-launch Triton dequantization (the lean backward's dx, the forward above 16 tokens) equals
    ``HQQLinear.dequantize()`` exactly, at groups of 64 to 1024 inputs, and the plugin's
    ``quantplug_dequantize`` takes it on CUDA."""
    require("hqq")
    kernels = kernels_module("quantplug_hqq")
    from quantplug_hqq import layers

    if group == 64:
        base = build_base("hqq", "4bit-g64", *shape, dtype)
    else:  # a group size no variant names: built with hqq's own config
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        torch.manual_seed(group)
        weight = torch.randn(shape, device="cuda", dtype=dtype) * 0.02
        config = BaseQuantizeConfig(nbits=4, group_size=group, axis=1)
        base = HQQLinear.from_weights(weight, None, config, compute_dtype=dtype, device="cuda")
    want = base.dequantize()
    poison(want.numel(), dtype)
    got = kernels.dequantize(base)
    assert got is not None and got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want), (got != want).sum().item()
    assert torch.equal(layers.dequantize(base), want)


@pytest.mark.parametrize("kernel", ["gemv", "word"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=["1024x2048", "1000x1536"])
def test_hqq_one_token_configs(shape, dtype, kernel):
    """hqq's one-token kernels (the float32 GEMV and the word GEMV, products in the compute dtype) over
    several tiles against the truth, unsplit and split-K, with a last step that runs past the row (BLOCK_K
    1024 over 1536 inputs), bf16 and fp16; as close to it as the library's forward, within the bound the
    layer tests use."""
    fused = kernels_module("quantplug_hqq")
    layer = wrapped("hqq", "4bit-g64", shape, dtype, ranks=(16,))
    A, B, s = layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"]
    with torch.no_grad():
        for config in [(4, 512, 4, 1, 1), (2, 256, 4, 1, 3), (8, 1024, 8, 1, 2), fused.CONFIGS[kernel]]:
            x = torch.randn(1, shape[1], device="cuda", dtype=dtype)
            poison(shape[0] * 4, dtype)
            got = fused.fused_lora_linear(layer.base, x, x, A, B, s, config=config, force=True, kernel=kernel)
            assert torch.isfinite(got).all(), config
            want = truth(layer, x, ["default"])
            err, ref_err = rel(got, want), rel(reference(layer, x), want)
            assert err < TOL[dtype] and err <= 2 * ref_err + 1e-3, (config, err, ref_err)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=["1024x2048", "1000x1536"])
def test_hqq_tensor_core_kernel_configs(shape, dtype):
    """hqq's tensor-core kernel (two weights per instruction in inline PTX, rounded as hqq rounds) at one
    token (``kernel="mma"``) and at 16, over several tiles and pipeline depths, unsplit and split-K (three
    slices), base alone and with the adapter, against the truth."""
    fused = kernels_module("quantplug_hqq")
    layer = wrapped("hqq", "4bit-g64", shape, dtype, ranks=(16,))
    A, B, s = layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"]
    configs = [(32, 64, 4, 4, 1), (64, 64, 4, 3, 3), (32, 1024, 8, 2, 1)]
    with torch.no_grad():
        for config, tokens, lora in [(c, t, lo) for c in configs for t in (1, 16) for lo in (0, 1)]:
            x = torch.randn(tokens, shape[1], device="cuda", dtype=dtype)
            args = (x, A, B, s) if lora else (None, None, None, 0.0)
            poison(tokens * shape[0] * 4, dtype)
            got = fused.fused_lora_linear(layer.base, x, *args, config=config, force=True, kernel="mma")
            case = (config, tokens, lora)
            assert got is not None and torch.isfinite(got).all(), case
            assert rel(got, truth(layer, x, ["default"] if lora else [])) < TOL[dtype], case


def test_doctor_names_the_kernel_each_layer_uses(capsys):
    """``quantplug doctor``'s "layer on cuda" column: the plugin's fused kernel where its SERVE is on, else
    ``library`` (the library's forward with the adapter kernel beside it)."""
    from quantplug.apps.cli import main

    names = {
        "bnb": "triton-nf4-lora",
        "hqq": "triton-hqq4-lora",
        "torchao": "triton-int8-lora",
        "gptq": "triton-gptq4-lora",
        "awq": "triton-awq4-lora",
    }
    rows = {row.name: row for row in qp.backends()}
    assert main(["doctor"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows_shown = lines[2 : lines.index("") if "" in lines else len(lines)]  # the table, up to its blank line
    table = {line.split()[0]: line.split()[-1] for line in rows_shown}
    for backend, plugin in {(b, p) for b, _, p in FORMATS}:
        if backend not in rows or not rows[backend].ok:
            continue
        serve = kernels_module(plugin).SERVE
        assert rows[backend].kernels["fused_lora_linear@cuda"] == (names[backend] if serve else "reference")
        assert table[backend] == (names[backend] if serve else "library"), backend


@pytest.mark.parametrize(("backend", "variant", "plugin"), FORMATS, ids=[f"{b}-{v}" for b, v, _ in FORMATS])
def test_older_gpus(backend, variant, plugin, monkeypatch):
    """On an Ampere-class GPU (sm_86 here, faked) the kernels serve without programmatic dependent launch,
    which ptxas rejects below sm_90; below sm_80 they decline and the library's forward serves the layer."""
    from quantplug.plugin import fused_lora as fl

    fused = kernels_module(plugin)
    dtype = torch.bfloat16
    layer = wrapped(backend, variant, SHAPES[1], dtype, ranks=(16,))
    A, B, s = layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"]
    with torch.no_grad():
        for tokens in (1, 16):
            x = torch.randn(tokens, SHAPES[1][1], device="cuda", dtype=dtype)
            monkeypatch.setattr(fl, "_capability", lambda index: (8, 6))
            got = fused.fused_lora_linear(layer.base, x, x, A, B, s, force=True)
            assert got is not None and rel(got, truth(layer, x, ["default"])) < TOL[dtype], tokens
            monkeypatch.setattr(fl, "_capability", lambda index: (7, 5))
            assert fused.fused_lora_linear(layer.base, x, x, A, B, s, force=True) is None
            assert rel(layer(x), truth(layer, x, ["default"])) < TOL[dtype], tokens

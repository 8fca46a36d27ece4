"""The adapter forward on CUDA: no host synchronisation, CUDA-graph capture, torch.compile(fullgraph=True).

On the linear backend always, and on bitsandbytes 4-bit where bitsandbytes
and its plugin are installed on the device.
"""

import pytest
import quantplug as qp
import torch
from quantplug.apps.bench import capture_graph

DTYPE = torch.bfloat16


class Holder(torch.nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj


def wrapped_layer(backend, variant=None, out_features=1024, in_features=2048):
    if backend != "linear":
        status = {row.name: row for row in qp.backends()}.get(backend)
        if status is None or not status.ok:
            pytest.skip(
                f"backend {backend!r} is not usable here: {getattr(status, 'reason', 'not installed')}"
            )
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=True, device="cuda", dtype=DTYPE)
    base = linear if backend == "linear" else qp.quantize(linear, backend, variant)
    model = qp.attach(Holder(base), qp.LoraConfig(r=16, alpha=32, target_modules=["proj"], init="random"))
    model.eval()
    return model.proj


BACKENDS = [("linear", None), ("bnb", "nf4")]


def capture(fn):
    """``fn()`` captured in a CUDA graph after a warm-up (quantplug.apps.bench.capture_graph): (graph, output)."""
    outputs = []
    graph = capture_graph(lambda: outputs.append(fn()))
    return graph, outputs[-1]  # the last call is the captured one


@pytest.mark.parametrize(("backend", "variant"), BACKENDS)
@pytest.mark.parametrize("tokens", [1, 16])
def test_forward_never_synchronizes(backend, variant, tokens):
    layer = wrapped_layer(backend, variant)
    x = torch.randn(tokens, layer.in_features, device="cuda", dtype=DTYPE)
    with torch.no_grad():
        layer(x)  # first call: Triton compiles, caches fill
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            try:
                layer.base(x)
            except RuntimeError as exc:
                pytest.skip(f"the {backend} base layer itself synchronizes: {exc}")
            layer(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize(("backend", "variant"), BACKENDS)
@pytest.mark.parametrize("tokens", [1, 16])
def test_cuda_graph_capture_replays_the_eager_result(backend, variant, tokens):
    layer = wrapped_layer(backend, variant)
    static_x = torch.randn(tokens, layer.in_features, device="cuda", dtype=DTYPE)
    with torch.no_grad():
        graph, static_y = capture(lambda: layer(static_x))
        for _ in range(2):
            fresh = torch.randn_like(static_x)
            static_x.copy_(fresh)
            graph.replay()
            expected = layer(fresh)  # eager takes the cuBLAS path, the graph the Triton one: rounding differs
            torch.testing.assert_close(static_y, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(("backend", "variant"), BACKENDS)
def test_torch_compile_fullgraph(backend, variant):
    # Each test compiles a fresh layer's forward; earlier tests' entries would count against
    # Dynamo's recompile limit (8 per code object), which fullgraph turns into a failure.
    torch._dynamo.reset()
    layer = wrapped_layer(backend, variant)
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        for tokens in (1, 16):
            x = torch.randn(tokens, layer.in_features, device="cuda", dtype=DTYPE)
            expected = layer(x)
            got = compiled(x)
            torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


def test_training_step_on_cuda_uses_autograd_path():
    layer = wrapped_layer("linear")
    x = torch.randn(4, 8, layer.in_features, device="cuda", dtype=DTYPE)
    out = layer(x)
    out.float().square().mean().backward()
    assert layer.lora_A["default"].grad is not None
    assert layer.lora_B["default"].grad is not None


@pytest.mark.parametrize("fused", ["served", "off"])
@pytest.mark.parametrize(("backend", "variant"), BACKENDS)
def test_graph_runs_the_shrink_beside_the_base_and_matches_the_reference(
    backend, variant, fused, monkeypatch
):
    """A chain of three adapter layers (the middle one with two adapters) captured in one graph: the
    first adapter's shrink goes to the side stream (lora_linear), or, where the plugin's fused kernel
    serves the layer, into that kernel's launches (no side stream); the replay equals the references."""
    import importlib

    from quantplug import _kernels as kernels
    from quantplug import _triton as triton_kernels

    layers = [wrapped_layer(backend, variant, 2048, 2048) for _ in range(3)]
    found = layers[0].kernels.find("fused_lora_linear", backend, "cuda", DTYPE)
    serves = found is not None and found.priority > 0
    if fused == "off" and serves:  # the plugin's kernel declines every call: lora_linear serves
        plugin = importlib.import_module(found.fn.__module__)
        monkeypatch.setattr(plugin, "SERVE", False)
        serves = False
    elif fused == "served" and not serves:
        pytest.skip(f"{backend}: no fused kernel serves here (the 'off' case covers it)")
    model = torch.nn.Sequential(*layers)
    torch.manual_seed(1)
    layers[1].add_adapter("second", qp.LoraConfig(r=8, alpha=8, target_modules=["x"], init="random"), DTYPE)
    qp.set_adapter(model, ["default", "second"])
    static_x = torch.randn(1, 2048, device="cuda", dtype=DTYPE)
    with torch.no_grad():
        triton_kernels._side_streams.clear()  # the warm-up runs uncaptured: only the capture adds one
        graph, static_y = capture(lambda: model(static_x))
        if serves:
            assert not triton_kernels._side_streams, "the fused kernel should have served, not lora_linear"
        else:
            assert triton_kernels._side_streams, "lora_linear did not take the side-stream path under capture"
        for _ in range(2):
            fresh = torch.randn_like(static_x)
            static_x.copy_(fresh)
            graph.replay()
            kernels.use_reference_kernels(True)
            try:
                expected = model(fresh)
            finally:
                kernels.use_reference_kernels(False)
            torch.testing.assert_close(static_y, expected, rtol=2e-2, atol=2e-2)

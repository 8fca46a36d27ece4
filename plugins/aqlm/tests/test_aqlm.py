"""The AQLM backend on layers built by aqlm itself (1.1.7), on CPU.

Layers come two ways: ``qp.quantize`` (this plugin's calibration-free
quantizer filling a real ``aqlm.QuantizedLinear``), and aqlm's constructor
filled with random codes, as a checkpoint fills it. The reference for every
forward is plain PyTorch on aqlm's own decoder (``aqlm.utils._dequantize_weight``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys

import aqlm
import pytest
import quantplug as qp
import torch
from aqlm.inference_kernels.dequantization import dequantize_gemm
from aqlm.utils import _dequantize_weight, pack_int_data, unpack_int_data
from packaging.specifiers import SpecifierSet
from quantplug._registry import hook, load_plugins
from quantplug.testing import BackendConformance, random_linear, relative_error
from quantplug_aqlm import codec, layout
from quantplug_aqlm.lora import AqlmLoraLayer
from torch import nn

# aqlm's CPU kernel for 2^8-entry codebooks needs its [cpu] extra (numba, scipy). Where they are
# installed, pin numba to one thread: its kernel's prange loop races on the output (quantplug_aqlm.lora).
HAS_NUMBA = all(importlib.util.find_spec(name) is not None for name in ("numba", "scipy"))
if HAS_NUMBA:
    import numba

    numba.set_num_threads(1)

VARIANTS = list(codec.VARIANTS)


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x, **kwargs):
        return self.proj(x, **kwargs)


def dense(out_features: int = 64, in_features: int = 128, bias: bool = True, seed: int = 0) -> nn.Linear:
    return random_linear(in_features, out_features, bias=bias, seed=seed)


def small(variant: str) -> tuple[int, int]:
    """(out, in) per variant: 2^16-entry codebooks cost 256x more per group, so smaller layers."""
    return (32, 64) if variant == "1x16-g8" else (64, 128)


def quantized(variant: str, bias: bool = True):
    return qp.quantize(dense(*small(variant), bias=bias), "aqlm", variant)


def library_layer(
    in_features=128,
    out_features=64,
    num_codebooks=1,
    nbits=8,
    in_group=8,
    out_group=1,
    bias=True,
    dtype=torch.float32,
    packed_by_aqlm=False,
    seed=0,
):
    """aqlm's own constructor, filled with random codes the way a checkpoint fills it."""
    torch.manual_seed(seed)
    layer = aqlm.QuantizedLinear(
        in_features, out_features, in_group, out_group, num_codebooks, nbits, bias=bias, dtype=dtype
    )
    with torch.no_grad():
        layer.codebooks.normal_(0, 0.05)
        codes = torch.randint(0, 2**nbits, tuple(layer.codes.shape))
        if packed_by_aqlm:  # what AQLM's converter does: an inference-mode tensor
            layer.codes.data = pack_int_data(codes, nbits)
        else:
            layer.codes.copy_(codec.pack_codes(codes, nbits))
        layer.scales.uniform_(0.5, 1.5)
        if bias:
            layer.bias.normal_(0, 0.1)
    return layer


def library_dequant(layer) -> torch.Tensor:
    """aqlm's decoder on the codes as stored (valid before the first forward only)."""
    return _dequantize_weight(
        unpack_int_data(layer.codes, layer.nbits_per_codebook), layer.codebooks, layer.scales
    )


def wrapped(layer, **config) -> Holder:
    model = Holder(layer)
    settings = {"r": 8, "alpha": 16.0, "target_modules": ["proj"], "init": "random"}
    settings.update(config)
    qp.attach(model, qp.LoraConfig(**settings))
    return model


def reference(x, weight, bias):
    out = x.double() @ weight.double().T
    return out if bias is None else out + bias.double()


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(before, module) -> bool:
    after = module.state_dict()
    return before.keys() == after.keys() and all(
        before[k].dtype == after[k].dtype
        and before[k].shape == after[k].shape
        and torch.equal(before[k], after[k])
        for k in before
    )


def dequant(module):
    return hook().quantplug_dequantize(module=module, backend="aqlm")


def scaled_adapter(model, fraction: float) -> None:
    """Rescale B so that ‖ΔW‖ = fraction · ‖W‖, the size of a trained adapter."""
    layer = model.proj
    with torch.no_grad():
        W = dequant(layer.base).float()
        layer.lora_B["default"].mul_(fraction * W.norm() / layer.delta_weight("default").norm())


# -- quantplug_backend_info / probe -------------------------------------------------


def test_import_is_light():
    code = "import sys, quantplug_aqlm; assert 'torch' not in sys.modules and 'aqlm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_version_probe_and_info():
    status = load_plugins().status("aqlm")
    assert status.ok, (status.status, status.reason)
    found = importlib.metadata.version("aqlm")
    requirement = status.info.requires[0]
    assert requirement.dist == "aqlm" and requirement.module == "aqlm"
    assert found in SpecifierSet(requirement.specifier)
    assert status.found == found
    info = status.info
    assert info.variants[0] == "2x8-g8" and set(info.variants) == set(codec.VARIANTS)
    assert info.merge_modes == ("requantize", "dense")
    assert "shardable" in info.limits and not info.shardable


# -- quantplug_detect_layer ------------------------------------------------------


def test_detect():
    layer = library_layer()
    assert qp.detect(layer) == "aqlm"

    class Subclass(aqlm.QuantizedLinear):
        pass

    assert qp.detect(Subclass(16, 8, 8, 1, 1, 8)) == "aqlm"
    for other in (nn.Linear(8, 4), nn.Embedding(4, 4), nn.LayerNorm(4)):
        assert hook().quantplug_detect_layer(module=other, model=None) != "aqlm"
    assert qp.detect(nn.Linear(8, 4)) == "linear"


def test_detect_vendored_class_only_with_the_model_hint():
    class QuantizedLinear(nn.Module):  # a copy of aqlm's class outside the aqlm package
        def __init__(self):
            super().__init__()
            self.codebooks = self.codes = self.scales = None
            self.in_group_size, self.out_group_size, self.num_codebooks, self.nbits_per_codebook = 8, 1, 1, 8

    class Config:
        quantization_config = {"quant_method": "aqlm"}

    model = nn.Module()
    model.config = Config()
    vendored = QuantizedLinear()
    assert hook().quantplug_detect_layer(module=vendored, model=None) is None
    assert hook().quantplug_detect_layer(module=vendored, model=model) == "aqlm"
    model.config.quantization_config = {"quant_method": "gptq"}
    assert hook().quantplug_detect_layer(module=vendored, model=model) is None


# -- quantplug_quantize ------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_quantize_builds_a_real_aqlm_layer(variant):
    linear = dense(*small(variant))
    layer = qp.quantize(linear, "aqlm", variant)
    fmt = codec.VARIANTS[variant]
    assert type(layer) is aqlm.QuantizedLinear
    assert (layer.num_codebooks, layer.nbits_per_codebook, layer.in_group_size, layer.out_group_size) == (
        fmt.num_codebooks,
        fmt.nbits,
        fmt.in_group_size,
        fmt.out_group_size,
    )
    assert layer.codes.dtype == (torch.int16 if fmt.nbits == 16 else torch.int8)
    assert not any(t.is_inference() or t.requires_grad for t in layer.parameters())
    assert torch.equal(layer.bias, linear.bias)
    W = dequant(layer)
    assert torch.equal(W, library_dequant(layer))
    error = relative_error(W, linear.weight)
    # 1 bit per weight (1x8), 2 bits (2x8); a 2^16 codebook holds every group of a small layer
    assert error < {"1x8-g8": 0.5, "2x8-g8": 0.25, "1x16-g8": 1e-6}[variant], error
    again = qp.quantize(linear, "aqlm", variant)
    assert torch.equal(again.codes, layer.codes) and torch.equal(again.codebooks, layer.codebooks)


def test_quantize_rejects_unknown_variant_and_bad_shapes():
    with pytest.raises(ValueError, match="2x8-g8"):
        qp.quantize(dense(), "aqlm", "3x5-g7")
    with pytest.raises(ValueError, match="multiples"):
        qp.quantize(nn.Linear(100, 8), "aqlm", "2x8-g8")


# -- quantplug_dequantize ----------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        dict(num_codebooks=1, nbits=8),
        dict(num_codebooks=2, nbits=8),
        dict(num_codebooks=1, nbits=16, in_features=64, out_features=32),
        dict(num_codebooks=1, nbits=8, out_group=2),
        dict(num_codebooks=2, nbits=8, dtype=torch.bfloat16),
        dict(num_codebooks=1, nbits=8, bias=False),
    ],
    ids=["1x8", "2x8", "1x16", "1x8-out2", "2x8-bf16", "nobias"],
)
def test_dequantize_is_aqlms_decoder(config):
    layer = library_layer(**config)
    before = state(layer)
    W = dequant(layer)
    assert W.shape == (layer.out_features, layer.in_features) and W.dtype == layer.codebooks.dtype
    assert torch.equal(W, library_dequant(layer))
    assert hook().quantplug_compute_dtype(module=layer, backend="aqlm") == layer.codebooks.dtype
    assert same_state(before, layer)


def test_dequantize_matches_the_library_forward_1x16():
    # on CPU aqlm runs 2^16 codebooks through dequantize_gemm, its pure-PyTorch kernel
    layer = library_layer(in_features=64, out_features=32, nbits=16)
    x = torch.randn(9, 64)
    with torch.no_grad():
        assert torch.allclose(layer(x), reference(x, dequant(layer), layer.bias).float(), atol=1e-5)
        assert torch.allclose(layer(x[:2]), reference(x[:2], dequant(layer), layer.bias).float(), atol=1e-5)


# -- DESIGN trap: the first CPU forward permutes the codes in place ----------------


def test_trap_first_forward_permutes_codes():
    layer = library_layer(num_codebooks=2)  # 16 input groups, 64 output groups
    W = dequant(layer)
    codes = layer.codes.clone()
    x = torch.randn(3, 128)
    if HAS_NUMBA:
        with torch.no_grad():
            assert torch.allclose(layer(x), reference(x, W, layer.bias).float(), atol=1e-4)
    else:
        # without aqlm's [cpu] extra the kernel import fails, after the permutation
        with pytest.raises(ImportError):
            layer(x)
    assert layer.codes.shape == (16, 64, 2) and torch.equal(layer.codes, codes.permute(1, 0, 2))
    assert layout.codes_permuted(layer)
    assert torch.equal(dequant(layer), W)
    model = wrapped(layer)
    with torch.no_grad():
        got = model(x)
        want = reference(x, W.double() + model.proj.delta_weight("default").double(), layer.bias)
    assert relative_error(got, want) < 1e-5
    requantized = hook().quantplug_requantize(module=layer, weight=W, backend="aqlm")
    assert requantized.codes.shape == (64, 16, 2) and torch.equal(requantized.codes, codes)


def test_trap_permutation_on_a_square_code_grid(monkeypatch):
    # 128 -> 16 with 8-wide groups: 16 x 16 code grid, so the shape cannot tell the layouts apart
    layer = library_layer(in_features=128, out_features=16)
    W = dequant(layer)
    codes = layer.codes.clone()
    x = torch.randn(2, 128)
    if not HAS_NUMBA:
        # run aqlm's own prepare_matmul_op (the permutation and the kernel choice) with
        # the kernel lookup, the only part that needs numba, answered by its torch kernel
        import aqlm.inference

        monkeypatch.setattr(aqlm.inference, "get_forward_pass_kernel", lambda *args: dequantize_gemm)
        monkeypatch.setattr(aqlm.inference, "get_backward_pass_kernel", lambda *args: dequantize_gemm)
        layer.prepare_matmul_op(x)
    else:
        with torch.no_grad():
            assert torch.allclose(layer(x), reference(x, W, layer.bias).float(), atol=1e-4)
    assert layer.codes.shape == codes.shape and torch.equal(layer.codes, codes.permute(1, 0, 2))
    assert not torch.equal(layer.codes, codes)
    assert torch.equal(dequant(layer), W)
    with torch.no_grad():
        model = wrapped(layer)
        got = model(x)
        want = reference(x, W.double() + model.proj.delta_weight("default").double(), layer.bias)
    assert relative_error(got, want) < 1e-5


def test_trap_out_group_2_library_forward_breaks_on_cpu_wrapped_layer_does_not():
    # aqlm permutes 2^8 codes for its numba kernel but picks dequantize_gemm when out_group_size > 1
    layer = library_layer(out_group=2)
    W = dequant(layer)
    x = torch.randn(3, 128)
    with pytest.raises(RuntimeError):
        layer(x)
    assert layout.codes_permuted(layer) and torch.equal(dequant(layer), W)
    model = wrapped(layer)
    with torch.no_grad():
        got = model(x)
        want = reference(x, W.double() + model.proj.delta_weight("default").double(), layer.bias)
    assert relative_error(got, want) < 1e-5


# -- DESIGN trap: pack_int_data returns an inference-mode tensor ---------------------


def test_trap_inference_mode_codes():
    layer = library_layer(num_codebooks=2, packed_by_aqlm=True)
    assert layer.codes.is_inference()
    with pytest.raises(RuntimeError, match=r"[Ii]nference"):
        layer.codes[0] = 1  # what an in-place update of such a layer's codes meets
    model = wrapped(layer)
    qp.prepare_for_training(model)
    x = torch.randn(4, 128, requires_grad=True)
    model(x).square().mean().backward()
    assert x.grad is not None and model.proj.lora_A["default"].grad is not None
    W = dequant(layer)
    assert not W.is_inference()
    new = hook().quantplug_requantize(module=layer, weight=W + 0.01, backend="aqlm")
    for name, tensor in [*new.named_parameters()]:
        assert not tensor.is_inference() and not tensor.requires_grad, name
    for tensor in new.parameters():
        tensor[0] = tensor[0].clone()  # usable: in-place updates work on every new tensor


# -- the adapter layer -----------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_wrapped_forward_matches_reference_and_leaves_the_base_alone(variant):
    base = quantized(variant)
    codes = base.codes.clone()
    model = wrapped(base)
    assert type(model.proj) is AqlmLoraLayer
    W = dequant(base)
    for rows in (1, 9):  # aqlm's gemv and gemm sizes
        x = torch.randn(rows, base.in_features)
        with torch.no_grad():
            got = model(x)
        want = reference(x, W.double() + model.proj.delta_weight("default").double(), base.bias)
        assert got.dtype == x.dtype and relative_error(got, want) < 1e-5
    assert torch.equal(base.codes, codes) and base.gemv_op is None  # aqlm's CPU kernel never ran


@pytest.mark.parametrize("variant", ["2x8-g8", "1x16-g8"])
def test_training_gradients_match_reference(variant):
    base = quantized(variant)
    model = wrapped(base)
    qp.prepare_for_training(model)
    layer = model.proj
    x = torch.randn(7, base.in_features, requires_grad=True)
    model(x).square().sum().backward()
    W = dequant(base).double()
    A = layer.lora_A["default"].detach().double().requires_grad_(True)
    B = layer.lora_B["default"].detach().double().requires_grad_(True)
    xr = x.detach().double().requires_grad_(True)
    (reference(xr, W, base.bias) + (xr @ A.T) @ B.T * layer.scaling["default"]).square().sum().backward()
    assert relative_error(x.grad, xr.grad) < 1e-5
    assert relative_error(layer.lora_A["default"].grad, A.grad) < 1e-5
    assert relative_error(layer.lora_B["default"].grad, B.grad) < 1e-5
    assert all(p.grad is None for p in base.parameters())


def test_dora_matches_definition():
    base = quantized("2x8-g8")
    model = wrapped(base, use_dora=True)
    layer = model.proj
    with torch.no_grad():
        layer.lora_magnitude["default"].mul_(1.3)
        x = torch.randn(5, base.in_features)
        got = model(x)
        W = dequant(base).double()
        direction = W + layer.delta_weight("default", magnitude=False).double()
        merged = (
            layer.lora_magnitude["default"].double().unsqueeze(1)
            * direction
            / direction.norm(dim=1, keepdim=True)
        )
    assert relative_error(got, reference(x, merged, base.bias)) < 1e-5


def test_mixed_batch():
    model = wrapped(quantized("2x8-g8"))
    qp.attach(model, qp.LoraConfig(r=4, alpha=8, target_modules=["proj"], init="random"), "other")
    x = torch.randn(6, 128)
    names = ["default", "other", "__base__", "other", "default", "__base__"]
    with torch.no_grad():
        got = model(x, adapter_names=names)
        alone = {}
        for name in ("default", "other"):
            qp.set_adapter(model, name)
            alone[name] = model(x)
        with qp.disable_adapters(model):
            alone["__base__"] = model(x)
    for row, name in enumerate(names):
        assert relative_error(got[row], alone[name][row]) < 1e-6, (row, name)


@pytest.mark.parametrize("variant", VARIANTS)
def test_compile_fullgraph_traces_without_breaks(variant):
    # dynamo's tracing (where graph breaks come from) for every variant; inductor's code for one
    # variant is the conformance suite's test_compile, the same code path
    model = wrapped(quantized(variant))
    x = torch.randn(3, model.proj.in_features)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert relative_error(compiled(x), model(x)) < 1e-6


# -- merge ---------------------------------------------------------------------------


def test_merge_dense_and_exact_unmerge():
    base = quantized("2x8-g8")
    before = state(base)
    model = wrapped(base)
    x = torch.randn(4, 128)
    with torch.no_grad():
        want = model(x)
        report = qp.merge(model, mode="dense")
        got = model(x)
    assert type(model.proj.base) is nn.Linear and report.layers[0].error < 1e-6
    assert relative_error(got, want) < 1e-5
    qp.unmerge(model)
    assert model.proj.base is base and same_state(before, base)
    with torch.no_grad():
        assert torch.equal(model(x), want)


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_requantize(variant):
    base = quantized(variant)
    before = state(base)
    model = wrapped(base)
    x = torch.randn(4, base.in_features)
    with torch.no_grad():
        W = dequant(base).float()
        delta = model.proj.delta_weight("default")
        unmerged = model(x)
        report = qp.merge(model, mode="requantize")
    new = model.proj.base
    assert type(new) is aqlm.QuantizedLinear and new is not base
    assert torch.equal(new.codebooks, base.codebooks) and torch.equal(new.bias, base.bias)
    assert new.codes.dtype == base.codes.dtype and new.scales.dtype == base.scales.dtype
    assert not any(t.is_inference() or t.requires_grad for t in new.parameters())
    merged = dequant(new)
    entry = report.layers[0]
    assert entry.error == pytest.approx(relative_error(merged, W + delta), rel=1e-3)
    assert entry.adapter_error == pytest.approx(
        relative_error(merged, W + delta) * (W + delta).norm().item() / delta.norm().item(), rel=1e-3
    )
    # the search starts from the layer's codes and only takes improvements: never worse than no merge
    assert entry.adapter_error <= 1.0 + 1e-6
    with torch.no_grad():
        got = model(x)
    assert relative_error(got, reference(x, merged, new.bias)) < 1e-5
    assert not torch.equal(got, unmerged)
    assert same_state(before, base)
    qp.unmerge(model)
    assert model.proj.base is base and same_state(before, base)
    with torch.no_grad():
        assert torch.equal(model(x), unmerged)


def test_bfloat16_layer():
    # aqlm's CPU kernel asserts float32; the adapter layer's path and merge keep bf16
    base = qp.quantize(dense().to(torch.bfloat16), "aqlm", "2x8-g8")
    assert base.codebooks.dtype == base.scales.dtype == base.bias.dtype == torch.bfloat16
    model = wrapped(base)
    assert model.proj.lora_A["default"].dtype == torch.bfloat16
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        got = model(x)
        want = reference(x, dequant(base).double() + model.proj.delta_weight("default").double(), base.bias)
        assert got.dtype == torch.bfloat16 and relative_error(got, want) < 2e-2
        report = qp.merge(model, mode="requantize")
    assert model.proj.base.codebooks.dtype == torch.bfloat16 and torch.equal(
        model.proj.base.codebooks, base.codebooks
    )
    assert report.layers[0].adapter_error < 1.0


def test_requantize_of_a_small_adapter_loses_most_of_it_and_the_core_warns():
    # ‖ΔW‖ = 3% of ‖W‖, the size of a trained LoRA update: far below the 2-bit grid's spacing
    model = wrapped(quantized("2x8-g8"))
    scaled_adapter(model, 0.03)
    with pytest.warns(UserWarning, match="lost most of the adapter"):
        report = qp.merge(model, mode="requantize")
    assert 0.5 < report.layers[0].adapter_error <= 1.0 + 1e-6


def test_requantize_unchanged_weight_gives_the_same_layer():
    base = quantized("2x8-g8")
    new = codec.requantize(base, dequant(base))
    assert torch.equal(new.codes, base.codes) and torch.equal(new.scales, base.scales)


def test_requantize_skips_settled_groups_without_changing_the_result(monkeypatch):
    # a group nearer its entry than half the gap to the next entry cannot move (triangle inequality)
    base = quantized("2x8-g8")
    target = dequant(base) + 0.3 * torch.randn(64, 128) * dequant(base).std()
    bounded = codec.requantize(base, target)
    monkeypatch.setattr(
        codec, "_radii", lambda book, book_sq: torch.zeros(book.shape[0])
    )  # search everything
    searched = codec.requantize(base, target)
    assert torch.equal(bounded.codes, searched.codes) and torch.equal(bounded.scales, searched.scales)
    assert not torch.equal(bounded.codes, base.codes)


def test_requantize_progress_bar(capfd):
    base = quantized("1x8-g8")
    codec.requantize(base, dequant(base) + 0.01)
    assert "aqlm requantize" not in capfd.readouterr().err  # tiny layer: no bar
    codec.requantize(base, dequant(base) + 0.01, progress=True)
    assert "aqlm requantize" in capfd.readouterr().err


@pytest.mark.slow  # importing transformers' LLaMA takes seconds
def test_transformers_aqlm_checkpoint_end_to_end(tmp_path):
    """A tiny LLaMA saved with an AqlmConfig and loaded back by transformers, as users get AQLM models."""
    transformers = pytest.importorskip("transformers")
    from quantplug.testing.models import tiny_llama

    model = qp.quantize(
        tiny_llama(0, vocab_size=96, num_hidden_layers=1, max_position_embeddings=32), "aqlm", "2x8-g8"
    )
    model.config.quantization_config = transformers.AqlmConfig(
        in_group_size=8,
        out_group_size=1,
        num_codebooks=2,
        nbits_per_codebook=8,
        linear_weights_not_to_quantize=["lm_head"],
    )
    model.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, device_map="cpu", dtype=torch.float32)
    layers = {path: m for path, m in loaded.named_modules() if layout.is_aqlm_layer(m)}
    assert len(layers) == 7 and all(qp.detect(m, loaded) == "aqlm" for m in layers.values())
    for path, layer in layers.items():
        assert torch.equal(dequant(layer), dequant(model.get_submodule(path)))
    qp.attach(loaded, qp.LoraConfig(r=4, alpha=8, target_modules="all-linear", init="random"))
    ids = torch.randint(0, 96, (2, 8))
    with torch.no_grad():
        want = loaded(ids).logits  # through the adapter layers: no numba needed
        qp.merge(loaded, mode="dense")
        assert relative_error(loaded(ids).logits, want) < 1e-5
        qp.unmerge(loaded)
        with pytest.warns(UserWarning, match="lost most"):
            report = qp.merge(loaded, mode="requantize")
    assert len(report.layers) == 7 and all(entry.adapter_error <= 1.0 + 1e-6 for entry in report.layers)
    qp.unmerge(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)


# -- the conformance suite ---------------------------------------------------------------


class TestAqlmConformance(BackendConformance):
    """quantplug's contract checks on 1x16 layers. The suite calls the bare layer's forward, which aqlm
    runs on CPU with its pure-PyTorch kernel for 2^16 codebooks; small layers, as 2^16 entries are costly."""

    backend = "aqlm"
    variants = ("1x16-g8",)
    in_features = 64
    out_features = 32
    forward_tol = 1e-4


if HAS_NUMBA:  # defined only where it can run: the suite would otherwise fall back to the default variant

    class TestAqlmConformance8bit(BackendConformance):
        """The same checks on 2^8-codebook layers, whose bare forward on CPU is aqlm's numba kernel.

        At the suite's default 128 -> 64 size: at 64 -> 32 a layer has 256 groups, as many as a
        codebook has entries, so the suite's from-scratch reference quantization is lossless and no
        merge that keeps the layer's codebooks can come near it.
        """

        backend = "aqlm"
        variants = ("2x8-g8", "1x8-g8")
        forward_tol = 1e-4

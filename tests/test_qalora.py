"""QALoRA: adapters that see their input pooled over the quantization groups, and merge mode "zeros".

- the config and PEFT's format (``use_qalora``, ``qalora_group_size``), the
  pooling and its scale as PEFT computes them, checked against a plain
  PyTorch reference; ``delta_weight`` expands ``A`` back to ``(r, in)``;
- mixed batches of QALoRA adapters with different groups, LoRA and base rows;
- every group-wise backend (GPTQ, AWQ, HQQ, torchao intx, INC): the group
  size its plugin reports, training (gradients to the adapters only), the
  zeros merge keeping the quantized codes bit for bit with an error below a
  requantize merge of the same adapter, exact unmerge, save/load;
- PEFT interop both ways on gptqmodel GPTQ layers, the only ones PEFT
  gives QALoRA;
- the clear errors: groups that do not divide ``in_features``, layers
  without groups, DoRA + QALoRA, a zeros merge of a LoRA adapter or of
  groups that do not fit the layer's.
"""

from __future__ import annotations

import copy
import json

import pytest
import quantplug as qp
import torch
from quantplug._lora import qalora_pool
from quantplug._registry import hook
from quantplug.testing.conformance import Holder, _assert_same_state, _state, relative_error
from quantplug.testing.models import tiny_llama
from torch import nn

IN, OUT, R = 128, 64, 4


def available(backend: str) -> bool:
    return qp.load_plugins().status(backend).ok


def need(backend: str):
    if not available(backend):
        pytest.skip(f"backend {backend} is not usable here: {qp.load_plugins().status(backend).reason}")


def dense(seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(IN, OUT, bias=bias)
    with torch.no_grad():
        linear.weight.normal_(0, 0.05)
    return linear


def qalora(**kwargs) -> qp.LoraConfig:
    settings = {"r": R, "alpha": 2.0 * R, "target_modules": ["proj"], "init": "random", "use_qalora": True}
    return qp.LoraConfig(**{**settings, **kwargs})


def peft_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, group: int) -> torch.Tensor:
    """PEFT 0.21's ``QALoraLinearVariant.forward``, written out: mean per group, times the group count."""
    flat = x.reshape(-1, x.shape[-1])
    pooled = flat.view(flat.shape[0], flat.shape[1] // group, group).mean(dim=2) * (flat.shape[1] // group)
    return (pooled @ A.T @ B.T * scale).view(*x.shape[:-1], B.shape[0])


# -- the config --------------------------------------------------------------------


def test_config_validates_and_round_trips_peft_keys():
    config = qp.LoraConfig(r=4, target_modules=["q"], use_qalora=True, qalora_group_size=32)
    data = config.to_peft_dict()
    assert data["use_qalora"] is True and data["qalora_group_size"] == 32
    assert qp.LoraConfig.from_peft_dict(data) == config
    plain = qp.LoraConfig(r=4, target_modules=["q"])
    assert "use_qalora" not in plain.to_peft_dict()  # plain LoRA files stay as before
    # PEFT writes qalora_group_size=16 (its default) into every config; without use_qalora it means nothing
    assert (
        qp.LoraConfig.from_peft_dict({**plain.to_peft_dict(), "use_qalora": False, "qalora_group_size": 16})
        == plain
    )
    with pytest.raises(ValueError, match="use_qalora and use_dora"):
        qp.LoraConfig(use_qalora=True, use_dora=True)
    with pytest.raises(ValueError, match="use_qalora is False"):
        qp.LoraConfig(qalora_group_size=32)
    for bad in (0, -8, 2.5, True):
        with pytest.raises(ValueError, match="qalora_group_size"):
            qp.LoraConfig(use_qalora=True, qalora_group_size=bad)
    with pytest.raises(ValueError, match="qalora_group_size"):
        qp.LoraConfig.from_peft_dict({**data, "qalora_group_size": None})


# -- the layer: pooling, delta_weight, mixed batches (plain linears, explicit groups) ---------


def test_forward_is_peft_pooling_and_delta_weight_matches_it():
    model = Holder(dense())
    qp.attach(model, qalora(qalora_group_size=16))
    layer = model.proj
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    assert tuple(A.shape) == (R, IN // 16) and layer.qalora_group_size == {"default": 16}
    x = torch.randn(2, 5, IN)  # 3-D, as in a transformer
    with torch.no_grad():
        got = model(x) - layer.base(x)
        want = peft_delta(x, A, B, layer.scaling["default"], 16)
        assert torch.allclose(got, want, atol=1e-6), (got - want).abs().max()
        assert torch.allclose(x @ layer.delta_weight("default").T, want, atol=1e-5)
        assert torch.allclose(qalora_pool(x, 16) @ A.T @ B.T * layer.scaling["default"], want, atol=1e-6)


def test_no_group_means_a_clear_error_and_a_wrong_group_too():
    with pytest.raises(ValueError, match=r"layer 'proj' \(linear\).*reports none.*qalora_group_size"):
        qp.attach(Holder(dense()), qalora())
    with pytest.raises(
        ValueError,
        match=r"layer 'proj' \(linear\).*in_features=128 is not a multiple of qalora_group_size=48",
    ):
        qp.attach(Holder(dense()), qalora(qalora_group_size=48))
    model = Holder(dense())
    with pytest.raises(ValueError):
        qp.attach(model, qalora())
    assert type(model.proj) is nn.Linear, "a refused attach must leave the model unchanged"


def test_mixed_batch_of_qalora_groups_lora_and_base_rows():
    model = Holder(dense())
    qp.attach(model, qalora(qalora_group_size=16), "g16")
    qp.attach(model, qalora(qalora_group_size=32, r=2), "g32")
    qp.attach(model, qp.LoraConfig(r=R, alpha=8, target_modules=["proj"], init="random"), "lora")
    x = torch.randn(5, 3, IN)
    names = ["g16", "lora", "__base__", "g32", "g16"]
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
        alone = {}
        for name in ("g16", "g32", "lora"):
            qp.set_adapter(model, name)
            alone[name] = model(x)
        with qp.disable_adapters(model):
            alone["__base__"] = model(x)
    for row, name in enumerate(names):
        assert torch.allclose(mixed[row], alone[name][row], atol=1e-6), (row, name)


def test_dropout_applies_before_pooling_as_in_peft():
    model = Holder(dense())
    qp.attach(model, qalora(qalora_group_size=16, dropout=0.5))
    layer = model.proj
    layer.train()
    x = torch.randn(4, IN)
    torch.manual_seed(3)
    got = model(x) - layer.base(x)
    torch.manual_seed(3)
    dropped = layer.lora_dropout["default"](x)
    want = peft_delta(dropped, layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"], 16)
    assert torch.allclose(got, want, atol=1e-6)


# -- every group-wise backend --------------------------------------------------------

# backend, a variant whose zero points the zeros merge can move, the class of its code tensors
GROUPED = {
    "gptq": ("int4-g32-asym", 32),
    "awq": ("int4-g32-asym", 32),
    "hqq": ("4bit-g64", 64),
    "torchao": ("int4-g32", 32),
    "inc": ("int4-g32-asym", 32),
}
# where the zero points are floating point, the zeros merge is exact
EXACT = {"hqq", "torchao"}


def codes_of(backend: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors holding the quantized codes and scales, which the zeros merge must not touch."""
    if backend == "gptq":
        return {"qweight": module.qweight, "scales": module.scales, "g_idx": module.g_idx}
    if backend in ("awq", "inc"):
        return {"qweight": module.qweight, "scales": module.scales}
    if backend == "hqq":
        return {"W_q": module.W_q, "scale": module.meta["scale"]}
    if backend == "torchao":
        return {"qdata": module.weight.qdata, "scale": module.weight.scale}
    raise AssertionError(backend)


@pytest.fixture(params=sorted(GROUPED))
def grouped(request):
    backend = request.param
    need(backend)
    variant, group = GROUPED[backend]
    return backend, variant, group


@pytest.mark.parametrize(
    "backend, variant, expected",
    [
        ("gptq", "int4-g32-asym", 32),
        ("gptq", "int4-g128-sym", None),  # one group per row at in_features=128: per channel
        ("gptq", "int4-g32-sym", 32),
        ("gptq", "int4-g128-sym-actorder", None),  # groups over permuted columns
        ("awq", "int4-g64-asym", 64),
        ("awq", "int4-gall-asym", None),
        ("hqq", "4bit-g64", 64),
        ("hqq", "4bit-g64-axis0", None),  # groups along the output dimension
        ("hqq", "8bit-g128", None),
        ("torchao", "int4-g64", 64),
        ("torchao", "int8dq-int4-g32", 32),
        ("torchao", "int8wo", None),  # per row
        ("torchao", "nf4", None),
        ("inc", "int4-g32", 32),
        ("inc", "nf4-g32", 32),
    ],
)
def test_group_size_hook(backend, variant, expected):
    need(backend)
    layer = qp.quantize(dense(), backend, variant)
    assert hook().quantplug_group_size(module=layer, backend=backend) == expected
    if expected is None:
        with pytest.raises(ValueError, match=rf"layer 'proj' \({backend}\).*reports none"):
            qp.attach(Holder(layer), qalora())


def test_qalora_trains_only_the_adapters(grouped):
    """A few Adam steps towards a target the adapter can reach (a constant per group): the loss falls."""
    backend, variant, group = grouped
    model = Holder(qp.quantize(dense(), backend, variant))
    qp.attach(model, qalora(init="default"))
    layer = model.proj
    assert layer.qalora_group_size["default"] == group
    dtype = layer.lora_A["default"].dtype
    torch.manual_seed(5)
    with torch.no_grad():
        W = layer.dequantized_weight().float()
        target = W + (torch.randn(OUT, IN // group) * 0.02).repeat_interleave(group, dim=1)
    qp.prepare_for_training(model)
    params = qp.trainable_parameters(model)
    assert [p.shape for p in params] == [(R, IN // group), (OUT, R)]
    optimizer = torch.optim.Adam(params, lr=2e-2)
    losses = []
    for _ in range(40):
        x = torch.randn(16, IN)
        loss = (model(x.to(dtype)).float() - x @ target.T - layer.bias.float()).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        for name, param in layer.base.named_parameters():
            assert param.grad is None, f"{backend} base parameter {name} got a gradient"
    assert losses[-1] < 0.3 * losses[0], losses[::8]


def test_zeros_merge_keeps_codes_beats_requantize_and_unmerges_exactly(grouped):
    """An update within the zero points' range (about one scale step per group, ‖ΔW‖ ≈ 26% of ‖W‖):
    exact on float zero points, equal to requantize on integer ones; larger updates clamp there."""
    backend, variant, _ = grouped
    model = Holder(qp.quantize(dense(), backend, variant))
    qp.attach(model, qalora())
    layer = model.proj
    with torch.no_grad():
        layer.lora_B["default"].mul_(0.3)
    original = layer.base
    before = _state(original)
    codes = {k: v.detach().clone() for k, v in codes_of(backend, original).items()}
    x = torch.randn(4, IN).to(layer.lora_A["default"].dtype)
    with torch.no_grad():
        unmerged = model(x)
    requantize = qp.merge(model, mode="requantize").layers[0]
    qp.unmerge(model)
    zeros = qp.merge(model, mode="zeros").layers[0]
    merged = model.proj.base
    assert type(merged) is type(original) and merged is not original
    for name, tensor in codes_of(backend, merged).items():
        assert torch.equal(tensor, codes[name]), f"{backend}: the zeros merge changed {name}"
    with torch.no_grad():
        assert relative_error(model(x), unmerged) < 2e-2 + 2 * zeros.error
    if backend in EXACT:
        assert zeros.adapter_error < 1e-3 and zeros.error < 0.01 * requantize.error, (zeros, requantize)
    else:  # integer zero points: each group keeps the nearest multiple of its scale
        assert zeros.adapter_error < 1.0 and zeros.error <= 1.01 * requantize.error + 1e-6, (
            zeros,
            requantize,
        )
    qp.unmerge(model)
    assert model.proj.base is original
    _assert_same_state(before, original, f"{backend}: unmerge after a zeros merge")
    with torch.no_grad():
        assert torch.equal(model(x), unmerged)


def test_qalora_save_load_round_trip(grouped, tmp_path):
    backend, variant, group = grouped
    layer = qp.quantize(dense(), backend, variant)
    model = Holder(layer)
    qp.attach(model, qalora())
    x = torch.randn(3, IN).to(model.proj.lora_A["default"].dtype)
    with torch.no_grad():
        want = model(x)
    qp.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["use_qalora"] is True and saved["qalora_group_size"] == group  # None resolved to the layer's
    fresh = Holder(qp.quantize(dense(), backend, variant))
    qp.load_adapter(fresh, tmp_path)
    assert fresh.proj.configs["default"].qalora_group_size == group
    with torch.no_grad():
        assert torch.equal(fresh(x), want)


def test_qalora_compiles_fullgraph():
    need("hqq")
    model = Holder(qp.quantize(dense(), "hqq", "4bit-g64"))
    qp.attach(model, qalora())
    x = torch.randn(3, IN)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        assert relative_error(compiled(x), model(x)) < 1e-5


# -- the zeros merge's errors ---------------------------------------------------------------


def test_zeros_merge_refuses_what_it_cannot_fold():
    need("hqq")
    model = Holder(qp.quantize(dense(), "hqq", "4bit-g64"))
    qp.attach(model, qp.LoraConfig(r=R, target_modules=["proj"], init="random"), "lora")
    qp.attach(model, qalora(qalora_group_size=32), "g32")  # finer than the layer's 64: not constant per group
    original = model.proj.base
    with pytest.raises(qp.MergeError, match="QALoRA adapters only"):
        qp.merge(model, adapter="lora", mode="zeros")
    with pytest.raises(
        qp.MergeError, match="groups of 32 input columns and the layer quantizes groups of 64"
    ):
        qp.merge(model, adapter="g32", mode="zeros")
    assert model.proj.base is original and not model.proj.merges
    plain = Holder(dense())
    qp.attach(plain, qalora(qalora_group_size=16))
    with pytest.raises(qp.MergeError, match=r"\(linear\) cannot merge with mode='zeros': a plain nn.Linear"):
        qp.merge(plain, mode="zeros")


def test_zeros_merge_takes_groups_that_are_a_multiple_of_the_layers():
    need("hqq")
    model = Holder(qp.quantize(dense(), "hqq", "4bit-g64"))
    qp.attach(model, qalora(qalora_group_size=128))  # one pooled group over two quantization groups
    report = qp.merge(model, mode="zeros")
    assert report.layers[0].adapter_error < 1e-3


@pytest.mark.parametrize(
    "backend, variant", [("gptq", "int4-g32-sym"), ("awq", "int4-g128-sym"), ("inc", "int4-g32")]
)
def test_symmetric_layers_refuse_the_zeros_merge(backend, variant):
    need(backend)
    linear = nn.Linear(256, OUT)  # in=256 so that g128 is a real group
    model = Holder(qp.quantize(linear, backend, variant))
    qp.attach(model, qalora())
    original = model.proj.base
    with pytest.raises(qp.MergeError, match=r"'proj'.*(sym|zero points)"):
        qp.merge(model, mode="zeros")
    assert model.proj.base is original


def test_zeros_merge_over_a_model_and_unload():
    need("hqq")
    model = nn.Sequential(nn.Linear(IN, IN), nn.ReLU(), nn.Linear(IN, OUT))
    model = qp.quantize(model, "hqq", "4bit-g64")
    qp.attach(model, qp.LoraConfig(r=R, target_modules=["0", "2"], init="random", use_qalora=True))
    x = torch.randn(3, IN)
    with torch.no_grad():
        want = model(x)
        report = qp.merge(model, mode="zeros", unload=True)
        assert len(report.layers) == 2 and report.mean_adapter_error < 1e-3
        assert not qp.lora_layers(model) and relative_error(model(x), want) < 1e-4


# -- PEFT interop (GPTQ) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def gptq_llama():
    peft = pytest.importorskip("peft")
    need("gptq")
    return peft, qp.quantize(tiny_llama(), "gptq", "int4-g32-asym")


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("group", [32, 16])
def test_peft_qalora_adapter_loads_here(gptq_llama, group, tmp_path):
    peft, base = gptq_llama
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    config = peft.LoraConfig(
        r=R,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
        use_qalora=True,
        qalora_group_size=group,
    )
    theirs_model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    theirs = logits(theirs_model, ids)
    assert (theirs - logits(base, ids)).abs().max() > 1e-3, "the adapter must change the output"
    theirs_model.save_pretrained(tmp_path)
    ours_model = copy.deepcopy(base)
    qp.load_adapter(ours_model, tmp_path)
    assert torch.allclose(logits(ours_model, ids), theirs, atol=1e-5)
    layer = ours_model.model.layers[0].self_attn.q_proj
    assert layer.qalora_group_size["default"] == group and layer.lora_A["default"].shape == (R, 64 // group)
    if group == 32:  # the layer's own groups: the zeros merge folds it in and keeps the codes
        qweight = layer.base.qweight.clone()
        qp.merge(ours_model, mode="zeros")
        assert torch.equal(layer.base.qweight, qweight)
        qp.unmerge(ours_model)
    else:
        with pytest.raises(qp.MergeError, match="multiple of 32"):
            qp.merge(ours_model, mode="zeros")


def test_qalora_adapter_saved_here_loads_in_peft(gptq_llama, tmp_path):
    peft, base = gptq_llama
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    model = copy.deepcopy(base)
    torch.manual_seed(3)
    qp.attach(
        model,
        qp.LoraConfig(r=R, alpha=8, target_modules=["q_proj", "v_proj"], init="random", use_qalora=True),
    )
    ours = logits(model, ids)
    qp.save_adapter(model, tmp_path)
    theirs_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    peft_layer = theirs_model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(peft_layer).__name__ == "GPTQLoraLinear" and peft_layer.qalora_group_size["default"] == 32
    assert torch.allclose(logits(theirs_model, ids), ours, atol=1e-5)


def test_load_rejects_a_qalora_file_that_does_not_fit(gptq_llama, tmp_path):
    _, base = gptq_llama
    model = copy.deepcopy(base)
    qp.attach(model, qp.LoraConfig(r=R, alpha=8, target_modules=["q_proj"], init="random", use_qalora=True))
    qp.save_adapter(model, tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**data, "qalora_group_size": 48}))
    fresh = copy.deepcopy(base)
    with pytest.raises(qp.AdapterFileError, match=r"key 'qalora_group_size'.*not a multiple"):
        qp.load_adapter(fresh, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**data, "qalora_group_size": 16}))
    with pytest.raises(
        qp.AdapterFileError, match=r"lora_A.weight' has shape \(4, 2\), the model needs \(4, 4\)"
    ):
        qp.load_adapter(fresh, tmp_path)
    assert not qp.lora_layers(fresh)


# -- the demo ------------------------------------------------------------------------------


def test_demo_qalora_shows_zeros_beside_requantize_and_dense(tmp_path, capsys):
    need("hqq")
    from quantplug.apps.cli import main

    assert (
        main(["demo", "--backend", "hqq", "--qalora", "--steps", "25", "--json", "--out", str(tmp_path)]) == 0
    )
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{\n") :])
    assert summary["adapter_kind"] == "qalora" and summary["qalora_group_size"] == 64
    assert summary["loss_after"] < summary["loss_before"] - 0.5
    merges = summary["merge"]
    assert set(merges) == {"requantize", "zeros", "dense"}
    assert merges["zeros"]["mean_adapter_error"] < 1e-3 < merges["requantize"]["mean_adapter_error"]
    assert all(row["unmerge_exact"] for row in merges.values()) and summary["reload_ok"]
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["use_qalora"] is True and saved["qalora_group_size"] == 64


def test_demo_qalora_on_a_backend_without_groups_says_so(tmp_path, capsys):
    need("bnb")
    from quantplug.apps.cli import main

    assert main(["demo", "--backend", "bnb", "--qalora", "--out", str(tmp_path)]) == 2
    assert "reports no quantization groups" in capsys.readouterr().out

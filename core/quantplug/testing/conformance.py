"""The checks behind :class:`BackendConformance`, one test per contract."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quantplug as qp
from quantplug._builtin import NAME as DENSE_BACKEND
from quantplug._info import DEFAULT_MERGE_MODES, MERGE_MODES, Status
from quantplug._registry import hook, load_plugins


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``‖got - want‖ / ‖want‖`` in float32 (0 when both are zero)."""
    want = want.detach().float()
    norm = torch.linalg.vector_norm(want).item()
    diff = torch.linalg.vector_norm(got.detach().float() - want).item()
    return diff / norm if norm > 0 else diff


def random_linear(
    in_features: int, out_features: int, *, bias: bool = True, seed: int = 0, device=None
) -> nn.Linear:
    """A float32 ``nn.Linear`` with weights ~ N(0, 0.05) and bias ~ N(0, 0.1), drawn after
    ``torch.manual_seed(seed)``: the dense layer every backend's tests quantize."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias, device=device)
    with torch.no_grad():
        linear.weight.normal_(0, 0.05)
        if bias:
            linear.bias.normal_(0, 0.1)
    return linear


def _contract(hook_name: str, what: str, fix: str) -> str:
    return f"contract {hook_name}: {what}. Fix: {fix}"


def _flatten(name: str, tensor: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
    """Clone ``tensor`` as plain tensors: wrapper subclasses (torchao) are split into their parts,
    because some have no ``aten.equal`` or re-quantize on ``clone()``."""
    if type(tensor) not in (torch.Tensor, nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        for inner in tensor.__tensor_flatten__()[0]:
            _flatten(f"{name}.{inner}", getattr(tensor, inner), out)
        return
    out[name] = tensor.detach().as_subclass(torch.Tensor).clone()


def _held_tensors(obj: object) -> dict[str, torch.Tensor]:
    """Tensor attributes of a plain object (bitsandbytes' ``QuantState`` on a weight, say)."""
    if isinstance(obj, (torch.Tensor, nn.Module)) or not hasattr(obj, "__dict__"):
        return {}
    return {k: v for k, v in vars(obj).items() if isinstance(v, torch.Tensor)}


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a module holds, cloned: parameters, buffers, tensor attributes, and the
    tensors of plain objects held by the module or its weights. Never ``state_dict()``: on a
    repacked bitsandbytes layer it un-repacks in place."""
    found: dict[str, torch.Tensor] = {}
    for name, sub in module.named_modules():
        tensors = {**dict(sub.named_parameters(recurse=False)), **dict(sub.named_buffers(recurse=False))}
        for attr, value in vars(sub).items():
            if isinstance(value, torch.Tensor):
                tensors.setdefault(attr, value)
            for inner, item in _held_tensors(value).items():
                tensors.setdefault(f"{attr}.{inner}", item)
        for attr, value in list(tensors.items()):
            for holder, obj in vars(value).items() if hasattr(value, "__dict__") else ():
                for inner, item in _held_tensors(obj).items():
                    tensors.setdefault(f"{attr}.{holder}.{inner}", item)
        for attr, value in tensors.items():
            if not attr.startswith("_"):
                _flatten(f"{name}.{attr}", value, found)
    return found


def _assert_same_state(before: dict[str, torch.Tensor], module: nn.Module, what: str) -> None:
    after = _state(module)
    for key, tensor in before.items():
        assert key in after, f"{what}: tensor {key!r} disappeared"
        other = after[key]
        same = tensor.shape == other.shape and tensor.dtype == other.dtype and torch.equal(tensor, other)
        assert same, f"{what}: tensor {key!r} changed"


class Holder(nn.Module):
    """A one-layer model, so model-level calls (attach, merge, save) can run on a single layer."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.proj(x, **kwargs)


class BackendConformance:
    """Subclass in a test module; set ``backend`` and, where needed, the tolerances.

    Class attributes:

    - ``backend``: the backend name your plugin declares (required).
    - ``variants``: the variants to test; default: every ``BackendInfo.variants`` entry.
    - ``in_features``, ``out_features``, ``batch``: the layer and input sizes.
    - ``forward_tol``: largest relative error allowed between the layer's own
      forward and ``x @ dequantize(layer).T + bias`` (activation quantization,
      low-precision accumulation); the other tolerances scale from it.
    - ``requantize_tol``: a requantize merge that loses more than half of the
      suite's adapter (which is about as large as ``W``) must be within this
      factor of quantizing ``W + ΔW`` from scratch through ``make_layer``;
      a merge that drops the adapter fails.
    - ``bias``: build layers with a bias.
    """

    backend: str = ""
    variants: tuple[str, ...] | None = None
    in_features: int = 128
    out_features: int = 64
    batch: int = 4
    rank: int = 8
    forward_tol: float = 1e-2
    requantize_tol: float = 2.0
    bias: bool = True
    seed: int = 0

    # -- fixtures -----------------------------------------------------------

    def pytest_generate_tests(self, metafunc):
        if "variant" in metafunc.fixturenames:
            declared = self.info().variants if self.variants is None else self.variants
            metafunc.parametrize("variant", list(declared) or [None])

    def info(self):
        registry = load_plugins()
        assert self.backend in registry.backends, (
            f"no backend named {self.backend!r} is loaded (loaded: {sorted(registry.backends)}); "
            "install your plugin (pip install -e .) so its entry point in group 'quantplug.backends' is found"
        )
        return registry.backends[self.backend].info

    def make_layer(self, linear: nn.Linear, variant: str | None) -> nn.Module:
        """Build the quantized layer under test from a dense linear; override to build it yourself."""
        return qp.quantize(linear, self.backend, variant)

    def dense(self) -> nn.Linear:
        return random_linear(self.in_features, self.out_features, bias=self.bias, seed=self.seed)

    def layer(self, variant: str | None) -> nn.Module:
        return self.make_layer(self.dense(), variant)

    def compute_dtype(self, layer: nn.Module) -> torch.dtype:
        return hook().quantplug_compute_dtype(module=layer, backend=self.backend) or torch.float32

    def inputs(self, layer: nn.Module, rows: int | None = None) -> torch.Tensor:
        torch.manual_seed(self.seed + 1)
        device = next((t.device for t in (*layer.parameters(), *layer.buffers())), torch.device("cpu"))
        return torch.randn(rows or self.batch, self.in_features, device=device).to(self.compute_dtype(layer))

    def wrapped(self, variant: str | None, **config) -> Holder:
        model = Holder(self.layer(variant))
        settings = {"r": self.rank, "alpha": 2.0 * self.rank, "target_modules": ["proj"], "init": "random"}
        settings.update(config)
        qp.attach(model, qp.LoraConfig(**settings))
        return model

    @staticmethod
    def dequantize(module: nn.Module, backend: str) -> torch.Tensor:
        return hook().quantplug_dequantize(module=module, backend=backend)

    @staticmethod
    def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = x.double() @ weight.double().T
        return out + bias.double() if bias is not None else out

    # -- quantplug_backend_info / quantplug_check_backend --------------------

    def test_backend_info(self):
        info = self.info()
        assert info.name == self.backend
        unknown = set(info.merge_modes) - set(MERGE_MODES)
        assert not unknown, _contract(
            "quantplug_backend_info", f"unknown merge modes {unknown}", f"use {MERGE_MODES}"
        )
        assert "dense" in info.merge_modes or "dense" in info.limits, _contract(
            "quantplug_backend_info",
            "every backend supports the core's dense merge or says why not",
            "add 'dense' to merge_modes",
        )
        for capability in ("dora", "mixed_batch", "compile_safe"):
            if not getattr(info, capability):
                assert capability in info.limits, _contract(
                    "quantplug_backend_info",
                    f"{capability}=False without a reason",
                    f"add limits={{'{capability}': 'why'}}",
                )
        for mode in DEFAULT_MERGE_MODES:  # "zeros" is optional: only formats with zero points have it
            if mode not in info.merge_modes:
                assert mode in info.limits, _contract(
                    "quantplug_backend_info",
                    f"merge mode {mode!r} missing without a reason",
                    f"add limits={{'{mode}': 'why'}}",
                )

    def test_check_backend(self):
        status = load_plugins().status(self.backend)
        assert status.status is Status.OK, (
            f"backend {self.backend!r} is {status.status}: {status.reason} ({status.fix})"
        )
        for requirement in self.info().requires:
            assert requirement.install_line().startswith("pip install"), _contract(
                "quantplug_backend_info",
                f"requirement {requirement.dist} has no pip line",
                "set Requirement.pip",
            )

    def test_entry_point_name(self):
        """An installed plugin's entry point is named after its backend, so that
        ``QUANTPLUG_BLOCK_PLUGINS=<backend>`` and ``QUANTPLUG_LOAD_PLUGINS=<backend>`` reach it."""
        registry = load_plugins()
        for row in registry.failures:  # the loader refuses a plugin whose two names disagree
            assert f"declares backend {self.backend!r}" not in (row.reason or ""), _contract(
                "entry point", row.reason or "", row.fix or ""
            )
        if self.backend not in registry.backends:
            return  # not loaded at all: test_backend_info says why
        plugin = registry.plugins.get(registry.backends[self.backend].plugin_name)
        if plugin is not None and plugin.entry_point is not None:  # an in-process plugin has none
            assert plugin.entry_point == self.backend, _contract(
                "entry point",
                f"entry point {plugin.entry_point!r} declares backend {self.backend!r}",
                f'name it after the backend: [project.entry-points."quantplug.backends"] {self.backend} = "..."',
            )

    # -- quantplug_detect_layer ----------------------------------------------

    def test_detect_claims_own_layers(self, variant):
        layer = self.layer(variant)
        assert qp.detect(layer) == self.backend, _contract(
            "quantplug_detect_layer",
            f"{type(layer).__name__} built by quantplug_quantize is not claimed",
            "return your backend name for your library's layer classes",
        )

    def test_detect_ignores_others(self):
        others = [nn.Embedding(10, 4), nn.LayerNorm(4), nn.Conv1d(2, 2, 1)]
        if self.backend != DENSE_BACKEND:  # plain linears belong to the core's own backend
            others.append(nn.Linear(8, 4))
        for other in others:
            claimed = hook().quantplug_detect_layer(module=other, model=None)
            assert claimed != self.backend, _contract(
                "quantplug_detect_layer",
                f"claims a plain {type(other).__name__}",
                "check the class (and, for tensor subclasses, the weight's class) before claiming",
            )

    # -- quantplug_layer_variant ----------------------------------------------

    def test_layer_variant(self, variant):
        layer = self.layer(variant)
        named = hook().quantplug_layer_variant(module=layer, backend=self.backend)
        info = self.info()
        per_variant = sorted(key for key in info.limits if key.partition(":")[2] in info.variants)
        if named is None:
            assert not per_variant, _contract(
                "quantplug_layer_variant",
                f"limits {per_variant} name variants, but a {type(layer).__name__} is no variant",
                "implement quantplug_layer_variant: the core reads it to apply those limits",
            )
            return
        expected = variant or next(iter(info.variants), None)
        assert named == expected, _contract(
            "quantplug_layer_variant",
            f"a layer built as {expected!r} is named {named!r}",
            "name the variant quantplug_quantize built the layer from",
        )

    # -- quantplug_dequantize --------------------------------------------------

    def test_dequantize_matches_forward(self, variant):
        layer = self.layer(variant)
        before = _state(layer)
        weight = self.dequantize(layer, self.backend)
        assert tuple(weight.shape) == (self.out_features, self.in_features), _contract(
            "quantplug_dequantize",
            f"weight shape {tuple(weight.shape)}",
            "return (out_features, in_features)",
        )
        _assert_same_state(before, layer, "quantplug_dequantize must leave the layer unchanged")
        x = self.inputs(layer)
        with torch.no_grad():
            got = layer(x)
        error = relative_error(got, self.reference(x, weight, getattr(layer, "bias", None)))
        assert error < self.forward_tol, _contract(
            "quantplug_dequantize",
            f"layer(x) differs from x @ W.T + b by {error:.2e} (tolerance {self.forward_tol})",
            "dequantize exactly as the library does (or raise forward_tol if the forward quantizes activations)",
        )
        again = self.dequantize(layer, self.backend)  # libraries repack in place on the first forward
        assert torch.equal(again, weight) or relative_error(again, weight) < 1e-3, _contract(
            "quantplug_dequantize",
            "gives a different weight after the layer ran a forward",
            "handle the layout the library switches to after its first forward",
        )

    # -- the adapter layer (quantplug_wrap_layer + kernels) --------------------

    def test_wrapped_forward(self, variant):
        model = self.wrapped(variant)
        layer = model.proj
        x = self.inputs(layer.base)
        with torch.no_grad():
            got = model(x)
            base = layer.base(x)
            A, B = layer.lora_A["default"].double(), layer.lora_B["default"].double()
            want_delta = (x.double() @ A.T) @ B.T * layer.scaling["default"]
        assert got.dtype == x.dtype, _contract(
            "quantplug_wrap_layer",
            f"output dtype {got.dtype} for input {x.dtype}",
            "return the input's dtype",
        )
        error = relative_error(got.double() - base.double(), want_delta)
        assert error < 2e-2, _contract(
            "quantplug_wrap_layer",
            f"adapter contribution off by {error:.2e} from (x A^T) B^T * scale",
            "add the adapter through LoraLayer.forward",
        )
        weight = self.dequantize(layer.base, self.backend).double() + layer.delta_weight("default").double()
        error = relative_error(got, self.reference(x, weight, layer.bias))
        assert error < self.forward_tol + 2e-2, _contract(
            "quantplug_wrap_layer",
            f"wrapped forward differs from x @ (W + ΔW).T + b by {error:.2e}",
            "check the base forward and the dequantized weight agree",
        )

    def test_gradients_reach_only_adapters(self, variant):
        model = self.wrapped(variant)
        qp.prepare_for_training(model)
        x = self.inputs(model.proj.base).requires_grad_(True)
        model(x).float().square().mean().backward()
        for param in qp.trainable_parameters(model):
            assert param.grad is not None and param.grad.abs().sum() > 0, "adapter parameters got no gradient"
        for name, param in model.proj.base.named_parameters():
            assert param.grad is None, _contract(
                "quantplug_wrap_layer", f"base parameter {name!r} received a gradient", "keep the base frozen"
            )
        assert x.grad is not None and torch.isfinite(x.grad).all(), _contract(
            "quantplug_wrap_layer",
            "no gradient reaches the input",
            "in training, use a base kernel with a backward pass (override LoraLayer.base_forward)",
        )

    def test_dora(self, variant):
        if not self.info().dora:
            with pytest.raises(ValueError, match="DoRA"):
                self.wrapped(variant, use_dora=True)
            return
        model = self.wrapped(variant, use_dora=True)
        layer = model.proj
        with torch.no_grad():
            layer.lora_magnitude["default"].mul_(1.5)  # away from the initial no-op magnitude
            x = self.inputs(layer.base)
            got = model(x)
            W = self.dequantize(layer.base, self.backend).double()
            direction = W + layer.delta_weight("default", magnitude=False).double()
            merged = (
                layer.lora_magnitude["default"].double().unsqueeze(1)
                * direction
                / direction.norm(dim=1, keepdim=True)
            )
        error = relative_error(got, self.reference(x, merged, layer.bias))
        assert error < self.forward_tol + 2e-2, _contract(
            "quantplug_dequantize",
            f"DoRA forward differs from its definition by {error:.2e}",
            "DoRA needs the base forward to be linear in x and to match dequantize",
        )

    def test_mixed_batch(self, variant):
        if not self.info().mixed_batch:
            model = self.wrapped(variant)
            with pytest.raises(ValueError, match="adapter_names"):
                model(self.inputs(model.proj.base), adapter_names=["default"] * self.batch)
            return
        model = self.wrapped(variant)
        self.check_mixed_batch(model, self.inputs(model.proj.base))

    def check_mixed_batch(self, model: Holder, x: torch.Tensor) -> None:
        """Attach a second adapter; each row of a ``default``/second/``__base__`` batch equals that adapter alone."""
        qp.attach(
            model,
            qp.LoraConfig(r=self.rank // 2, alpha=self.rank, target_modules=["proj"], init="random"),
            "second",
        )
        names = (["default", "second", "__base__"] * self.batch)[: self.batch]
        with torch.no_grad():
            got = model(x, adapter_names=names)
            expected = {}
            for name in ("default", "second"):
                qp.set_adapter(model, name)
                expected[name] = model(x)
            with qp.disable_adapters(model):
                expected["__base__"] = model(x)
        qp.set_adapter(model, "default")
        for row, name in enumerate(names):
            error = relative_error(got[row], expected[name][row])
            assert error < 1e-2, (
                f"mixed batch row {row} ({name}) differs from running {name} alone by {error:.2e}"
            )

    # -- QALoRA (quantplug_group_size) ------------------------------------------

    def group_size(self, layer: nn.Module) -> int | None:
        group = hook().quantplug_group_size(module=layer, backend=self.backend)
        if group is not None:
            fits = isinstance(group, int) and 0 < group < self.in_features and self.in_features % group == 0
            assert fits, _contract(
                "quantplug_group_size",
                f"{group!r} for a layer with in_features={self.in_features}",
                "return an int that divides in_features and is smaller than it, or None",
            )
        return group

    def test_qalora(self, variant):
        """A QALoRA adapter pools over the layer's groups: forward, gradients and a mixed batch with LoRA."""
        group = self.group_size(self.layer(variant))
        if group is None:
            with pytest.raises(ValueError, match="qalora_group_size"):
                self.wrapped(variant, use_qalora=True)
            return
        model = self.wrapped(variant, use_qalora=True)
        layer = model.proj
        assert layer.qalora_group_size["default"] == group
        assert tuple(layer.lora_A["default"].shape) == (self.rank, self.in_features // group)
        x = self.inputs(layer.base)
        with torch.no_grad():
            got = model(x)
            weight = (
                self.dequantize(layer.base, self.backend).double() + layer.delta_weight("default").double()
            )
        error = relative_error(got, self.reference(x, weight, layer.bias))
        assert error < self.forward_tol + 2e-2, (
            f"QALoRA forward differs from x @ (W + ΔW).T + b by {error:.2e}"
        )
        if self.info().mixed_batch:  # the QALoRA adapter beside a plain LoRA one, in one batch
            self.check_mixed_batch(model, x)
        qp.prepare_for_training(model)
        model(self.inputs(layer.base)).float().square().mean().backward()
        for store in (layer.lora_A, layer.lora_B):
            grad = store["default"].grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, (
                "a QALoRA parameter got no gradient"
            )
        for name, param in layer.base.named_parameters():
            assert param.grad is None, f"base parameter {name!r} received a gradient"

    # -- merge: quantplug_dequantize + quantplug_requantize / quantplug_fold_into_zeros

    @pytest.mark.parametrize("mode", MERGE_MODES)
    def test_merge_and_unmerge(self, variant, mode):
        if mode == "zeros":
            self._check_zeros_merge(variant)
            return
        info = self.info()
        model = self.wrapped(variant)
        layer = model.proj
        original = layer.base
        before = _state(original)
        x = self.inputs(original)
        if mode not in info.merge_modes:
            with pytest.raises(qp.MergeError):
                qp.merge(model, mode=mode)
            return
        with torch.no_grad():
            W = self.dequantize(original, self.backend).float()
            ideal = W + layer.delta_weight("default", base=W)
            delta_norm = layer.delta_weight("default", base=W).norm().item()
            report = qp.merge(model, mode=mode)
        assert len(report.layers) == 1 and report.worst is not None, "merge report has no layer entry"
        merged_weight = (
            model.proj.base.weight if mode == "dense" else self.dequantize(model.proj.base, self.backend)
        )
        true_error = relative_error(merged_weight, ideal)
        assert abs(report.layers[0].error - true_error) <= 1e-3 + 0.05 * true_error, (
            f"merge report says error {report.layers[0].error:.3e}, the merged weight has {true_error:.3e}"
        )
        assert abs(report.layers[0].delta_norm - delta_norm) <= 1e-3 * max(delta_norm, 1.0)
        if mode == "requantize":
            assert type(model.proj.base) is type(original), _contract(
                "quantplug_requantize",
                f"returned a {type(model.proj.base).__name__}, not a {type(original).__name__}",
                "build a layer of the same class and format",
            )
            assert qp.detect(model.proj.base) == self.backend
            bias = getattr(original, "bias", None)
            if bias is not None:
                assert torch.equal(model.proj.base.bias.float(), bias.float()), _contract(
                    "quantplug_requantize", "the bias changed", "copy the original layer's bias"
                )
            self._check_requantize_keeps_adapter(variant, W, ideal, merged_weight.float(), report)
        _assert_same_state(
            before, original, f"quantplug_requantize must leave the original layer unchanged ({mode})"
        )
        with torch.no_grad():
            got = model(x)
        error = relative_error(got, self.reference(x, merged_weight.double(), model.proj.bias))
        assert error < self.forward_tol + 1e-2, (
            f"merged model's forward differs from its merged weight by {error:.2e}"
        )
        qp.unmerge(model)
        assert model.proj.base is original, "unmerge must restore the original module"
        _assert_same_state(before, original, "unmerge must restore the original storage bit for bit")

    def _check_zeros_merge(self, variant) -> None:
        """Mode "zeros": refused unless declared; where declared, the codes stay and only a constant per
        group moves, never further from the ideal weight than not merging; unmerge is exact."""
        if "zeros" not in self.info().merge_modes:
            model = self.wrapped(variant)
            with pytest.raises(qp.MergeError):
                qp.merge(model, mode="zeros")
            return
        layer = self.layer(variant)
        group = self.group_size(layer)
        if group is None:
            with pytest.raises(ValueError, match="qalora_group_size"):
                self.wrapped(variant, use_qalora=True)
            return
        model = self.wrapped(variant, use_qalora=True)
        original = model.proj.base
        before = _state(original)
        with torch.no_grad():
            W = self.dequantize(original, self.backend).float()
            delta = model.proj.delta_weight("default")
        try:
            report = qp.merge(model, mode="zeros")
        except qp.MergeError as exc:  # a format of a declaring backend without zero points (symmetric, say)
            assert "'proj'" in str(exc), f"the zeros merge's refusal does not name the layer: {exc}"
            assert model.proj.base is original and not model.proj.merges, "a refused merge changed the model"
            _assert_same_state(before, original, "a refused zeros merge must leave the layer unchanged")
            return
        new = model.proj.base
        assert type(new) is type(original) and qp.detect(new) == self.backend, _contract(
            "quantplug_fold_into_zeros",
            f"returned a {type(new).__name__}",
            "build a layer of the same class and format",
        )
        with torch.no_grad():
            merged = self.dequantize(new, self.backend).float()
        moved = (merged - W).reshape(self.out_features, self.in_features // group, group)
        # a changed code moves one weight by a step of its group's scale; the dtype's rounding stays far below
        spread = ((moved - moved.mean(dim=-1, keepdim=True)).abs().max() / W.abs().max()).item()
        assert spread < 2e-2, _contract(
            "quantplug_fold_into_zeros",
            f"a weight moved {spread:.2e} (of max |W|) away from its group's common move: the codes changed",
            "keep the codes and scales; change only the zero points",
        )
        entry = report.layers[0]
        true_error = relative_error(merged, W + delta)
        assert abs(entry.error - true_error) <= 1e-3 + 0.05 * true_error, (
            f"merge report says error {entry.error:.3e}, the merged weight has {true_error:.3e}"
        )
        assert entry.adapter_error <= 1.0 + 1e-2, _contract(
            "quantplug_fold_into_zeros",
            f"the merge is {entry.adapter_error:.2f} x ‖ΔW‖ from the ideal weight, "
            "further than not merging at all",
            "move each zero point by the nearest amount the format can hold",
        )
        bias = getattr(original, "bias", None)
        if bias is not None:
            assert torch.equal(new.bias.float(), bias.float()), _contract(
                "quantplug_fold_into_zeros", "the bias changed", "copy the original layer's bias"
            )
        _assert_same_state(
            before, original, "quantplug_fold_into_zeros must leave the original layer unchanged"
        )
        qp.unmerge(model)
        assert model.proj.base is original, "unmerge must restore the original module"
        _assert_same_state(before, original, "unmerge must restore the original storage bit for bit")

    def _check_requantize_keeps_adapter(self, variant, W, ideal, merged, report) -> None:
        """A requantize merge must keep most of the adapter, or as much as the format can hold.

        The merge report stays honest when a plugin drops the adapter (it says
        "lost most of the adapter" and warns), so honesty alone lets "merge
        silently drops the adapter" pass. The suite's adapter is about as large
        as ``W``: an honest requantize keeps most of it, except in formats so
        coarse that quantizing ``W + ΔW`` from scratch loses as much.
        """
        if not report.dropped:  # kept more than half of it (the threshold merge warns at)
            return
        entry = report.layers[0]
        fresh_linear = self.dense()
        with torch.no_grad():
            fresh_linear.weight.copy_(ideal)
        fresh = self.dequantize(self.make_layer(fresh_linear, variant), self.backend).float()
        fresh_error = (
            (fresh - ideal).norm() / (ideal - W).norm()
        ).item()  # error / ‖ΔW‖ of quantizing W + ΔW
        fix = "quantize `weight` (W + ΔW) into the new layer with the original layer's parameters"
        assert not (torch.equal(merged, W) and not torch.equal(fresh, W)), _contract(
            "quantplug_requantize", "the new layer holds the original weights: the adapter was dropped", fix
        )
        assert entry.adapter_error <= self.requantize_tol * fresh_error + 1e-3, _contract(
            "quantplug_requantize",
            f"the merge lost {entry.adapter_error:.2f} x ‖ΔW‖ of an adapter as large as W, where quantizing "
            f"W + ΔW from scratch loses {fresh_error:.2f} x ‖ΔW‖ (requantize_tol {self.requantize_tol})",
            fix + " (or raise requantize_tol if the format's fixed parameters make it coarser)",
        )

    def test_unload(self, variant):
        model = self.wrapped(variant)
        original = model.proj.base
        qp.merge(model, mode="dense")
        qp.unload(model)
        assert model.proj is original, "unload must put the original base module back"

    def test_save_load_roundtrip(self, variant, tmp_path):
        model = self.wrapped(variant)
        x = self.inputs(model.proj.base)
        with torch.no_grad():
            want = model(x)
        qp.save_adapter(model, tmp_path)
        qp.unload(model)
        qp.load_adapter(model, tmp_path)
        with torch.no_grad():
            got = model(x)
        assert torch.equal(got, want), (
            f"reloaded adapter changes the output by {relative_error(got, want):.2e}"
        )

    # -- torch.compile ---------------------------------------------------------

    def test_compile(self, variant):
        info = self.info()
        if not info.compile_safe:
            assert "compile_safe" in info.limits
            return
        model = self.wrapped(variant)
        x = self.inputs(model.proj.base)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        with torch.no_grad():
            want, got = model(x), compiled(x)
        error = relative_error(got, want)
        assert error < 1e-2, f"torch.compile(fullgraph=True) output differs by {error:.2e}"

"""The conformance suite catches broken plugins, and its messages name the contract they break.

Each test registers an in-process plugin (``qp.register``) that is correct
but for one deliberate bug, runs the suite's check for that contract
directly, and expects an ``AssertionError`` naming the hook. A control test
runs the same checks on the correct plugin, so every failure below comes
from its bug and nothing else.
"""

from __future__ import annotations

import contextlib

import pytest
import quantplug as qp
import torch
import torch.nn.functional as F
from quantplug import BackendInfo, hookimpl
from quantplug.testing import BackendConformance
from torch import nn

NAME = "catchme"


class ToyLinear(nn.Module):
    """int8 codes times a per-row float32 scale: the smallest honest quantized layer."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> ToyLinear:
        weight = weight.detach().float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        return cls(torch.round(weight / scale).clamp(-127, 127).to(torch.int8), scale, bias)

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(), self.bias)


class Honest:
    """A correct backend for ToyLinear; each subclass below breaks one contract."""

    capabilities: dict = {}  # BackendInfo fields a subclass changes

    @hookimpl
    def quantplug_backend_info(self):
        settings = {
            "name": NAME,
            "variants": ("int8",),
            "compile_safe": False,
            "limits": {"compile_safe": "not needed here: these tests call the checks one by one"},
        }
        settings.update(self.capabilities)
        return BackendInfo(**settings)

    @hookimpl
    def quantplug_detect_layer(self, module):
        return NAME if type(module) is ToyLinear else None

    @hookimpl
    def quantplug_compute_dtype(self, module, backend):
        return torch.float32 if backend == NAME else None

    @hookimpl
    def quantplug_dequantize(self, module, backend):
        return module.dequantize() if backend == NAME else None

    @hookimpl
    def quantplug_requantize(self, module, weight, backend):
        return ToyLinear.from_weight(weight, module.bias) if backend == NAME else None

    @hookimpl
    def quantplug_quantize(self, linear, backend):
        return ToyLinear.from_weight(linear.weight, linear.bias) if backend == NAME else None


class ClaimsPlainLinear(Honest):
    @hookimpl
    def quantplug_detect_layer(self, module):
        return NAME if isinstance(module, (ToyLinear, nn.Linear)) else None


class WrongDequantize(Honest):
    @hookimpl
    def quantplug_dequantize(self, module, backend):
        # one scale for the whole matrix instead of one per row
        return module.codes.float() * module.scale.mean() if backend == NAME else None


class TransposedDequantize(Honest):
    @hookimpl
    def quantplug_dequantize(self, module, backend):
        return module.dequantize().T.contiguous() if backend == NAME else None


class DropsAdapter(Honest):
    @hookimpl
    def quantplug_requantize(self, module, weight, backend):
        # "requantizes" by copying the layer's own storage: an honest report, a silent loss
        return ToyLinear(module.codes.clone(), module.scale.clone(), module.bias) if backend == NAME else None


class KeepsATenthOfTheAdapter(Honest):
    @hookimpl
    def quantplug_requantize(self, module, weight, backend):
        if backend != NAME:
            return None
        return ToyLinear.from_weight(0.1 * weight + 0.9 * module.dequantize(), module.bias)


class LosesBias(Honest):
    @hookimpl
    def quantplug_requantize(self, module, weight, backend):
        return (
            ToyLinear.from_weight(weight, None if module.bias is None else module.bias * 0)
            if backend == NAME
            else None
        )


class RequantizesInPlace(Honest):
    @hookimpl
    def quantplug_requantize(self, module, weight, backend):
        if backend != NAME:
            return None
        fresh = ToyLinear.from_weight(weight, module.bias)
        module.codes.copy_(fresh.codes)  # overwrites the original: unmerge cannot restore it
        module.scale.copy_(fresh.scale)
        return fresh


class ReturnsDenseLinear(Honest):
    @hookimpl
    def quantplug_dequantize(self, module, backend):
        if backend != NAME:
            return None
        return module.dequantize() if isinstance(module, ToyLinear) else module.weight.detach().clone()

    @hookimpl
    def quantplug_requantize(self, module, weight, backend):
        if backend != NAME:
            return None
        dense = nn.Linear(module.in_features, module.out_features)
        with torch.no_grad():
            dense.weight.copy_(weight)
            dense.bias.copy_(module.bias)
        return dense


class UnexplainedCapability(Honest):
    capabilities = {"dora": False}


class Suite(BackendConformance):
    """The suite as a plugin author subclasses it (not collected here: no Test prefix)."""

    backend = NAME
    forward_tol = 1e-4


@contextlib.contextmanager
def registered(plugin_class):
    name = qp.register(plugin_class(), name=f"{NAME}-{plugin_class.__name__}")
    try:
        yield Suite()
    finally:
        qp.unregister(name)


def test_the_honest_plugin_passes_every_check_used_here():
    with registered(Honest) as suite:
        suite.test_backend_info()
        suite.test_detect_claims_own_layers("int8")
        suite.test_detect_ignores_others()
        suite.test_dequantize_matches_forward("int8")
        for mode in ("requantize", "dense"):
            suite.test_merge_and_unmerge("int8", mode)


@pytest.mark.parametrize(
    ("plugin", "check", "args", "message"),
    [
        (
            ClaimsPlainLinear,
            "test_detect_ignores_others",
            (),
            r"contract quantplug_detect_layer: claims a plain Linear",
        ),
        (
            WrongDequantize,
            "test_dequantize_matches_forward",
            ("int8",),
            r"contract quantplug_dequantize: layer\(x\) differs",
        ),
        (
            TransposedDequantize,
            "test_dequantize_matches_forward",
            ("int8",),
            r"contract quantplug_dequantize: weight shape",
        ),
        (
            DropsAdapter,
            "test_merge_and_unmerge",
            ("int8", "requantize"),
            r"contract quantplug_requantize: .*adapter was dropped",
        ),
        (
            KeepsATenthOfTheAdapter,
            "test_merge_and_unmerge",
            ("int8", "requantize"),
            r"contract quantplug_requantize: the merge lost 0.9",
        ),
        (
            LosesBias,
            "test_merge_and_unmerge",
            ("int8", "requantize"),
            r"contract quantplug_requantize: the bias changed",
        ),
        (
            RequantizesInPlace,
            "test_merge_and_unmerge",
            ("int8", "requantize"),
            r"quantplug_requantize must leave the original layer unchanged",
        ),
        (
            ReturnsDenseLinear,
            "test_merge_and_unmerge",
            ("int8", "requantize"),
            r"contract quantplug_requantize: returned a Linear, not a ToyLinear",
        ),
        (
            UnexplainedCapability,
            "test_backend_info",
            (),
            r"contract quantplug_backend_info: dora=False without a reason",
        ),
    ],
    ids=lambda value: value.__name__ if isinstance(value, type) else None,
)
def test_the_suite_names_the_broken_contract(plugin, check, args, message):
    with registered(plugin) as suite, pytest.raises(AssertionError, match=message):
        getattr(suite, check)(*args)

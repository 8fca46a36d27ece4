"""What the gptq and awq backends share about gptqmodel's layers once torch is imported.

Layout kinds both plugins have besides their own packed one (a per-channel
int8 copy, a CPU int4pack repack, any other kernel layout), reading a layer
through its own forward on an identity matrix, the compute dtype, and the
adapter layer whose base call has a backward to the input. Imports torch,
not gptqmodel; each backend's ``__init__.py`` imports this only inside hooks.
"""

from __future__ import annotations

from types import ModuleType
from typing import ClassVar

import torch
import torch.nn.functional as F
from quantplug.plugin import LoraLayer
from torch import nn

from quantplug_gptqmodel._classes import mro_names

IDENTITY_CHUNK = 1024  # rows of the identity matrix per forward when reading an opaque layout

# layout kinds both plugins have (each adds its own packed one)
INT8 = "int8"  # TorchInt8Linear/TorchInt8AwqLinear: a per-channel int8 copy, read by its dequantize_weight
REPACKED = "repacked"  # a CPU int4pack layout after the first inference forward
OPAQUE = "opaque"  # any other kernel layout: read through the layer's forward


def _mode(module: nn.Module) -> str | None:
    mode = getattr(module, "linear_mode", None)
    return None if mode is None else str(getattr(mode, "value", mode)).lower()


def is_repacked(module: nn.Module) -> bool:
    """Whether a CPU-fused class already swapped its buffers for the int4pack layout."""
    return _mode(module) == "inference" and hasattr(module, "_fused_op_forward")


def common_layout(module: nn.Module, int8_class: str) -> str | None:
    """``REPACKED``, ``INT8`` (a subclass of ``int8_class``, by name) or ``None``: the plugin's own layouts."""
    if is_repacked(module):
        return REPACKED
    if int8_class in mro_names(module):
        return INT8
    return None


def device_of(module: nn.Module) -> torch.device:
    for name in ("qweight", "scales", "int8_weight_nk", "bias"):
        tensor = getattr(module, name, None)
        if isinstance(tensor, torch.Tensor):
            return tensor.device
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def compute_dtype(module: nn.Module, int8: bool) -> torch.dtype:
    """The dtype of the layer's scales (what its forward computes in), else its bias, else fp16.

    :param int8: the layer is in the ``INT8`` layout, whose scales are float32 internals, not the
        activation dtype.
    """
    if not int8:
        scales = getattr(module, "scales", None)
        if isinstance(scales, torch.Tensor) and scales.is_floating_point():
            return scales.dtype
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.is_floating_point():
        return bias.dtype
    return torch.float16


def dequantize_kernel(module: nn.Module, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """``(out, in)`` weight of a layer in the ``INT8``, ``REPACKED`` or ``OPAQUE`` layout, in ``dtype``."""
    with torch.no_grad():
        if kind == INT8:
            return module.dequantize_weight().T.to(dtype).contiguous()
        if kind == REPACKED:
            return _through_forward(module, module._fused_op_forward, False, dtype)
        return _through_forward(module, module.forward, True, dtype)


def _through_forward(module: nn.Module, forward, subtract_bias: bool, dtype: torch.dtype) -> torch.Tensor:
    """Read ``W`` off the layer's own kernel: ``forward(I) = I @ W.T``, in chunks of the identity."""
    device = device_of(module)
    n = module.in_features
    columns = []
    for start in range(0, n, IDENTITY_CHUNK):
        rows = min(IDENTITY_CHUNK, n - start)
        eye = torch.zeros(rows, n, dtype=dtype, device=device)
        eye[torch.arange(rows), torch.arange(start, start + rows)] = 1
        out = forward(eye).float()
        if subtract_bias and getattr(module, "bias", None) is not None:
            out = out - module.bias.float()
        columns.append(out)
    return torch.cat(columns).T.to(dtype).contiguous()


def whole_groups(module: nn.Module, kind: str) -> int | None:
    """The layer's ``group_size`` where it splits ``in_features`` into two or more whole groups.

    ``None`` for the ``INT8`` layout, which re-quantized itself per channel in ``post_init``.
    """
    if kind == INT8:
        return None
    group, in_features = int(getattr(module, "group_size", -1) or -1), int(module.in_features)
    if group <= 0 or group >= in_features or in_features % group:
        return None
    return group


def as_loaded(layer: nn.Module, device: torch.device) -> nn.Module:
    """A freshly packed ``layer`` as gptqmodel hands out loaded models: ``post_init`` run, in eval mode."""
    layer.post_init()
    layer.eval()
    return layer.to(device)


def finish_like(module: nn.Module, new: nn.Module, bias: torch.Tensor | None) -> nn.Module:
    """``new`` with ``module``'s bias bit for bit, on its device and, like it, in eval mode if it is."""
    if bias is not None:
        new.bias = bias.detach().clone().cpu()  # bit for bit, in its own dtype
    new = new.to(device_of(module))
    if hasattr(new, "post_init"):
        new.post_init()
    if not module.training:
        new.eval()
    return new


class GptqmodelLoraLayer(LoraLayer):
    """``LoraLayer`` whose base call has a backward to the input, and whose base never switches to train mode.

    Training forwards (the input needs a gradient) go through dequantize +
    ``F.linear``; inference forwards through the layer's own kernel, unless
    :meth:`needs_dense` says otherwise, in the layer's compute dtype where
    :meth:`needs_own_dtype` says so. A subclass sets ``layers``, the plugin's
    ``_layers`` module (``layout``, ``compute_dtype``, ``dequantize``), and
    ``cheap_layouts``, the layouts ``dequantize`` reads as cheaply as the
    layer's own forward; the dense weight of any other layout is cached while
    the wrapper is in training mode, and ``eval()`` drops it.
    """

    layers: ClassVar[ModuleType]
    cheap_layouts: ClassVar[tuple[str, ...]]
    _dense_cache: tuple[object, torch.Tensor] | None = None

    def needs_dense(self, x: torch.Tensor) -> bool:
        """Whether an inference forward on ``x`` must avoid the layer's own kernel."""
        return False

    def needs_own_dtype(self) -> bool:
        """Whether the layer's own kernel must be called in the layer's compute dtype."""
        return False

    def train(self, mode: bool = True) -> GptqmodelLoraLayer:
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.training = mode
        for child in self.children():
            if child is not self.base:  # gptqmodel kernels without training support raise in train()
                child.train(mode)
        if not mode:
            self._dense_cache = None
        return self

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() and x.requires_grad) or self.needs_dense(x):
            return self._dense_forward(x)
        if self.needs_own_dtype():
            dtype = self.layers.compute_dtype(self.base)
            if x.dtype != dtype:
                return self.base(x.to(dtype)).to(x.dtype)
        return self.base(x)

    def _dense_weight(self) -> torch.Tensor:
        if self.layers.layout(self.base) in self.cheap_layouts:
            return self.layers.dequantize(self.base)  # as cheap as the library's own forward
        cached = self._dense_cache
        if cached is not None and cached[0] is self.base:
            return cached[1]
        weight = self.layers.dequantize(self.base)
        if self.training:
            self._dense_cache = (self.base, weight)
        return weight

    def _dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._dense_weight().to(device=x.device, dtype=x.dtype)
        bias = self.bias
        return F.linear(x, weight, None if bias is None else bias.to(device=x.device, dtype=x.dtype))

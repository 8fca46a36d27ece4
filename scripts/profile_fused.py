"""One call of each fused kernel, for Nsight Compute (no timing here).

    ncu --clock-control none -k regex:gemv_kernel -c 5 --section SpeedOfLight \\
        --section WarpStateStats --section Occupancy python scripts/profile_fused.py [OUT IN [TOKENS]]

The layer is OUT x IN (default 4096 x 4096), the input TOKENS rows (default 1: the one-token GEMV
kernels, named ``*_gemv_kernel``; 2-16: the tensor-core kernels, ``*_lora_kernel``).
``scripts/gpu_run.sh profile`` runs it so, with ``PROFILE_ARGS`` as its arguments and
``PROFILE_KERNELS`` as the kernel-name pattern.
"""

import importlib
import sys

import quantplug as qp
import torch
from tune_fused import PLUGINS, build  # PLUGINS: format -> (kernel module's package, variant)

OUT, IN = (int(d) for d in sys.argv[1:3]) if len(sys.argv) > 2 else (4096, 4096)
TOKENS = int(sys.argv[3]) if len(sys.argv) > 3 else 1

USABLE = {row.name for row in qp.backends() if row.ok}

for backend, (plugin, _) in PLUGINS.items():
    if backend not in USABLE:
        print(backend, "not usable here", flush=True)
        continue
    layer = build(backend, OUT, IN, seed=0)
    kernels = importlib.import_module(f"{plugin}._cuda_kernels")
    x = torch.randn(TOKENS, IN, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        kernels.fused_lora_linear(layer.base, x, None, None, None, 0.0, force=True)
    torch.cuda.synchronize()
    print(backend, "done", flush=True)

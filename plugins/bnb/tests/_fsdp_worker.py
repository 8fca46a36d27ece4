"""Run by test_fsdp2_shards_4bit_layers in two processes (gloo, CPU): FSDP2 over a wrapped Linear4bit."""

from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn


def main(rank: int, world: int, port: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import quantplug as qp
    from quantplug_bnb import _layers
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    dense = nn.Linear(128, 64).to(torch.bfloat16)
    base = _layers.build_4bit(
        dense.weight,
        dense.bias,
        quant_type="nf4",
        blocksize=64,
        compress_statistics=True,
        quant_storage=torch.bfloat16,
        compute_dtype=torch.bfloat16,
    )

    class Net(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.proj = layer

        def forward(self, x):
            return self.proj(x)

    net = Net(base)
    qp.attach(net, qp.LoraConfig(r=4, target_modules=["proj"], init="random"))
    qp.prepare_for_training(net)
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    want = net(x).detach()
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(net.proj, mesh=mesh)
    fully_shard(net, mesh=mesh)
    result = {"sharded": type(net.proj.base.weight).__name__}
    y = net(x)
    y.float().square().sum().backward()
    result["train"] = (y.float() - want.float()).abs().max().item()
    result["grad"] = float(net.proj.lora_A["default"].grad.abs().sum().full_tensor())
    net.eval()
    with torch.no_grad():
        result["eval"] = [(net(x).float() - want.float()).abs().max().item() for _ in range(2)]
    try:
        net.proj.dequantized_weight()
        result["dequantize"] = "no error"
    except ValueError as error:
        result["dequantize"] = str(error)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    import quantplug as qp
    import torch.multiprocessing as mp

    qp.load_plugins()  # import everything once here; forked workers inherit it (this machine: ~10 s per import)
    import bitsandbytes  # noqa: F401

    mp.start_processes(main, args=(2, sys.argv[1], sys.argv[2]), nprocs=2, start_method="fork")

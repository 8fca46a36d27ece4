"""The run's environment: device, versions, command, and the device's measured copy bandwidth."""

from __future__ import annotations

import contextlib
import datetime
import platform
from collections.abc import Sequence

from quantplug.apps.bench.timing import Timer


def copy_bandwidth_gbs(device: str) -> float | None:
    """Device-to-device copy bandwidth, bytes read plus written, in GB/s."""
    import torch

    if device != "cuda":
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    timer = Timer(device, quick=True)
    timer.trial_ms = 20.0
    us = timer.eager([lambda: dst.copy_(src)])
    return 2 * (1 << 30) / (us * 1e-6) / 1e9


def environment(device: str, argv: Sequence[str]) -> dict:
    import importlib.metadata as md

    import torch

    import quantplug as qp

    # the stack, then every library an installed backend requires (from its BackendInfo)
    dists = ["quantplug", "torch", "triton", "peft", "transformers"]
    for status in qp.backends():
        for requirement in status.info.requires if status.info else ():
            if requirement.dist not in dists:
                dists.append(requirement.dist)
    versions = {}
    for dist in dists:
        with contextlib.suppress(md.PackageNotFoundError):
            versions[dist] = md.version(dist)
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "gpu": torch.cuda.get_device_name(0)
        if device == "cuda"
        else platform.processor() or platform.machine(),
        "cuda": torch.version.cuda if device == "cuda" else None,
        "python": platform.python_version(),
        "versions": versions,
        "command": "quantplug bench " + " ".join(argv),
    }
    if device == "cuda":
        env["l2_bytes"] = torch.cuda.get_device_properties(0).L2_cache_size
    env["copy_gbs"] = copy_bandwidth_gbs(device)
    return env

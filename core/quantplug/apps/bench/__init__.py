"""``quantplug bench``: bare vs adapter vs merged layers per backend, beside PEFT, in one run.

Per backend that is ok here and declares the device (or those named with
``--backends``), in its first declared variant, per shape, at each token
count, it times:

- ``bare``: the backend's quantized layer alone;
- quantplug's adapter layer with the fast kernels (``kernel`` names the one
  the kernel registry resolved) and with the references forced
  (``kernel="reference"``);
- the same layer after a dense merge (``merged_us``);
- PEFT's LoRA layer on the very same base module, where PEFT wraps it (a
  row with a ``note`` where it does not);
- on CUDA at <= 16 tokens, each of these again captured in a CUDA graph
  (``*_graph_us``): the GPU's own time, without Python's launch overhead;
- at 16 tokens, a batch of 8 distinct adapters through ``adapter_names=``
  against one adapter (``mixed_over_single``).

Timing: CUDA events (or the host clock on CPU) around a loop, after warm-up;
the median over trials. Each measurement cycles through enough copies of
the layer to overflow the GPU's L2 cache, so weights come from device
memory as they do in a model. Achieved bandwidth counts the bytes a call
must move at least (weights and their scales, adapters, input, output)
against the device's measured copy bandwidth (read + write).

``--model`` adds a ~1.1B LLaMA (TinyLlama's shape, random weights, built
from a config) with every linear quantized by the first quantizing backend
usable here (or the first of ``--backends``): greedy decode tokens/s with
the adapter unmerged, disabled and merged, and LoRA training tokens/s and
peak memory, for quantplug and PEFT.

The output is a JSON list of rows, each with at least ``backend``,
``shape``, ``tokens``, ``library``, ``kernel``, ``bare_us``, ``wrapped_us``,
``wrapped_over_bare`` and the run's environment; a PNG chart is written
beside it, and ``--render`` turns such a file into ``docs/performance.md``.

The package, by job: :mod:`.timing` (timer, CUDA-graph capture),
:mod:`.environment`, :mod:`.backends` (what to time, from ``BackendInfo``),
:mod:`.layers` and :mod:`.model` (the rows), :mod:`.report` and
:mod:`.chart` (the outputs), :mod:`.command` (arguments and the run).
"""

from __future__ import annotations

from quantplug.apps.bench.chart import chart
from quantplug.apps.bench.command import add_arguments, run_bench
from quantplug.apps.bench.environment import environment
from quantplug.apps.bench.layers import REQUIRED_KEYS, layer_rows, storage_bytes
from quantplug.apps.bench.model import model_rows
from quantplug.apps.bench.report import GENERATED_END, GENERATED_START, TARGETS, render, table
from quantplug.apps.bench.timing import Timer, capture_graph

__all__ = [
    "GENERATED_END",
    "GENERATED_START",
    "REQUIRED_KEYS",
    "TARGETS",
    "Timer",
    "add_arguments",
    "capture_graph",
    "chart",
    "environment",
    "layer_rows",
    "model_rows",
    "render",
    "run_bench",
    "storage_bytes",
    "table",
]

"""Per-call routing for ``qp.adapter_batch``: which adapter each row goes through, per thread and task.

:func:`route` sets a :class:`contextvars.ContextVar`, which is per thread
and per asyncio task; :func:`routed_rows` is what ``LoraLayer.forward``
reads. Nothing is installed on the shared layers, so a thread that never
entered ``adapter_batch`` sees the model's normal outputs while another
thread serves a mixed batch.

Under ``torch.compile`` the forward reads a thread-local mirror of the same
mapping instead: dynamo cannot trace ``ContextVar.get`` (torch 2.13:
"Dynamo does not know how to trace method `get` of class `ContextVar`"),
while it guards on a ``threading.local`` attribute per call, recompiling
for a new routing as it did for the forward pre-hooks this replaced. So in
compiled code routing follows the thread, not the asyncio task: tasks that
share a thread should not hold an ``adapter_batch`` open across an
``await`` while running a compiled model.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator

import torch
from torch import nn

_ROUTING: contextvars.ContextVar[dict | None] = contextvars.ContextVar("quantplug_routing", default=None)
_THREAD_ROUTING = threading.local()  # the same mapping, for compiled code


@contextlib.contextmanager
def route(rows: dict[nn.Module, list[str]]) -> Iterator[None]:
    """Within the block, each layer in ``rows`` runs row ``i`` through adapter ``rows[layer][i]``.

    Only in this thread (or asyncio task); nested blocks add to the outer one.
    """
    outer = _ROUTING.get()
    routing = {**outer, **rows} if outer else dict(rows)
    token = _ROUTING.set(routing)
    previous = getattr(_THREAD_ROUTING, "routing", None)
    _THREAD_ROUTING.routing = routing
    try:
        yield
    finally:
        _THREAD_ROUTING.routing = previous
        _ROUTING.reset(token)


def routed_rows(layer: nn.Module) -> list[str] | None:
    """``layer``'s rows in the calling thread's (or task's) innermost ``adapter_batch``, if any."""
    # compiled code reads the thread-local mirror, which dynamo guards on per call
    routing = getattr(_THREAD_ROUTING, "routing", None) if torch.compiler.is_compiling() else _ROUTING.get()
    return None if routing is None else routing.get(layer)

"""Tiny models built from a config, never downloaded: for the demo, the benchmarks and tests.

Plugin authors can use them too, to test a backend on a whole transformers
model rather than one layer::

    from quantplug.testing.models import tiny_llama

    model = qp.quantize(tiny_llama(), "mybackend")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

# The smallest LLaMA that still has every part a real one has: two blocks, and
# grouped-query attention, so k_proj/v_proj are 64 -> 32 while q_proj is 64 -> 64.
TINY_LLAMA = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny_llama(seed: int = 0, **config: Any) -> LlamaForCausalLM:
    """A transformers ``LlamaForCausalLM`` with random weights drawn after ``torch.manual_seed(seed)``, in eval mode.

    :param seed: the same seed gives the same weights (on the same device).
    :param config: ``LlamaConfig`` fields that replace :data:`TINY_LLAMA`'s,
        e.g. ``vocab_size=256`` or ``num_hidden_layers=1``.

    Built on the current default device (``with torch.device("cuda"):``) in
    the current default dtype. Imports transformers, so call it only where
    transformers is installed.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **config})).eval()

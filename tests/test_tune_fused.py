"""``scripts/tune_fused.py``'s pieces that need no GPU."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
tune_fused = pytest.importorskip("tune_fused")


def test_tune_fused_times_each_shrink_slice_count_interleaved_and_restores_the_plugin():
    # scripts/tune_fused.py --shrink-slices: the GPU timing is stood in for by a clock that records what it saw
    class Plugin:
        ONE_TOKEN_SHRINK_SLICES = 32

    seen = []

    def time_wrapped():
        seen.append(Plugin.ONE_TOKEN_SHRINK_SLICES)
        return float(Plugin.ONE_TOKEN_SHRINK_SLICES + len(seen))

    medians = tune_fused.shrink_slices_times(Plugin, [16, 64], time_wrapped, rounds=3)
    assert seen == [16, 64, 16, 64, 16, 64]  # interleaved, so drift hits every count alike
    assert medians == {16: 16 + 3.0, 64: 64 + 4.0}  # the median of each count's three times
    assert Plugin.ONE_TOKEN_SHRINK_SLICES == 32  # the plugin's own count is back

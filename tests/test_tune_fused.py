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


@pytest.mark.parametrize("key", ["gemv", 16])
def test_awq_sweep_grid_holds_only_configs_its_kernel_accepts(key):
    # whole words a program (BLOCK_N a multiple of 8 columns) and a step within one group of 32 or more inputs
    grid = list(tune_fused.sweep_grid("awq", key))
    assert len(grid) >= 12
    for n, k, warps, stages, splits in grid:
        assert k % 32 == 0 and 128 % k == 0, (n, k)  # divides a group of 128
        assert n % 8 == 0 and warps >= 1 and stages >= 1 and splits >= 1
        if key == 16:
            assert n * k <= 16384


def test_a_row_the_graph_cannot_capture_is_none_and_says_why(monkeypatch):
    # AWQ's library layer copies from the host in its forward: its rows are left out, the rest of the row stands
    monkeypatch.setattr(tune_fused.torch.cuda, "synchronize", lambda: None)
    row = {}

    def capture_fails(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    assert tune_fused.optional_time(row, "library", capture_fails, None) is None
    assert row["library_error"].startswith("RuntimeError: operation not permitted")
    assert tune_fused.optional_time(row, "fused_base", lambda fn: 4.5, None) == 4.5
    assert "fused_base_error" not in row
    assert tune_fused._us(None).strip() == "-" and tune_fused._us(4.5).strip() == "4.50"

"""The bench's QLoRA training rows (apps/bench/training.py): trials alternate, the spread is kept, and the
loss-curve check against plain PyTorch on the dequantized weights and against PEFT runs in the same call.
Quick shapes on the CPU: the fields and the check, never the speed (speed is the GPU run's)."""

from __future__ import annotations

import argparse

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("hqq")


def test_training_rows_carry_the_spread_and_the_correctness_check():
    from quantplug.apps.bench.training import LOSS_TOLERANCE, training_rows

    args = argparse.Namespace(backends="hqq", quick=True, rank=4, no_peft=False)
    torch._dynamo.reset()
    rows = training_rows(args, "cpu", torch.float32, {"gpu": None}, lambda message: None)
    ours, peft, compiled, check = rows
    assert [r["library"] for r in rows] == ["quantplug", "peft", "quantplug-compiled", "quantplug"]
    assert check["tokens"] == "train-check"
    assert (ours["compiled"], compiled["compiled"], peft["compiled"]) == (False, True, False)
    assert "torch.compile" in compiled["path"] and "eager" in ours["path"]
    for row in (ours, compiled, peft):
        assert row["trials"] == len(row["tokens_per_s_trials"]) >= 2
        assert row["tokens_per_s_min"] <= row["tokens_per_s"] <= row["tokens_per_s_max"]
        assert row["gradient_checkpointing"] is True and row["batch"] == 2 and row["optimizer"]
    for row in (ours, compiled):
        assert row["speedup_over_peft"] == pytest.approx(row["tokens_per_s"] / peft["tokens_per_s"])
    assert "speedup_over_peft" not in peft
    curves = check["loss_curves"]
    assert check["paths_checked"] == ["quantplug", "quantplug-compiled"], (
        "both of quantplug's paths are checked"
    )
    assert {len(curve) for curve in curves.values()} == {check["check_steps"]}
    assert set(curves) == {"quantplug", "quantplug-compiled", "peft", "reference"}
    assert check["passed"] and check["max_rel_loss_diff_vs_reference"] <= LOSS_TOLERANCE

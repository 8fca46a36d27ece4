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
    rows = training_rows(args, "cpu", torch.float32, {"gpu": None}, lambda message: None)
    ours, peft, check = rows
    assert (ours["library"], peft["library"], check["tokens"]) == ("quantplug", "peft", "train-check")
    for row in (ours, peft):
        assert row["trials"] == len(row["tokens_per_s_trials"]) >= 2
        assert row["tokens_per_s_min"] <= row["tokens_per_s"] <= row["tokens_per_s_max"]
        assert row["gradient_checkpointing"] is True and row["batch"] == 2 and row["optimizer"]
    assert ours["speedup_over_peft"] == pytest.approx(ours["tokens_per_s"] / peft["tokens_per_s"])
    curves = check["loss_curves"]
    assert len(curves["quantplug"]) == len(curves["reference"]) == len(curves["peft"]) == check["check_steps"]
    assert check["passed"] and check["max_rel_loss_diff_vs_reference"] <= LOSS_TOLERANCE

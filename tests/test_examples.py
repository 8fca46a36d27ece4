"""The scripts in examples/ run as users run them (tiny model, few steps), so they never rot."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sft_qlora_trains_saves_merges_and_the_merged_model_loads(tmp_path, capsys):
    pytest.importorskip("trl")
    transformers = pytest.importorskip("transformers")
    example = load_example("sft_qlora")
    assert example.main(["--max-steps", "6", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "merged adapter 'default'" in printed and "loss " in printed
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())

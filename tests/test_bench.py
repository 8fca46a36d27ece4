"""`quantplug bench` on CPU: a quick run writes valid JSON rows, a chart, and renders to Markdown."""

import json

import pytest
from quantplug.apps import bench
from quantplug.apps.cli import main


@pytest.mark.slow
def test_bench_quick_cpu_writes_rows_with_the_required_keys(tmp_path):
    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                "--quick",
                "--device",
                "cpu",
                "--backends",
                "linear",
                "--tokens",
                "1,16",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and rows
    for row in rows:
        missing = [key for key in bench.REQUIRED_KEYS if key not in row]
        assert not missing, (missing, row)
        assert row["library"] in ("quantplug", "peft")
        assert row["env"]["device"] == "cpu"
    timed = [r for r in rows if r["wrapped_us"] is not None]
    assert all(r["bare_us"] > 0 and r["wrapped_us"] > 0 for r in timed)
    assert {r["tokens"] for r in rows} == {1, 16}
    assert any(r["library"] == "quantplug" and r.get("kernels") == "reference" for r in rows)
    assert any("mixed_over_single" in r for r in rows)
    assert all("merged_us" in r for r in rows if r["library"] == "quantplug" and "adapters" not in r)
    pytest.importorskip("matplotlib")
    assert out.with_suffix(".png").stat().st_size > 1000


def test_render_keeps_hand_written_text_and_states_every_target(tmp_path):
    env = {
        "date": "2026-11-25 00:00 UTC",
        "gpu": "Test GPU",
        "versions": {"torch": "2.x"},
        "command": "quantplug bench",
    }
    rows = [
        {"backend": "bnb", "shape": "4096x4096", "tokens": 1, "library": "quantplug", "kernel": "triton-fused",
         "kernels": "fast", "bare_us": 10.0, "wrapped_us": 10.5, "wrapped_over_bare": 1.05,
         "graph_wrapped_over_bare": 1.2, "env": env},
        {"backend": "bnb", "shape": "4096x4096", "tokens": 1, "library": "peft", "kernel": "peft:x", "bare_us": 10.0,
         "wrapped_us": 30.0, "wrapped_over_bare": 3.0, "env": env},
    ]  # fmt: skip
    src = tmp_path / "performance.json"
    src.write_text(json.dumps(rows))
    md = tmp_path / "performance.md"
    md.write_text(
        f"# Performance\n\nnotes before\n\n{bench.GENERATED_START}\nold\n{bench.GENERATED_END}\n\nnotes after\n"
    )
    assert main(["bench", "--render", str(src)]) == 0
    text = md.read_text()
    assert "notes before" in text and "notes after" in text and "\nold\n" not in text
    assert "Test GPU" in text and "**met** (1.05 vs 1.1)" in text
    assert "Whole-model decode: not measured" in text
    assert "QLoRA training vs PEFT: not measured" in text
    assert "Multi-adapter batch: not measured" in text


def test_bench_model_no_train_writes_only_decode_rows(tmp_path):
    # the whole-model decode rows alone (a device run short of time for the training trials)
    pytest.importorskip("transformers")
    out = tmp_path / "bench.json"
    argv = [
        "bench",
        "--quick",
        "--device",
        "cpu",
        "--backends",
        "hqq",
        "--model",
        "--no-layers",
        "--no-train",
    ]
    assert main([*argv, "--no-peft", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert rows and {r["tokens"] for r in rows} == {"decode"}
    assert all(r["tokens_per_s"] > 0 for r in rows)


def test_without_linears_leaves_a_step_that_runs_no_linear_kernel():
    # the whole-model ceiling's step: every LLaMA linear gives way to a zero output of its width
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from quantplug.apps.bench.model import LINEARS, QUICK_LLAMA, without_linears
    from quantplug.testing import tiny_llama

    model = tiny_llama(0, **QUICK_LLAMA).eval()
    ids = torch.tensor([[3]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    assert without_linears(model, QUICK_LLAMA) == len(LINEARS) * QUICK_LLAMA["num_hidden_layers"]
    assert not any(
        isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n.split(".")[-1] in LINEARS
    )
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert after.shape == before.shape and torch.isfinite(after).all()
    assert not torch.allclose(after, before)  # the linears' outputs are gone: the logits change
    assert without_linears(model, QUICK_LLAMA) == 0  # nothing left to replace


def test_render_states_the_whole_model_ceiling(tmp_path):
    env = {
        "date": "2026-12-06 00:00 UTC",
        "gpu": "Test GPU",
        "versions": {},
        "command": "quantplug bench --model",
    }
    decode = {"backend": "bnb", "shape": "llama-1.1b", "tokens": "decode", "library": "quantplug", "env": env,
              "tokens_per_s": 20.0, "disabled_tokens_per_s": 40.0, "unmerged_over_disabled": 0.5,
              "graph_tokens_per_s": 350.0, "graph_disabled_tokens_per_s": 360.0,
              "graph_unmerged_over_disabled": 350 / 360, "graph_no_linears_tokens_per_s": 576.0,
              "graph_ceiling_over_library_disabled": 1.6}  # fmt: skip
    src = tmp_path / "performance.json"
    src.write_text(json.dumps([decode]))
    assert main(["bench", "--render", str(src)]) == 0
    text = src.with_suffix(".md").read_text()
    assert "| 576.0 | 1.60x |" in text  # the table's row for the step with no linear kernel
    assert "at most 1.60 with linear kernels that took no time" in text  # and the target's line


def test_render_names_every_call_the_rows_come_from(tmp_path):
    # docs/performance.json gathers rows from several device calls (and keeps older training rows): the header
    # lists each call with its GPU and copy rate, since "% copy" is per call
    def env(date, gpu, copy, command):
        return {"date": date, "gpu": gpu, "copy_gbs": copy, "versions": {}, "command": command}

    layer = {"backend": "bnb", "shape": "4096x4096", "tokens": 1, "library": "quantplug", "kernel": "k",
             "kernels": "fast", "bare_us": 10.0, "wrapped_us": 10.5, "wrapped_over_bare": 1.05}  # fmt: skip
    first = env("2026-12-06 20:34 UTC", "GPU A", 4239.0, "quantplug bench --backends bnb")
    second = env("2026-12-05 05:30 UTC", "GPU B", 3017.0, "quantplug bench --backends hqq")
    rows = [{**layer, "env": first}, {**layer, "env": first}, {**layer, "backend": "hqq", "env": second}]
    src = tmp_path / "performance.json"
    src.write_text(json.dumps(rows))
    assert main(["bench", "--render", str(src)]) == 0
    text = src.with_suffix(".md").read_text()
    assert "come from 2 calls:" in text
    assert "- 2026-12-06 20:34 UTC, **GPU A**, copy 4239 GB/s: `quantplug bench --backends bnb`" in text
    assert "- 2026-12-05 05:30 UTC, **GPU B**, copy 3017 GB/s: `quantplug bench --backends hqq`" in text
    src.write_text(json.dumps(rows[:2]))  # one call: the single command line, no list
    assert main(["bench", "--render", str(src)]) == 0
    text = src.with_suffix(".md").read_text()
    assert "Command: `quantplug bench --backends bnb`" in text and "calls:" not in text

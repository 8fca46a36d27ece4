"""The demo's parts: the parameter count that does not depend on the backend, progress a log can read,
and third-party output kept out of the way."""

import io
import os
import sys

import pytest
import quantplug as qp
from quantplug.apps import demo
from quantplug.apps.quiet import captured

TARGETS = [*demo.PROJECTIONS, "lm_head"]


def _adapted(backend: str):
    status = qp.load_plugins().status(backend)
    if not status.ok:
        pytest.fail(f"{backend} is {status.status} here: the test environment installs every CPU backend")
    model = demo.quantized_model(backend, status.info.variants[0], seed=0)
    qp.attach(model, qp.LoraConfig(r=16, target_modules=TARGETS))
    return model


def test_parameter_count_is_the_unquantized_models_on_every_backend():
    """The same adapter is the same share of the model: quantized bases count as out x in (+ bias), not
    as their packed storage (which made 71,680 trainable parameters 16-52% across backends)."""
    dense = _adapted("linear")
    expected = sum(p.numel() for p in dense.parameters())
    trainable = sum(p.numel() for p in qp.trainable_parameters(dense))
    stored = {}
    # aqlm and awq left out for time (codebook and calibration passes); their layers count the same way
    for backend in ("bnb", "gptq", "hqq", "inc", "torchao", "quanto"):
        model = _adapted(backend)
        assert demo.logical_parameters(model) == expected, backend
        assert sum(p.numel() for p in qp.trainable_parameters(model)) == trainable, backend
        stored[backend] = sum(p.numel() for p in model.parameters())
    assert len(set(stored.values())) > 1  # what the old count read: packed storage differs by backend


def test_training_progress_off_a_terminal_is_a_line_every_tenth_of_the_run():
    model = _adapted("linear")
    qp.prepare_for_training(model)
    console = io.StringIO()
    args = type("Args", (), {"steps": 20, "seed": 0})()
    losses = demo.train(model, qp.trainable_parameters(model), args, console)
    lines = console.getvalue().splitlines()
    assert len(losses) == 20 and "\r" not in console.getvalue()
    assert [line.split()[2] for line in lines] == [f"{step}/20" for step in range(2, 21, 2)]
    assert all(f"loss {loss:.3f}" in line for line, loss in zip(lines, losses[1::2]))


def test_captured_keeps_library_output_in_the_log_and_sums_it_up(tmp_path, capsys):
    log = tmp_path / "third-party.log"
    with captured(log, verbose=False) as capture:
        print("ours", file=capture.console)
        os.write(2, b"2026-12-04 15:37:11 [WARNING][rtn.py:146] Layer-wise RTN requires a checkpoint\n")
        print("Failed to load /x/torchao/_C_mxfp8.so: Could not load this library", file=sys.stderr)
        print("something new", flush=True)
    out = capsys.readouterr()
    assert out.out == "ours\n" and out.err == ""
    text = log.read_text()
    assert "[WARNING][rtn.py:146]" in text and "something new" in text
    summary = capture.summary()
    assert summary[0].startswith("  third-party output (3 lines: ") and str(log) in summary[0]
    assert (
        "neural-compressor warnings (1)" in summary[0]
        and "torchao's optional CUDA libraries (1)" in summary[0]
    )
    assert summary[1:] == ["  1 of them not known to be harmless:", "    something new"]


def test_captured_verbose_passes_everything_through(tmp_path, capsys):
    with captured(tmp_path / "third-party.log", verbose=True) as capture:
        print("library says", file=sys.stderr)
    assert capsys.readouterr().err == "library says\n"
    assert capture.summary() == [] and not (tmp_path / "third-party.log").exists()


def test_captured_restores_the_streams_when_the_block_raises(tmp_path):
    before = sys.stdout, sys.stderr
    with pytest.raises(RuntimeError, match="boom"), captured(tmp_path / "log", verbose=False):
        raise RuntimeError("boom")
    assert (sys.stdout, sys.stderr) == before

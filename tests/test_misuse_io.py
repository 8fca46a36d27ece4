"""Adapter files under misuse and failure (issue 15): saves that die part way, wrong paths, bad tensors.

A save that fails at any step leaves the folder exactly as it was (every
file's bytes, no file added, none removed: a Trainer checkpoint's
``optimizer.pt`` beside the adapter included), and a load that refuses leaves
the model as it was. Models are plain ``nn.Linear`` stacks (the core's own
backend): what is under test is the file handling, not a backend.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import quantplug as qp
import torch
from quantplug import _io
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


def model_with_adapter(seed: int, r: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    qp.attach(model, qp.LoraConfig(r=r, alpha=2 * r, target_modules=["0", "2"], init="random"))
    return model


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder`` (hidden ones too) -> its bytes (None for a folder, "-> target" for a link)."""
    out: dict[str, bytes | str | None] = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            key = os.path.relpath(path, folder)
            if os.path.islink(path):
                out[key] = f"-> {os.readlink(path)}"
            elif os.path.isdir(path):
                out[key] = None
            else:
                out[key] = Path(path).read_bytes()
    return out


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A Trainer checkpoint folder: an adapter beside optimizer state, trainer state and a second adapter."""
    folder = tmp_path / "checkpoint-500"
    qp.save_adapter(model_with_adapter(seed=1), folder)
    (folder / "optimizer.pt").write_bytes(b"\x80\x04 optimizer state")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 500}))
    qp.save_adapter(model_with_adapter(seed=2), folder / "other")
    return folder


# -- a save that dies part way ----------------------------------------------------------


def fail_on_call(monkeypatch, module, name, call: int, exc: BaseException):
    """Make ``module.name`` raise ``exc`` on its ``call``-th call (1-based), and work otherwise."""
    real = getattr(module, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) == call:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def truncated_weights(monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file

    def dying(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(10)
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", dying)


INJECTIONS = {
    # the weights file dies half written
    "weights-write": truncated_weights,
    # the config file cannot be written
    "config-write": lambda mp: fail_on_call(mp, Path, "write_text", 1, OSError("No space left on device")),
    # the weights are in place, the config not yet: the case that left a folder that no longer loads
    "between-the-files": lambda mp: fail_on_call(mp, os, "replace", 2, OSError("EIO")),
    "ctrl-c-between-the-files": lambda mp: fail_on_call(mp, os, "replace", 2, KeyboardInterrupt()),
    "first-rename": lambda mp: fail_on_call(mp, os, "replace", 1, PermissionError("read-only")),
}


@pytest.mark.parametrize("step", list(INJECTIONS))
def test_a_failed_save_leaves_the_previous_adapter_and_every_other_file(checkpoint, monkeypatch, step):
    before = tree(checkpoint)
    other = model_with_adapter(seed=7, r=4)
    INJECTIONS[step](monkeypatch)
    with pytest.raises((OSError, KeyboardInterrupt)):
        qp.save_adapter(other, checkpoint)
    monkeypatch.undo()
    assert tree(checkpoint) == before  # same files, same bytes, no temporary file left
    fresh = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    qp.load_adapter(fresh, checkpoint)  # and it still loads


FIRST_SAVE_INJECTIONS = {
    "weights-write": truncated_weights,
    "config-write": INJECTIONS["config-write"],
    # a new folder is written as a hidden sibling and renamed into place
    "rename-into-place": lambda mp: fail_on_call(mp, os, "rename", 1, OSError("EIO")),
    "ctrl-c-at-rename": lambda mp: fail_on_call(mp, os, "rename", 1, KeyboardInterrupt()),
}


@pytest.mark.parametrize("step", list(FIRST_SAVE_INJECTIONS))
def test_a_failed_first_save_creates_nothing(tmp_path, monkeypatch, step):
    target = tmp_path / "runs" / "new" / "adapter"
    FIRST_SAVE_INJECTIONS[step](monkeypatch)
    with pytest.raises((OSError, KeyboardInterrupt)):
        qp.save_adapter(model_with_adapter(seed=3), target)
    monkeypatch.undo()
    assert tree(tmp_path) == {}


def test_a_save_replaces_the_adapter_and_keeps_the_rest(checkpoint):
    before = tree(checkpoint)
    model = model_with_adapter(seed=9, r=4)
    qp.save_adapter(model, checkpoint)
    after = tree(checkpoint)
    assert after.keys() == before.keys()
    assert {k: v for k, v in after.items() if k not in (CONFIG, WEIGHTS)} == {
        k: v for k, v in before.items() if k not in (CONFIG, WEIGHTS)
    }
    assert json.loads(after[CONFIG])["r"] == 4
    tensors = load_file(str(checkpoint / WEIGHTS))
    assert torch.equal(tensors[f"{PREFIX}0.lora_A.weight"], model[0].lora_A["default"].detach())


def test_hard_links_elsewhere_keep_the_old_bytes(checkpoint, tmp_path):
    """The backup is a hard link: the old file's bytes are never written over, so a link to it kept
    elsewhere (a snapshot, a deduplicating copy) still holds the old adapter."""
    kept = tmp_path / "kept.safetensors"
    os.link(checkpoint / WEIGHTS, kept)
    old = kept.read_bytes()
    qp.save_adapter(model_with_adapter(seed=9, r=4), checkpoint)
    assert kept.read_bytes() == old and (checkpoint / WEIGHTS).read_bytes() != old


def test_a_folder_where_the_weights_file_goes_is_refused(checkpoint):
    (checkpoint / WEIGHTS).unlink()
    (checkpoint / WEIGHTS).mkdir()
    before = tree(checkpoint)
    with pytest.raises(qp.AdapterFileError, match=r"adapter_model.safetensors' is a folder, not a file"):
        qp.save_adapter(model_with_adapter(seed=3), checkpoint)
    assert tree(checkpoint) == before


# -- paths that are not what they should be -----------------------------------------------


def path_case(tmp_path: Path, case: str) -> tuple[Path, str]:
    """(a path, what the error must say) for one kind of wrong path."""
    if case == "a-file":
        (tmp_path / "notes.txt").write_text("hello")
        return tmp_path / "notes.txt", r"notes.txt' is a file, not a folder"
    if case == "under-a-file":
        (tmp_path / "notes.txt").write_text("hello")
        return tmp_path / "notes.txt" / "adapter", r"cannot exist: '.*notes.txt' is a file, not a folder"
    if case == "symlink-loop":
        os.symlink(tmp_path / "b", tmp_path / "a")
        os.symlink(tmp_path / "a", tmp_path / "b")
        return tmp_path / "a", r"'.*/a' is a symlink loop"
    if case == "self-loop-on-the-way":
        os.symlink(tmp_path / "self", tmp_path / "self")
        return tmp_path / "self" / "adapter", r"symlink loop"
    if case == "dangling-symlink":
        os.symlink(tmp_path / "gone", tmp_path / "link")
        return tmp_path / "link", r"'.*/link' is a symlink to '.*/gone', which does not exist"
    if case == "name-too-long":
        return tmp_path / ("a" * 300), r"is too long a path for this file system"
    raise AssertionError(case)


PATH_CASES = [
    "a-file",
    "under-a-file",
    "symlink-loop",
    "self-loop-on-the-way",
    "dangling-symlink",
    "name-too-long",
]


@pytest.mark.parametrize("case", PATH_CASES)
def test_save_to_a_wrong_path_says_what_is_wrong(tmp_path, case):
    path, expected = path_case(tmp_path, case)
    before = tree(tmp_path)
    with pytest.raises(qp.AdapterFileError, match=rf"cannot save the adapter: .*{expected}"):
        qp.save_adapter(model_with_adapter(seed=1), path)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("case", PATH_CASES)
def test_load_from_a_wrong_path_says_what_is_wrong(tmp_path, case):
    path, expected = path_case(tmp_path, case)
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(qp.AdapterFileError, match=expected):
        qp.load_adapter(model, path)
    assert type(model[0]) is nn.Linear


def test_load_from_a_missing_folder_says_does_not_exist(tmp_path):
    with pytest.raises(qp.AdapterFileError, match=r"adapter folder '.*/nowhere' does not exist"):
        qp.load_adapter(nn.Sequential(nn.Linear(8, 8)), tmp_path / "nowhere")


def test_load_from_one_of_the_adapter_files_points_to_its_folder(checkpoint):
    with pytest.raises(
        qp.AdapterFileError, match=r"is a file, not a folder; pass its folder '.*checkpoint-500'"
    ):
        qp.load_adapter(nn.Sequential(nn.Linear(8, 8)), checkpoint / CONFIG)


@pytest.mark.parametrize("name", [CONFIG, WEIGHTS])
def test_an_adapter_file_that_is_a_folder(checkpoint, name):
    (checkpoint / name).unlink()
    (checkpoint / name).mkdir()
    with pytest.raises(qp.AdapterFileError, match=rf"{name}' is a folder, not a file"):
        qp.load_adapter(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), checkpoint)


# -- tensors that are not adapter weights -------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda t: t.round().to(torch.int32),
        lambda t: t > 0,
        lambda t: t.to(torch.int8),
        lambda t: t.to(torch.uint8),
        lambda t: t.to(torch.complex64),
        lambda t: t.to(torch.float8_e4m3fn),
    ],
    ids=["int32", "bool", "int8", "uint8", "complex64", "float8"],
)
def test_non_float_adapter_tensors_are_refused_naming_the_key(checkpoint, make):
    key = f"{PREFIX}2.lora_B.weight"
    tensors = load_file(str(checkpoint / WEIGHTS))
    tensors[key] = make(tensors[key] * 10)
    save_file(tensors, str(checkpoint / WEIGHTS), metadata={"format": "pt"})
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dtype = str(tensors[key].dtype).removeprefix("torch.")
    with pytest.raises(
        qp.AdapterFileError, match=rf"key '{key}' holds {dtype} values; .*must be floating point"
    ):
        qp.load_adapter(model, checkpoint)
    assert not qp.lora_layers(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_every_float_dtype_loads(checkpoint, dtype):
    tensors = {k: v.to(dtype) for k, v in load_file(str(checkpoint / WEIGHTS)).items()}
    save_file(tensors, str(checkpoint / WEIGHTS), metadata={"format": "pt"})
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    qp.load_adapter(model, checkpoint)
    got = model[2].lora_B["default"].detach()
    assert torch.equal(got, tensors[f"{PREFIX}2.lora_B.weight"].to(got.dtype))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_in_any_key_are_refused(checkpoint, bad):
    key = f"{PREFIX}0.lora_A.weight"
    tensors = load_file(str(checkpoint / WEIGHTS))
    tensors[key][0, 3] = bad
    save_file(tensors, str(checkpoint / WEIGHTS), metadata={"format": "pt"})
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(qp.AdapterFileError, match=rf"key '{key}' has NaN/inf"):
        qp.load_adapter(model, checkpoint)
    assert not qp.lora_layers(model)


def test_the_internal_temp_helper_leaves_no_file(tmp_path):
    path = _io._temp_path(tmp_path, WEIGHTS, "tmp")
    assert path.parent == tmp_path and not path.exists() and path.name.startswith(f".{WEIGHTS}.")

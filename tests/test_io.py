"""Adapter files (``qp.save_adapter`` / ``qp.load_adapter``): PEFT's format, atomic writes, bad input.

Every bad adapter folder must raise :class:`quantplug.AdapterFileError` naming
the file (and the key where there is one) and leave the model exactly as it
was: no adapter layer added, every ``state_dict`` tensor equal, the same
module objects at the same paths, the same ``requires_grad`` flags. Each bad
case runs on a plain model and on one that already holds another adapter
(so the targeted layers are already adapter layers).

The model is a tiny transformers LLaMA (hidden 64, 2 layers, vocab 128, GQA
so ``v_proj`` is 64 -> 32), built from a config: no download.
"""

from __future__ import annotations

import builtins
import copy
import io
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import quantplug as qp
import torch
from quantplug.testing.models import tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file, save_file

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
TARGETS = ["q_proj", "v_proj"]
R = 4
IN_FEATURES = {"q_proj": 64, "v_proj": 64}
OUT_FEATURES = {"q_proj": 64, "v_proj": 32}
Q0 = "model.layers.0.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"


@pytest.fixture(scope="module")
def base_model():
    return tiny_llama()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def targeted_paths(model) -> list[str]:
    return [p for p, _ in model.named_modules() if p.rsplit(".", 1)[-1] in TARGETS]


def randomize_magnitudes(model, adapter: str = "default", seed: int = 2) -> None:
    """DoRA starts with magnitude = ||W + s B A||, which makes it LoRA; move it so DoRA matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in qp.lora_layers(model, adapter).values():
            mag = layer.lora_magnitude[adapter]
            mag.mul_(torch.rand(mag.shape, generator=gen).add_(0.5))


def make_adapter(base_model, folder: Path, *, use_dora=False, use_rslora=False, seed=3) -> Path:
    model = copy.deepcopy(base_model)
    torch.manual_seed(seed)
    qp.attach(
        model,
        qp.LoraConfig(
            r=R, alpha=8, target_modules=TARGETS, init="random", use_dora=use_dora, use_rslora=use_rslora
        ),
    )
    if use_dora:
        randomize_magnitudes(model)
    qp.save_adapter(model, folder)
    return folder


# -- "the model is unchanged" -------------------------------------------------


def snapshot(model) -> dict:
    return {
        "modules": list(model.named_modules()),
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "adapters": {
            p: (layer.adapters, list(layer.active_adapters)) for p, layer in qp.lora_layers(model).items()
        },
        "training": model.training,
    }


def assert_unchanged(model, before: dict) -> None:
    modules = list(model.named_modules())
    assert [p for p, _ in modules] == [p for p, _ in before["modules"]], "module tree changed"
    for (path, module), (_, old) in zip(modules, before["modules"]):
        assert module is old, f"module at {path!r} was replaced"
    assert {
        p: (layer.adapters, list(layer.active_adapters)) for p, layer in qp.lora_layers(model).items()
    } == before["adapters"]
    state = model.state_dict()
    assert state.keys() == before["state"].keys()
    for key, tensor in state.items():
        old = before["state"][key]
        assert tensor.dtype == old.dtype and torch.equal(tensor, old), f"tensor {key!r} changed"
    assert {k: p.requires_grad for k, p in model.named_parameters()} == before["requires_grad"]
    assert model.training == before["training"]


# -- bad adapter folders ---------------------------------------------------------
#
# Each corruption takes a valid adapter folder, breaks it, and returns
# (the path to pass to load_adapter, strings the error message must contain).


def key(path: str, suffix: str = "lora_A.weight") -> str:
    return f"{PREFIX}{path}.{suffix}"


def _edit_config(folder: Path, **changes) -> None:
    data = json.loads((folder / CONFIG).read_text())
    data.update(changes)
    (folder / CONFIG).write_text(json.dumps(data))


def _edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(str(folder / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})


def folder_missing(folder: Path):
    gone = folder.parent / "no-such-adapter"
    return gone, [str(gone)]


def config_missing(folder: Path):
    (folder / CONFIG).unlink()
    return folder, [str(folder / CONFIG)]


def config_not_json(folder: Path):
    (folder / CONFIG).write_text('{"peft_type": "LORA", "r": 4,')
    return folder, [str(folder / CONFIG), "JSON"]


def config_not_utf8(folder: Path):
    (folder / CONFIG).write_bytes(b"\xff\xfe\x00garbage\x80")
    return folder, [str(folder / CONFIG)]


def config_not_object(folder: Path):
    (folder / CONFIG).write_text(json.dumps(["peft_type", "LORA"]))
    return folder, [str(folder / CONFIG)]


def config_wrong_peft_type(folder: Path):
    _edit_config(folder, peft_type="IA3")
    return folder, [str(folder / CONFIG), "peft_type", "IA3"]


def config_without_r(folder: Path):
    data = json.loads((folder / CONFIG).read_text())
    del data["r"]
    (folder / CONFIG).write_text(json.dumps(data))
    return folder, [str(folder / CONFIG), "'r'"]


def config_bad_r(folder: Path):
    _edit_config(folder, r=0)
    return folder, [str(folder / CONFIG), "r"]


def weights_missing(folder: Path):
    (folder / WEIGHTS).unlink()
    return folder, [str(folder / WEIGHTS)]


def truncated_safetensors(folder: Path):
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    return folder, [str(folder / WEIGHTS), "safetensors"]


def garbage_safetensors(folder: Path):
    (folder / WEIGHTS).write_bytes(bytes(range(256)) * 4)
    return folder, [str(folder / WEIGHTS), "safetensors"]


def empty_safetensors(folder: Path):
    (folder / WEIGHTS).write_bytes(b"")
    return folder, [str(folder / WEIGHTS)]


def wrong_shape_lora_A(folder: Path):
    _edit_tensors(folder, lambda t: t.__setitem__(key(Q0), torch.zeros(R + 1, IN_FEATURES["q_proj"])))
    return folder, [str(folder / WEIGHTS), key(Q0), str((R + 1, IN_FEATURES["q_proj"]))]


def wrong_shape_lora_B_transposed(folder: Path):
    # v_proj is 64 -> 32: a transposed lora_B (r, out) instead of (out, r)
    k = key(V1, "lora_B.weight")
    _edit_tensors(folder, lambda t: t.__setitem__(k, torch.zeros(R, OUT_FEATURES["v_proj"])))
    return folder, [str(folder / WEIGHTS), k]


def missing_lora_B(folder: Path):
    k = key(V1, "lora_B.weight")
    _edit_tensors(folder, lambda t: t.pop(k))
    return folder, [str(folder / WEIGHTS), k]


def key_for_absent_module(folder: Path):
    k = key("model.layers.7.self_attn.q_proj")
    _edit_tensors(folder, lambda t: t.__setitem__(k, torch.zeros(R, 64)))
    return folder, [str(folder / WEIGHTS), k]


def key_for_untargeted_module(folder: Path):
    # k_proj exists but the config targets q_proj and v_proj only
    k = key("model.layers.0.self_attn.k_proj")
    _edit_tensors(folder, lambda t: t.__setitem__(k, torch.zeros(R, 64)))
    return folder, [str(folder / WEIGHTS), k]


def key_with_adapter_name(folder: Path):
    # PEFT's in-memory form (lora_A.<adapter>.weight), which its files never hold
    def edit(t):
        t[f"{PREFIX}{Q0}.lora_A.default.weight"] = t.pop(key(Q0))

    _edit_tensors(folder, edit)
    return folder, [str(folder / WEIGHTS), f"{PREFIX}{Q0}.lora_A.default.weight"]


def key_unknown_kind(folder: Path):
    # what PEFT writes for lora_bias=True: quantplug cannot represent it
    k = key(Q0, "lora_B.bias")
    _edit_tensors(folder, lambda t: t.__setitem__(k, torch.zeros(64)))
    return folder, [str(folder / WEIGHTS), k]


def target_modules_absent(folder: Path):
    _edit_config(folder, target_modules=["c_attn", "c_proj"])
    return folder, [str(folder / CONFIG), "target_modules"]


def target_modules_unsupported_layer(folder: Path):
    # nn.Embedding: a layer no backend claims
    _edit_config(folder, target_modules=["embed_tokens"])
    return folder, [str(folder / CONFIG), "target_modules", "Embedding"]


def config_rank_pattern(folder: Path):
    _edit_config(folder, rank_pattern={"q_proj": 8})
    return folder, [str(folder / CONFIG), "rank_pattern"]


def config_bias_all(folder: Path):
    _edit_config(folder, bias="all")
    return folder, [str(folder / CONFIG), "bias"]


def target_modules_invalid_regex(folder: Path):
    _edit_config(folder, target_modules="model.layers.(q_proj")
    return folder, [str(folder / CONFIG), "target_modules"]


def nan_in_tensor(folder: Path):
    k = key(V1, "lora_B.weight")

    def edit(t):
        t[k][0, 0] = float("nan")

    _edit_tensors(folder, edit)
    return folder, [str(folder / WEIGHTS), k]


def inf_in_tensor(folder: Path):
    def edit(t):
        t[key(Q0)][1, 2] = float("inf")

    _edit_tensors(folder, edit)
    return folder, [str(folder / WEIGHTS), key(Q0)]


def magnitude_without_dora(folder: Path):
    # a DoRA magnitude vector in a file whose config says use_dora=false
    k = f"{PREFIX}{Q0}.lora_magnitude_vector"
    _edit_tensors(folder, lambda t: t.__setitem__(k, torch.ones(OUT_FEATURES["q_proj"])))
    return folder, [str(folder / WEIGHTS), k]


CORRUPTIONS = [
    folder_missing,
    config_missing,
    config_not_json,
    config_not_utf8,
    config_not_object,
    config_wrong_peft_type,
    config_without_r,
    config_bad_r,
    config_rank_pattern,
    config_bias_all,
    weights_missing,
    truncated_safetensors,
    garbage_safetensors,
    empty_safetensors,
    wrong_shape_lora_A,
    wrong_shape_lora_B_transposed,
    missing_lora_B,
    key_for_absent_module,
    key_for_untargeted_module,
    key_with_adapter_name,
    key_unknown_kind,
    target_modules_absent,
    target_modules_unsupported_layer,
    nan_in_tensor,
    inf_in_tensor,
    target_modules_invalid_regex,
    magnitude_without_dora,
]


@pytest.fixture(scope="module")
def good_adapter(base_model, tmp_path_factory) -> Path:
    return make_adapter(base_model, tmp_path_factory.mktemp("good") / "adapter")


@pytest.fixture(params=["plain", "has-other-adapter"])
def target_model(request, base_model, good_adapter):
    model = copy.deepcopy(base_model)
    if request.param == "has-other-adapter":
        qp.load_adapter(model, good_adapter, adapter="other")
        assert qp.lora_layers(model, "other")
    return model


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
def test_bad_adapter_raises_and_leaves_model_unchanged(corrupt, target_model, good_adapter, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(good_adapter, folder)
    path, expected = corrupt(folder)
    before = snapshot(target_model)
    with pytest.raises(qp.AdapterFileError) as info:
        qp.load_adapter(target_model, path, adapter="new")
    message = str(info.value)
    for part in expected:
        assert part in message, f"message {message!r} does not mention {part!r}"
    assert_unchanged(target_model, before)


def test_good_adapter_fixture_loads(base_model, good_adapter, ids):
    """The corruptions above start from a folder that does load, into both model states."""
    model = copy.deepcopy(base_model)
    qp.load_adapter(model, good_adapter, adapter="new")
    assert sorted(qp.lora_layers(model, "new")) == sorted(targeted_paths(base_model))
    assert not torch.allclose(logits(model, ids), logits(base_model, ids))


def _pickle_that_touches(marker: Path) -> bytes:
    class Touch:
        def __reduce__(self):
            return (builtins.open, (str(marker), "w"))

    return pickle.dumps({"base_model.model.x.lora_A.weight": Touch()})


def test_pickle_payload_would_run(tmp_path):
    """The check below means something: unpickling this payload does create its marker file."""
    marker = tmp_path / "ran"
    pickle.loads(_pickle_that_touches(marker)).popitem()[1].close()
    assert marker.exists()


@pytest.mark.parametrize("pickle_name", ["adapter_model.bin", "adapter_model.pt"])
def test_pickle_adapter_is_refused_and_never_opened(
    pickle_name, target_model, good_adapter, tmp_path, monkeypatch
):
    folder = tmp_path / "adapter"
    shutil.copytree(good_adapter, folder)
    (folder / WEIGHTS).unlink()
    marker = tmp_path / "unpickled-marker"
    (folder / pickle_name).write_bytes(_pickle_that_touches(marker))

    opened: list[str] = []
    for owner, name in ((builtins, "open"), (io, "open"), (os, "open")):
        real = getattr(owner, name)

        def spy(file, *args, _real=real, **kwargs):
            if isinstance(file, (str, os.PathLike)):
                opened.append(os.fspath(file))
            return _real(file, *args, **kwargs)

        monkeypatch.setattr(owner, name, spy)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load was called"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle.loads was called"))

    before = snapshot(target_model)
    with pytest.raises(qp.AdapterFileError) as info:
        qp.load_adapter(target_model, folder, adapter="new")
    monkeypatch.undo()
    message = str(info.value)
    assert str(folder / WEIGHTS) in message
    assert pickle_name in message
    assert "never" in message and "pickle" in message
    assert not marker.exists(), "the pickle file was unpickled"
    assert not any(os.path.basename(p) == pickle_name for p in opened), f"{pickle_name} was opened: {opened}"
    assert_unchanged(target_model, before)


def test_loading_under_an_existing_name_raises(base_model, good_adapter, tmp_path):
    model = copy.deepcopy(base_model)
    qp.load_adapter(model, good_adapter)  # "default"
    with torch.no_grad():
        for layer in qp.lora_layers(model).values():  # so a reload would visibly overwrite them
            layer.lora_B["default"].add_(1.0)
    before = snapshot(model)
    with pytest.raises(qp.AdapterFileError) as info:
        qp.load_adapter(model, good_adapter, adapter="default")
    assert "'default'" in str(info.value)
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", ["a.b", "__base__", ""])
def test_invalid_adapter_name_raises_and_leaves_model_unchanged(name, base_model, good_adapter):
    model = copy.deepcopy(base_model)
    before = snapshot(model)
    with pytest.raises(ValueError):
        qp.load_adapter(model, good_adapter, adapter=name)
    assert_unchanged(model, before)


# -- round trips --------------------------------------------------------------------


VARIANTS = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "dora-rslora": {"use_dora": True, "use_rslora": True},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_then_load_gives_identical_outputs(variant, base_model, ids, tmp_path):
    kwargs = VARIANTS[variant]
    model = copy.deepcopy(base_model)
    torch.manual_seed(5)
    qp.attach(model, qp.LoraConfig(r=R, alpha=8, target_modules=TARGETS, init="random", **kwargs))
    if kwargs.get("use_dora"):
        randomize_magnitudes(model)
    want = logits(model, ids)
    assert not torch.allclose(want, logits(base_model, ids)), "the adapter must change the output"
    qp.save_adapter(model, tmp_path / "a")

    fresh = copy.deepcopy(base_model)
    qp.load_adapter(fresh, tmp_path / "a")
    assert torch.equal(logits(fresh, ids), want)
    saved, loaded = qp.lora_layers(model), qp.lora_layers(fresh)
    assert saved.keys() == loaded.keys()
    for path, layer in saved.items():
        other = loaded[path]
        assert other.scaling["default"] == layer.scaling["default"]
        for store in ("lora_A", "lora_B", "lora_magnitude"):
            assert getattr(other, store).keys() == getattr(layer, store).keys()
            for name, param in getattr(layer, store).items():
                assert torch.equal(getattr(other, store)[name], param), (path, store)


def test_load_under_second_name_matches_original(base_model, ids, tmp_path):
    """An adapter loaded beside another one, then made the only active one, reproduces its outputs."""
    model = copy.deepcopy(base_model)
    torch.manual_seed(6)
    qp.attach(model, qp.LoraConfig(r=R, alpha=8, target_modules=TARGETS, init="random"))
    want = logits(model, ids)
    qp.save_adapter(model, tmp_path / "a")

    other = copy.deepcopy(base_model)
    torch.manual_seed(7)
    qp.attach(other, qp.LoraConfig(r=2, alpha=4, target_modules=["q_proj"], init="random"))
    qp.load_adapter(other, tmp_path / "a", adapter="second")
    qp.set_adapter(other, "second")
    assert torch.equal(logits(other, ids), want)


@pytest.mark.parametrize("variant", VARIANTS)
def test_saved_files_follow_peft_format(variant, base_model, tmp_path):
    kwargs = VARIANTS[variant]
    folder = make_adapter(base_model, tmp_path / "a", **kwargs)
    assert sorted(os.listdir(folder)) == [CONFIG, WEIGHTS]

    config = json.loads((folder / CONFIG).read_text())
    assert config["peft_type"] == "LORA"
    assert config["r"] == R
    assert config["lora_alpha"] == 8
    assert config["target_modules"] == TARGETS
    assert config["use_dora"] is bool(kwargs.get("use_dora"))
    assert config["use_rslora"] is bool(kwargs.get("use_rslora"))
    assert config.get("bias", "none") == "none"
    assert not config.get("fan_in_fan_out", False)

    tensors = load_file(str(folder / WEIGHTS))
    expected = {}
    for path in targeted_paths(base_model):
        name = path.rsplit(".", 1)[-1]
        expected[f"{PREFIX}{path}.lora_A.weight"] = (R, IN_FEATURES[name])
        expected[f"{PREFIX}{path}.lora_B.weight"] = (OUT_FEATURES[name], R)
        if kwargs.get("use_dora"):
            expected[f"{PREFIX}{path}.lora_magnitude_vector"] = (OUT_FEATURES[name],)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    assert all(v.dtype == torch.float32 for v in tensors.values())
    with safe_open(str(folder / WEIGHTS), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_saved_tensors_are_the_adapter(base_model, tmp_path):
    model = copy.deepcopy(base_model)
    torch.manual_seed(8)
    qp.attach(model, qp.LoraConfig(r=R, alpha=8, target_modules=TARGETS, init="random", use_dora=True))
    randomize_magnitudes(model)
    qp.save_adapter(model, tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / WEIGHTS))
    for path, layer in qp.lora_layers(model).items():
        assert torch.equal(tensors[f"{PREFIX}{path}.lora_A.weight"], layer.lora_A["default"])
        assert torch.equal(tensors[f"{PREFIX}{path}.lora_B.weight"], layer.lora_B["default"])
        assert torch.equal(tensors[f"{PREFIX}{path}.lora_magnitude_vector"], layer.lora_magnitude["default"])


def test_save_writes_atomically(base_model, tmp_path, monkeypatch):
    folder = make_adapter(base_model, tmp_path / "a", seed=3)
    assert sorted(os.listdir(folder)) == [CONFIG, WEIGHTS]
    old = {name: (folder / name).read_bytes() for name in (CONFIG, WEIGHTS)}

    # overwriting with another adapter replaces both files and leaves nothing else
    model = copy.deepcopy(base_model)
    torch.manual_seed(9)
    qp.attach(model, qp.LoraConfig(r=2, alpha=4, target_modules=["q_proj"], init="random"))
    qp.save_adapter(model, folder)
    assert sorted(os.listdir(folder)) == [CONFIG, WEIGHTS]
    assert json.loads((folder / CONFIG).read_text())["r"] == 2
    assert (folder / WEIGHTS).read_bytes() != old[WEIGHTS]
    replaced = {name: (folder / name).read_bytes() for name in (CONFIG, WEIGHTS)}

    # a write that dies half way leaves the previous files whole and no temporary file
    import safetensors.torch

    real_save = safetensors.torch.save_file

    def dying_save(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(10)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", dying_save)
    other = copy.deepcopy(base_model)
    qp.attach(other, qp.LoraConfig(r=R, alpha=8, target_modules=TARGETS, init="random"))
    with pytest.raises(OSError, match="disk full"):
        qp.save_adapter(other, folder)
    assert sorted(os.listdir(folder)) == [CONFIG, WEIGHTS]
    assert {name: (folder / name).read_bytes() for name in (CONFIG, WEIGHTS)} == replaced


def test_save_without_adapter_raises(base_model, tmp_path):
    model = copy.deepcopy(base_model)
    with pytest.raises(ValueError, match="default"):
        qp.save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists() or not os.listdir(tmp_path / "a")

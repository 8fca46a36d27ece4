"""LoraConfig and adapter_config.json under misuse (issue 15): every bad value is refused, never coerced.

Each refusal names the argument (``LoraConfig.r``) or the file and key
(``'.../adapter_config.json': key 'lora_alpha'``), shows the bad value and
says what to write instead. A refused assignment leaves the config as it
was; a refused file leaves the model as it was.
"""

from __future__ import annotations

import copy
import json
import math
import pickle

import pytest
import quantplug as qp
import torch
from quantplug._config import LoraConfigError
from torch import nn

NAN, INF = float("nan"), float("inf")

# (argument, bad value, what the message must say) for LoraConfig(...)
BAD_ARGUMENTS = [
    ("r", True, r"LoraConfig.r is True, a boolean; it must be a positive integer"),
    ("r", "4", r"LoraConfig.r is the string '4'; .*write 4 without quotes"),
    ("r", 4.9, r"LoraConfig.r is 4.9, a float; .*does not round it\): pick 4 or 5"),
    ("r", 4.0, r"LoraConfig.r is 4.0, a float; it must be an integer: write 4"),
    ("r", 0, r"LoraConfig.r is 0; it must be a positive integer"),
    ("r", -8, r"LoraConfig.r is -8; it must be a positive integer"),
    ("r", None, r"LoraConfig.r is None, None; it must be a positive integer"),
    ("r", NAN, r"LoraConfig.r is nan"),
    ("alpha", NAN, r"LoraConfig.alpha is nan; it must be a finite number.*NaN or infinity"),
    ("alpha", INF, r"LoraConfig.alpha is inf; it must be a finite number"),
    ("alpha", -INF, r"LoraConfig.alpha is -inf"),
    ("alpha", "16", r"LoraConfig.alpha is the string '16'; it must be a number: write 16 without quotes"),
    ("alpha", True, r"LoraConfig.alpha is True, a boolean"),
    ("alpha", [16], r"LoraConfig.alpha is \[16\], a list"),
    ("alpha", torch.tensor(16.0), r"LoraConfig.alpha is tensor\(16.\), a Tensor"),
    ("dropout", 1.0, r"LoraConfig.dropout is 1.0; it must be in \[0, 1\)"),
    ("dropout", -0.1, r"LoraConfig.dropout is -0.1; it must be in \[0, 1\)"),
    ("dropout", NAN, r"LoraConfig.dropout is nan; it must be a finite number"),
    ("dropout", "0.1", r"LoraConfig.dropout is the string '0.1'.*write 0.1 without quotes"),
    ("dropout", False, r"LoraConfig.dropout is False, a boolean"),
    (
        "dtype",
        "float16",
        r"LoraConfig.dtype is the string 'float16'; pass a torch dtype: dtype=torch.float16",
    ),
    ("dtype", "torch.bfloat16", r"dtype=torch.bfloat16"),
    ("dtype", "half", r"LoraConfig.dtype is the string 'half'; pass a torch dtype: one of torch.float32"),
    ("dtype", torch.int8, r"LoraConfig.dtype is torch.int8, which adapters cannot train in"),
    ("dtype", torch.bool, r"LoraConfig.dtype is torch.bool"),
    ("dtype", torch.complex64, r"LoraConfig.dtype is torch.complex64"),
    ("dtype", torch.float8_e4m3fn, r"LoraConfig.dtype is torch.float8_e4m3fn"),
    ("dtype", float, r"LoraConfig.dtype is <class 'float'>, a type"),
    ("init", "gaussian", r"LoraConfig.init is 'gaussian'; known values: 'default', 'random'"),
    ("init", True, r"LoraConfig.init is True"),
    ("use_dora", "true", r"LoraConfig.use_dora is 'true', a string; it must be True or False"),
    ("use_dora", 1, r"LoraConfig.use_dora is 1, an integer; it must be True or False"),
    ("use_rslora", None, r"LoraConfig.use_rslora is None"),
    ("use_qalora", "yes", r"LoraConfig.use_qalora is 'yes'"),
    ("target_modules", [], r"LoraConfig.target_modules is empty, so no layer would get an adapter"),
    ("target_modules", ["q_proj", 3], r"LoraConfig.target_modules holds 3, an integer"),
    ("target_modules", ["q_proj", ""], r"LoraConfig.target_modules holds ''"),
    ("target_modules", "", r"LoraConfig.target_modules is the empty string"),
    ("target_modules", "q_proj(", r"LoraConfig.target_modules 'q_proj\(' is not a valid regex"),
    ("target_modules", 5, r"LoraConfig.target_modules is 5, an integer; it must be a list of module names"),
    ("target_modules", None, r"LoraConfig.target_modules is None"),
    ("exclude_modules", [None], r"LoraConfig.exclude_modules holds None"),
    ("exclude_modules", 0, r"LoraConfig.exclude_modules is 0, an integer; .* or None"),
]


@pytest.mark.parametrize(("name", "value", "expected"), BAD_ARGUMENTS, ids=lambda v: repr(v)[:20])
def test_bad_arguments_are_refused_naming_argument_value_and_fix(name, value, expected):
    with pytest.raises(LoraConfigError, match=expected):
        qp.LoraConfig(**{name: value})


@pytest.mark.parametrize(("name", "value", "expected"), BAD_ARGUMENTS, ids=lambda v: repr(v)[:20])
def test_a_bad_assignment_is_refused_and_the_config_keeps_its_value(name, value, expected):
    config = qp.LoraConfig(r=4, alpha=8, target_modules=["q"])
    before = copy.deepcopy(config)
    with pytest.raises(LoraConfigError, match=expected):
        setattr(config, name, value)
    assert config == before and config.scale == before.scale


def test_the_errors_are_value_errors_and_type_errors():
    """Code that caught ValueError (r, dropout) or TypeError (target_modules) before keeps working."""
    with pytest.raises(ValueError):
        qp.LoraConfig(r=0)
    with pytest.raises(TypeError):
        qp.LoraConfig(target_modules=5)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"use_qalora": True, "qalora_group_size": 0}, r"qalora_group_size is 0"),
        ({"use_qalora": True, "qalora_group_size": True}, r"qalora_group_size is True, a boolean"),
        ({"use_qalora": True, "qalora_group_size": "32"}, r"qalora_group_size is the string '32'"),
        ({"use_qalora": True, "qalora_group_size": 2.5}, r"qalora_group_size is 2.5"),
        ({"qalora_group_size": 32}, r"qalora_group_size is set but LoraConfig.use_qalora is False"),
        ({"use_qalora": True, "use_dora": True}, r"use_qalora and use_dora cannot be combined"),
    ],
)
def test_bad_combinations(settings, expected):
    with pytest.raises(LoraConfigError, match=expected):
        qp.LoraConfig(**settings)


def test_an_assignment_that_breaks_a_combination_is_undone():
    config = qp.LoraConfig(use_qalora=True, qalora_group_size=32)
    with pytest.raises(LoraConfigError, match="use_qalora is False"):
        config.use_qalora = False
    assert config.use_qalora is True


def test_good_values_are_kept_as_given():
    import numpy as np

    config = qp.LoraConfig(
        r=np.int64(4), alpha=16, dropout=0, target_modules=("q", "v"), dtype=torch.bfloat16, use_dora=True
    )
    assert type(config.r) is int and config.r == 4
    assert config.alpha == 16 and type(config.alpha) is int  # written back as 16, not 16.0
    assert config.target_modules == ["q", "v"] and config.dtype is torch.bfloat16
    assert qp.LoraConfig(target_modules={"v", "q"}).target_modules == ["q", "v"]
    assert qp.LoraConfig(alpha=np.float32(0.5)).alpha == 0.5
    assert qp.LoraConfig(alpha=-4).scale == -0.5  # a negative scale is unusual, not wrong
    config.r = 8
    assert config.scale == 2.0
    assert copy.deepcopy(config) == config and pickle.loads(pickle.dumps(config)) == config
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64, None):
        assert qp.LoraConfig(dtype=dtype).dtype is dtype


# -- adapter_config.json ----------------------------------------------------------------------------

# (key, bad JSON value, what the message must say)
BAD_KEYS = [
    ("r", "4", r"key 'r' is the string \"4\"; .*write 4 without quotes"),
    ("r", True, r"key 'r' is true, a boolean"),
    ("r", 4.9, r"key 'r' is 4.9, a float; .*pick 4 or 5"),
    ("r", 0, r"key 'r' is 0; it must be a positive integer"),
    ("r", None, r"key 'r' is null, null"),
    ("lora_alpha", NAN, r"key 'lora_alpha' is NaN; it must be a finite number"),
    ("lora_alpha", INF, r"key 'lora_alpha' is Infinity"),
    (
        "lora_alpha",
        "16",
        r"key 'lora_alpha' is the string \"16\"; it must be a number: write 16 without quotes",
    ),
    ("lora_alpha", None, r"key 'lora_alpha' is null"),
    ("lora_alpha", False, r"key 'lora_alpha' is false, a boolean"),
    ("lora_dropout", 1.5, r"key 'lora_dropout' is 1.5; it must be in \[0, 1\)"),
    ("lora_dropout", "0.1", r"key 'lora_dropout' is the string \"0.1\""),
    ("use_dora", "false", r"key 'use_dora' is \"false\", a string; it must be true or false \(no quotes\)"),
    ("use_dora", 0, r"key 'use_dora' is 0, an integer"),
    ("use_rslora", None, r"key 'use_rslora' is null"),
    ("use_qalora", "true", r"key 'use_qalora' is \"true\", a string"),
    ("target_modules", None, r"key 'target_modules' is null"),
    ("target_modules", [], r"key 'target_modules' is empty"),
    ("target_modules", [1, 2], r"key 'target_modules' holds 1, an integer"),
    ("target_modules", {"q": 1}, r"key 'target_modules' is \{\"q\": 1\}, an object"),
    ("exclude_modules", 3, r"key 'exclude_modules' is 3"),
    ("peft_type", "IA3", r"key 'peft_type' is 'IA3'"),
    ("bias", "all", r"key 'bias' is 'all'"),
]


def adapter(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    qp.attach(model, qp.LoraConfig(r=2, alpha=4, target_modules=["0", "2"], init="random"))
    return qp.save_adapter(model, tmp_path / "adapter")


@pytest.mark.parametrize(("key", "value", "expected"), BAD_KEYS, ids=lambda v: repr(v)[:20])
def test_bad_keys_in_adapter_config_are_refused_naming_file_key_value(tmp_path, key, value, expected):
    folder = adapter(tmp_path)
    data = json.loads((folder / "adapter_config.json").read_text())
    data[key] = value
    (folder / "adapter_config.json").write_text(json.dumps(data))  # NaN and Infinity as Python writes them
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(qp.AdapterFileError, match=rf"adapter_config.json': {expected}"):
        qp.load_adapter(model, folder)
    assert not qp.lora_layers(model) and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_nan_alpha_never_reaches_the_outputs(tmp_path):
    """The defect: NaN alpha loaded and every output became NaN."""
    folder = adapter(tmp_path)
    data = json.loads((folder / "adapter_config.json").read_text())
    data["lora_alpha"] = NAN
    (folder / "adapter_config.json").write_text(json.dumps(data))
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(qp.AdapterFileError):
        qp.load_adapter(model, folder)
    assert not math.isnan(model(torch.ones(1, 8)).sum().item())


def test_peft_spellings_still_load(tmp_path):
    """What PEFT itself writes: integer alpha, null dropout, qalora_group_size without use_qalora."""
    folder = adapter(tmp_path)
    data = json.loads((folder / "adapter_config.json").read_text())
    data.update(lora_alpha=4, lora_dropout=None, qalora_group_size=16, use_qalora=False)
    del data["use_dora"], data["use_rslora"]  # older PEFT files lack them
    (folder / "adapter_config.json").write_text(json.dumps(data))
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    qp.load_adapter(model, folder)
    config = model[0].configs["default"]
    assert (config.r, config.alpha, config.dropout, config.use_dora) == (2, 4, 0.0, False)

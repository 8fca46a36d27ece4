"""The adapter configuration users pass to ``qp.attach``."""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LoraConfig:
    """Which layers get an adapter, and its shape.

    :param r: rank of the adapter.
    :param alpha: scaling numerator: the update is ``alpha / r * B @ A``
        (``alpha / sqrt(r)`` with ``use_rslora``).
    :param dropout: dropout on the adapter's input while training.
    :param target_modules: as in PEFT: a list of module names or name
        suffixes (``["q_proj", "v_proj"]``), a single regex string matched
        against the full module path, or ``"all-linear"`` for every linear
        and quantized layer except an output head called ``lm_head``.
    :param use_dora: weight-decomposed LoRA (DoRA): a learned magnitude per
        output row over the direction ``W + scale * B @ A``.
    :param use_rslora: rank-stabilized scaling ``alpha / sqrt(r)``.
    :param dtype: dtype of the adapter weights, a torch dtype:
        ``torch.float32``, ``torch.bfloat16``, ``torch.float16`` or
        ``torch.float64`` (a string such as ``"float16"`` is refused: one
        spelling, torch's). ``None`` keeps them in the
        layer's compute dtype (bf16, fp32), so no cast happens on every call,
        except for fp16 compute, where adapters are fp32 (fp16 adapters
        overflow under AdamW without loss scaling); pass ``torch.float16``
        to serve fp16 adapters anyway.
    :param init: ``"default"`` (A Kaiming-uniform, B zero: the adapter
        starts as a no-op, as in PEFT) or ``"random"`` (B random too, for
        tests and benchmarks that need a non-zero adapter).
    :param exclude_modules: names, suffixes or a regex never targeted.
    :param use_qalora: quantization-aware LoRA (QALoRA, Xu et al. 2023):
        the adapter sees its input averaged over groups of
        ``qalora_group_size`` consecutive columns (times the number of
        groups, as PEFT computes it), so ``A`` is ``(r, in_features / g)``
        and the update is constant within each group. With groups equal to
        the layer's quantization groups, ``qp.merge(mode="zeros")`` folds
        the adapter into the zero points and leaves the quantized codes as
        they are. Not with ``use_dora``.
    :param qalora_group_size: the pooling group ``g``; ``None`` takes each
        layer's own quantization group size (which its backend reports), an
        error on layers without one. Must divide ``in_features``.

    Every argument is checked when the config is built, and again on every
    assignment to a field afterwards (a bad one leaves the config as it was):
    a bool is not a number, a string is not a number, ``r`` is a positive
    integer (never rounded), ``alpha`` and ``dropout`` are finite, ``dropout``
    is in [0, 1). A bad value raises :class:`LoraConfigError` (a
    ``ValueError``) naming the argument, the value and the fix;
    :meth:`from_peft_dict` does the same for ``adapter_config.json``, naming
    the key.
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    use_dora: bool = False
    use_rslora: bool = False
    dtype: Any = None
    init: str = "default"
    exclude_modules: list[str] | str | None = None
    use_qalora: bool = False
    qalora_group_size: int | None = None

    def __post_init__(self) -> None:
        _validate(self, lambda name: f"LoraConfig.{name}")
        object.__setattr__(self, "_checked", True)

    def __setattr__(self, name: str, value: Any) -> None:
        """An assignment after construction is validated like the constructor's argument; a bad one
        raises and leaves the config as it was."""
        if "_checked" not in self.__dict__ or name not in _FIELDS:
            object.__setattr__(self, name, value)
            return
        old = self.__dict__[name]
        object.__setattr__(self, name, value)
        try:
            _validate(self, lambda field_name: f"LoraConfig.{field_name}")
        except LoraConfigError:
            object.__setattr__(self, name, old)
            raise

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def targets(self, path: str) -> bool:
        """Whether the module at ``path`` (dotted, from the model root) is targeted."""
        if self.exclude_modules is not None and _matches(self.exclude_modules, path):
            return False
        if self.target_modules == "all-linear":
            return path.rsplit(".", 1)[-1] != "lm_head"
        return _matches(self.target_modules, path)

    def to_peft_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` PEFT writes for the same adapter.

        QALoRA adapters add PEFT's ``use_qalora`` and ``qalora_group_size``; a
        ``None`` group size is written as the layers' own by ``qp.save_adapter``.
        """
        qalora = {"use_qalora": True, "qalora_group_size": self.qalora_group_size} if self.use_qalora else {}
        return {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": None,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.target_modules,
            "exclude_modules": self.exclude_modules,
            "use_dora": self.use_dora,
            "use_rslora": self.use_rslora,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            **qalora,
        }

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Read a PEFT ``adapter_config.json``; raises :class:`LoraConfigError` (a ``ValueError``)
        naming the key, its value and the fix, on what quantplug cannot load."""
        if data.get("peft_type", "LORA") != "LORA":
            raise LoraConfigError(
                f"key 'peft_type' is {data.get('peft_type')!r}; quantplug loads LoRA adapters only"
            )
        for key in ("rank_pattern", "alpha_pattern"):
            if data.get(key):
                raise LoraConfigError(f"key {key!r} is set; per-layer ranks are not supported yet")
        if data.get("bias", "none") != "none":
            raise LoraConfigError(
                f"key 'bias' is {data['bias']!r}: only adapters trained with bias='none' load"
            )
        if "r" not in data or "target_modules" not in data:
            raise LoraConfigError("needs the keys 'r' and 'target_modules'")
        use_qalora = data.get("use_qalora", False)
        if use_qalora is not True:
            # PEFT writes qalora_group_size=16 (its default) into every config: without use_qalora it means nothing
            _boolean(use_qalora, "key 'use_qalora'", _json_text)
            group = None
        else:
            group = data.get("qalora_group_size")
            if group is None:
                raise LoraConfigError(
                    "key 'use_qalora' is true and key 'qalora_group_size' is null; it must be a positive "
                    "integer: the group of input columns the adapter was trained to pool over"
                )
        dropout = data.get("lora_dropout", 0.0)
        settings = {
            "r": data["r"],
            "alpha": data.get("lora_alpha", data["r"]),
            "dropout": 0.0 if dropout is None else dropout,
            "target_modules": data["target_modules"],
            "use_dora": data.get("use_dora", False),
            "use_rslora": data.get("use_rslora", False),
            "exclude_modules": data.get("exclude_modules"),
            "use_qalora": use_qalora,
            "qalora_group_size": group,
        }
        json_keys = {"alpha": "lora_alpha", "dropout": "lora_dropout"}
        checked = _checked_values(settings, lambda name: f"key {json_keys.get(name, name)!r}", json=True)
        return cls(**checked)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dtype"] = None if self.dtype is None else str(self.dtype)
        return d


class LoraConfigError(ValueError, TypeError):
    """A ``LoraConfig`` argument or an ``adapter_config.json`` key has a value quantplug refuses.

    The message names the argument (``LoraConfig.alpha``) or the key (``key 'lora_alpha'``), the
    bad value and the fix. It is a ``ValueError`` and a ``TypeError``, so code that caught either
    before keeps working.
    """


_FIELDS = (
    "r", "alpha", "dropout", "target_modules", "use_dora", "use_rslora", "dtype", "init",
    "exclude_modules", "use_qalora", "qalora_group_size",
)  # fmt: skip
INITS = ("default", "random")
ADAPTER_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _validate(config: LoraConfig, label) -> None:
    """Check every field (types first, then ranges, then combinations) and store the normal forms."""
    values = _checked_values({name: config.__dict__[name] for name in _FIELDS}, label)
    for name, value in values.items():
        object.__setattr__(config, name, value)
    if values["qalora_group_size"] is not None and not values["use_qalora"]:
        raise LoraConfigError(
            f"{label('qalora_group_size')} is set but {label('use_qalora')} is False; set use_qalora=True"
        )
    if values["use_qalora"] and values["use_dora"]:
        # as in PEFT; DoRA rescales whole rows by W's norms, so its update is not constant per group
        raise LoraConfigError("LoraConfig: use_qalora and use_dora cannot be combined; pick one")


def _checked_values(values: dict[str, Any], label, json: bool = False) -> dict[str, Any]:
    show = _json_text if json else repr
    out = dict(values)
    out["r"] = _positive_int(values["r"], label("r"), show, example=8)
    out["alpha"] = _finite(values["alpha"], label("alpha"), show, example=16)
    dropout = _finite(values["dropout"], label("dropout"), show, example=0.05)
    if not 0.0 <= dropout < 1.0:
        raise LoraConfigError(
            f"{label('dropout')} is {show(dropout)}; it must be in [0, 1), e.g. 0.05 (0: no dropout)"
        )
    out["dropout"] = dropout
    for name in ("use_dora", "use_rslora", "use_qalora"):
        out[name] = _boolean(values[name], label(name), show)
    if values["qalora_group_size"] is not None:
        out["qalora_group_size"] = _positive_int(
            values["qalora_group_size"], label("qalora_group_size"), show, example=32
        )
    out["target_modules"] = _patterns(values["target_modules"], label("target_modules"), show, optional=False)
    out["exclude_modules"] = _patterns(
        values["exclude_modules"], label("exclude_modules"), show, optional=True
    )
    if not json:
        out["dtype"] = _adapter_dtype(values["dtype"], label("dtype"))
        if values["init"] not in INITS:
            raise LoraConfigError(
                f"{label('init')} is {values['init']!r}; known values: {', '.join(map(repr, INITS))}"
            )
    return out


def _json_text(value: Any) -> str:
    """``value`` as it reads in the JSON file (``true``, ``null``, ``NaN``, ``"4"``)."""
    import json

    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


_KINDS = {
    bool: "a boolean",
    str: "a string",
    int: "an integer",
    float: "a float",
    list: "a list",
    dict: "an object",
}


def _kind(value: Any, show) -> str:
    if value is None:
        return "null" if show is _json_text else "None"
    return _KINDS.get(type(value), f"a {type(value).__name__}")


def _positive_int(value: Any, where: str, show, example: int) -> int:
    if isinstance(value, bool):  # True is an int to Python; as a rank it is a mistake
        raise LoraConfigError(
            f"{where} is {show(value)}, a boolean; it must be a positive integer, e.g. {example}"
        )
    if isinstance(value, numbers.Integral):
        if value <= 0:
            raise LoraConfigError(f"{where} is {show(value)}; it must be a positive integer, e.g. {example}")
        return int(value)
    if isinstance(value, str):
        fix = f"write {value.strip()} without quotes" if value.strip().isdigit() else f"e.g. {example}"
        raise LoraConfigError(f"{where} is the string {show(value)}; it must be a positive integer: {fix}")
    if isinstance(value, numbers.Real) and math.isfinite(value):
        if float(value).is_integer():
            raise LoraConfigError(
                f"{where} is {show(value)}, a float; it must be an integer: write {int(value)}"
            )
        low = math.floor(value)
        raise LoraConfigError(
            f"{where} is {show(value)}, a float; it must be a positive integer (quantplug does not round it): "
            f"pick {max(low, 1)} or {low + 1}"
        )
    raise LoraConfigError(
        f"{where} is {show(value)}, {_kind(value, show)}; it must be a positive integer, e.g. {example}"
    )


def _finite(value: Any, where: str, show, example: float) -> float:
    if isinstance(value, bool):
        raise LoraConfigError(f"{where} is {show(value)}, a boolean; it must be a number, e.g. {example}")
    if isinstance(value, str):
        try:
            float(value)
            fix = f"write {value.strip()} without quotes"
        except ValueError:
            fix = f"e.g. {example}"
        raise LoraConfigError(f"{where} is the string {show(value)}; it must be a number: {fix}")
    if not isinstance(value, numbers.Real):
        raise LoraConfigError(
            f"{where} is {show(value)}, {_kind(value, show)}; it must be a finite number, e.g. {example}"
        )
    if not math.isfinite(value):
        raise LoraConfigError(
            f"{where} is {show(value)}; it must be a finite number, e.g. {example} (NaN or infinity would "
            "make every output of the adapted layers NaN)"
        )
    return value if type(value) in (int, float) else float(value)  # 16 stays 16 in adapter_config.json


def _boolean(value: Any, where: str, show) -> bool:
    if isinstance(value, bool):
        return value
    fix = "true or false (no quotes)" if show is _json_text else "True or False"
    raise LoraConfigError(f"{where} is {show(value)}, {_kind(value, show)}; it must be {fix}")


def _patterns(value: Any, where: str, show, optional: bool) -> list[str] | str | None:
    """Module names/suffixes (a list), or one regex matched against the full path (a str)."""
    if value is None and optional:
        return None
    if isinstance(value, str):
        if not value:
            raise LoraConfigError(
                f"{where} is the empty string; give module names, e.g. ['q_proj', 'v_proj']"
            )
        if value != "all-linear":
            try:
                re.compile(value)
            except re.error as exc:
                raise LoraConfigError(f"{where} {show(value)} is not a valid regex: {exc}") from None
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        names = list(value)
        bad = [name for name in names if not isinstance(name, str) or not name]
        if bad:
            raise LoraConfigError(
                f"{where} holds {show(bad[0])}, {_kind(bad[0], show)}; every entry must be a module name or "
                "suffix such as 'q_proj'"
            )
        if not names and not optional:
            raise LoraConfigError(
                f"{where} is empty, so no layer would get an adapter; e.g. ['q_proj', 'v_proj']"
            )
        return sorted(names) if isinstance(value, (set, frozenset)) else names
    none = " or None" if optional else ""
    raise LoraConfigError(
        f"{where} is {show(value)}, {_kind(value, show)}; it must be a list of module names "
        f"(['q_proj', 'v_proj']), a regex string matched against the full module path, or 'all-linear'{none}"
    )


def _adapter_dtype(value: Any, where: str) -> Any:
    """``None`` or a real floating torch dtype. Strings are refused (one spelling, torch's own)."""
    if value is None:
        return None
    import torch

    allowed = ", ".join(f"torch.{name}" for name in ADAPTER_DTYPES)
    if isinstance(value, str):
        name = value.removeprefix("torch.")
        fix = f"dtype=torch.{name}" if name in ADAPTER_DTYPES else f"one of {allowed}"
        raise LoraConfigError(f"{where} is the string {value!r}; pass a torch dtype: {fix} (or None)")
    if not isinstance(value, torch.dtype):
        raise LoraConfigError(f"{where} is {value!r}, {_kind(value, repr)}; pass one of {allowed}, or None")
    if str(value).removeprefix("torch.") not in ADAPTER_DTYPES:
        raise LoraConfigError(
            f"{where} is {value}, which adapters cannot train in; pass one of {allowed}, or None (the "
            "layer's compute dtype)"
        )
    return value


def _matches(pattern: list[str] | str, path: str) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, path) is not None
    return any(path == name or path.endswith("." + name) for name in pattern)

"""The adapter configuration users pass to ``qp.attach``."""

from __future__ import annotations

import math
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
    :param dtype: dtype of the adapter weights; ``None`` keeps them in the
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
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive int, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.qalora_group_size is not None:
            group = self.qalora_group_size
            if isinstance(group, bool) or not isinstance(group, int) or group <= 0:
                raise ValueError(
                    f"LoraConfig.qalora_group_size must be a positive int or None, got {group!r}"
                )
            if not self.use_qalora:
                raise ValueError(
                    "LoraConfig.qalora_group_size is set but use_qalora is False; set use_qalora=True"
                )
        if self.use_qalora and self.use_dora:
            # as in PEFT; DoRA rescales whole rows by W's norms, so its update is not constant per group
            raise ValueError("LoraConfig: use_qalora and use_dora cannot be combined; pick one")
        if self.init not in ("default", "random"):
            raise ValueError(f"LoraConfig.init must be 'default' or 'random', got {self.init!r}")
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = list(self.target_modules)
        elif not isinstance(self.target_modules, str):
            raise TypeError(
                "LoraConfig.target_modules must be a list of names or a regex string, "
                f"got {type(self.target_modules).__name__}"
            )
        for field_name in ("target_modules", "exclude_modules"):
            pattern = getattr(self, field_name)
            if isinstance(pattern, str) and pattern != "all-linear":
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(
                        f"LoraConfig.{field_name} {pattern!r} is not a valid regex: {exc}"
                    ) from None

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
        """Read a PEFT ``adapter_config.json``; raises ``ValueError`` on what quantplug cannot load."""
        if data.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"peft_type is {data.get('peft_type')!r}; quantplug loads LoRA adapters only")
        for key in ("rank_pattern", "alpha_pattern"):
            if data.get(key):
                raise ValueError(f"{key} is set; per-layer ranks are not supported yet")
        if data.get("bias", "none") != "none":
            raise ValueError(f"bias={data['bias']!r}: only adapters trained with bias='none' load")
        if "r" not in data or "target_modules" not in data:
            raise ValueError("needs the keys 'r' and 'target_modules'")
        target = data["target_modules"]
        use_qalora = bool(data.get("use_qalora", False))
        group = data.get("qalora_group_size") if use_qalora else None
        if use_qalora and (isinstance(group, bool) or not isinstance(group, int) or group <= 0):
            raise ValueError(f"use_qalora is true and qalora_group_size is {group!r}, not a positive int")
        return cls(
            r=int(data["r"]),
            alpha=float(data.get("lora_alpha", data["r"])),
            dropout=float(data.get("lora_dropout", 0.0) or 0.0),
            target_modules=list(target) if isinstance(target, (list, tuple, set)) else target,
            use_dora=bool(data.get("use_dora", False)),
            use_rslora=bool(data.get("use_rslora", False)),
            exclude_modules=data.get("exclude_modules"),
            use_qalora=use_qalora,
            qalora_group_size=group,
        )

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dtype"] = None if self.dtype is None else str(self.dtype)
        return d


def _matches(pattern: list[str] | str, path: str) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, path) is not None
    return any(path == name or path.endswith("." + name) for name in pattern)

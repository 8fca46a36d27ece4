"""What moved in torchao between the releases this plugin supports (0.15 to 0.18), found by probing.

Every helper asks torchao whether it has a thing (a name, a config field, a
keyword argument), never which version it is, so a release that backports or
drops a feature is handled by what it has. What moved, read off the wheels:

- ``to_nf4`` is exported by ``torchao.quantization`` from 0.18 on; 0.15-0.17
  export it from ``torchao.dtypes`` only.
- ``Int8WeightOnlyConfig`` and ``Int8DynamicActivationInt8WeightConfig``
  default to ``version=1`` (an ``AffineQuantizedTensor``) before 0.18 and to
  ``version=2`` (``Int8Tensor``) from 0.18 on. This plugin builds and rebuilds
  the version-2 tensors, so it asks for ``version=2`` wherever the field exists.
- Config fields and ``Int8Tensor.from_hp`` arguments arrive release by release
  (``reduce_range`` in 0.18; ``scale`` and ``act_pre_scale`` in 0.16;
  ``zero_point`` and ``act_quant_zero_point`` in 0.17; ``Float8WeightOnlyConfig``'s
  ``granularity`` in 0.18). An argument a release lacks is dropped when it
  holds the value that release implies anyway, and refused otherwise.
- The int8 activation configs take an (activation, weight) granularity pair
  from 0.17 on; before, one granularity (a plain ``Granularity`` field) serves both.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

# the format version whose tensor subclasses (Int8Tensor, Float8Tensor, IntxUnpackedToInt8Tensor) this
# plugin reads and rebuilds
TENSOR_VERSION = 2


def to_nf4(tensor, block_size: int, scaler_block_size: int):
    """torchao's ``to_nf4``, wherever this release exports it."""
    try:
        from torchao.quantization import to_nf4 as build
    except ImportError:  # exported from torchao.quantization since 0.18
        from torchao.dtypes import to_nf4 as build
    return build(tensor, block_size, scaler_block_size)


def _implied(key: str, value) -> bool:
    """Whether ``value`` for an argument a release lacks is what that release does without it."""
    if value is None or value is False:
        return True
    # Float8WeightOnlyConfig before 0.18 quantizes per row, its later default
    return key == "granularity" and type(value).__name__ == "PerRow"


@functools.cache
def _config_fields(name: str) -> dict[str, dataclasses.Field]:
    from torchao import quantization as q

    return {field.name: field for field in dataclasses.fields(getattr(q, name))}


def config(name: str, **kwargs):
    """torchao's config class ``name`` with ``kwargs``, building the version-2 tensor subclasses.

    :raises NotImplementedError: when ``kwargs`` ask for something this release cannot express.
    """
    from torchao import quantization as q

    fields = _config_fields(name)
    kwargs = _known(name, fields, kwargs)
    pair = kwargs.get("granularity")
    if isinstance(pair, (list, tuple)) and isinstance(fields["granularity"].type, type):
        # an (activation, weight) pair is accepted from 0.17 on; before, one granularity serves both
        if any(g != pair[0] for g in pair):
            raise NotImplementedError(
                f"this torchao release's {name} takes one granularity for activations and weights, not {pair}"
            )
        kwargs["granularity"] = pair[0]
    version = fields.get("version")
    if version is not None and version.default != TENSOR_VERSION and "version" not in kwargs:
        kwargs["version"] = TENSOR_VERSION
    return getattr(q, name)(**kwargs)


def has_config(name: str) -> bool:
    from torchao import quantization as q

    return hasattr(q, name)


@functools.cache
def _parameters(func) -> frozenset[str]:
    return frozenset(inspect.signature(func).parameters)


def int8_from_hp(hp_tensor, **kwargs):
    """``Int8Tensor.from_hp`` with the keyword arguments this release takes."""
    from torchao.quantization import Int8Tensor

    accepted = _parameters(Int8Tensor.from_hp)
    return Int8Tensor.from_hp(hp_tensor, **_known("Int8Tensor.from_hp", accepted, kwargs))


def int8_from_hp_takes(name: str) -> bool:
    """Whether this release's ``Int8Tensor.from_hp`` takes the keyword ``name`` (``scale``: 0.16 on)."""
    from torchao.quantization import Int8Tensor

    return name in _parameters(Int8Tensor.from_hp)


def _known(where: str, accepted, kwargs: dict) -> dict:
    out = {}
    for key, value in kwargs.items():
        if key in accepted:
            out[key] = value
        elif not _implied(key, value):
            raise NotImplementedError(
                f"this torchao release's {where} has no {key!r} argument, needed for {key}={value!r}"
            )
    return out

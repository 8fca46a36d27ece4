"""A quantplug backend plugin, made from quantplug's plugin template.

Every hook of the contract (``quantplug/hookspecs.py``) is implemented here
as a module-level function; quantplug finds this module through the entry
point in ``pyproject.toml`` (group ``quantplug.backends``).

Replace each marked block below, markers included, by your code
(README.md has the steps). Until a block is filled the plugin is harmless:
it claims no layer, and its hooks raise ``NotImplementedError`` naming the
block (quantplug calls them only for this backend's layers), so the
conformance suite (``pytest tests``) lists what is left to do.

Keep this module cheap to import: quantplug imports it whenever it loads
plugins, also for users who never touch your library. Import your library
inside the hook functions, never at the top of this file.
"""

from __future__ import annotations

from quantplug import BackendInfo, Requirement, hookimpl

# The backend's name: what qp.detect() returns for your layers, what users
# pass to qp.quantize(..., backend), and the entry point's name in pyproject.toml.
NAME = "TODO"

# >>> TODO(variants): the formats quantplug_quantize can build, the default first
#     (e.g. ("int8", "int4-g128")). The conformance suite tests each of them.
VARIANTS = ("default",)
# <<< TODO(variants)


# --------------------------------------------------------------------------
# Describing the backend (called when plugins load)
# --------------------------------------------------------------------------


@hookimpl
def quantplug_backend_info():
    # >>> TODO(info): describe the backend as data. `requires`: your library's distribution
    #     and the versions you have tested (the core turns it into ok / missing / too old /
    #     too new / broken, with the pip line). Every capability you set to False, and every
    #     merge mode you leave out, needs a reason in `limits`. Do not import your library here.
    return BackendInfo(
        name=NAME,
        requires=(Requirement("TODO-library", ">=1.0,<2", module="TODO_library"),),
        devices=("cpu",),
        merge_modes=("requantize", "dense"),
        variants=VARIANTS,
        dora=True,
        mixed_batch=True,
        compile_safe=False,
        shardable=False,
        limits={
            "compile_safe": "not tested under torch.compile yet",
            "shardable": "not tested under FSDP2 yet",
        },
    )
    # <<< TODO(info)


@hookimpl
def quantplug_check_backend(info):
    """Optional: refine the status the core computed from ``requires``; never raise."""
    if info.name != NAME:
        return None
    # >>> TODO(check): optional. Return a quantplug.BackendStatus (Status.BROKEN with a reason
    #     and a fix) when something metadata cannot tell is wrong: a compiled extension that
    #     fails to load, say. Catch every exception. Return None to keep the core's status,
    #     or delete this hookimpl.
    return None
    # <<< TODO(check)


# --------------------------------------------------------------------------
# Finding and wrapping layers (called by qp.attach, qp.detect, qp.prepare_for_training)
# --------------------------------------------------------------------------


@hookimpl
def quantplug_detect_layer(module, model):
    # >>> TODO(detect): return NAME when `module` is one of your library's quantized layers,
    #     else None. Called for every module users target, with every backend installed:
    #     keep it cheap, import nothing (`import sys`; if "yourlib" is not in sys.modules,
    #     the module cannot be one of yours), compare class names along type(module).__mro__, and never claim a plain
    #     torch.nn.Linear, nor a subclass of it that is not your library's quantized layer.
    return None
    # <<< TODO(detect)


@hookimpl
def quantplug_layer_variant(module):
    """Which of VARIANTS ``module`` (one of your layers) is."""
    # >>> TODO(variant): return the entry of VARIANTS that names module's format (read its class
    #     and attributes, never dequantize), or None for a format none of them names. Required if
    #     BackendInfo.limits has a "<capability>:<variant>" key, such as "shardable:int4": the
    #     core reads the variant to apply that limit. Optional otherwise.
    return None
    # <<< TODO(variant)


@hookimpl
def quantplug_compute_dtype(module):
    # >>> TODO(compute-dtype): the floating dtype your layer computes in (adapters are kept in
    #     it), or None to let the core take the dtype of the layer's first floating tensor.
    return None
    # <<< TODO(compute-dtype)


@hookimpl
def quantplug_wrap_layer(module, config):
    """Optional: return a quantplug.LoraLayer subclass; None gives the core's LoraLayer."""
    # >>> TODO(wrap): optional. Return e.g. MyLoraLayer(module, NAME), a subclass of
    #     quantplug.LoraLayer overriding base_forward (a kernel with a backward pass while
    #     training, say). Return None for the core's LoraLayer, or delete this hookimpl.
    return None
    # <<< TODO(wrap)


@hookimpl
def quantplug_prepare_for_training(model):
    """Optional: make your layers in ``model`` pass gradients back before training."""
    # >>> TODO(train): optional. Called with the whole model by qp.prepare_for_training, for
    #     every plugin. For each layer of yours in model.modules() (wrapped or not: use the
    #     same test as detect), undo an inference-only repacking or switch to a kernel with a
    #     backward pass. Leave other backends' layers and every weight value alone. Return None,
    #     or delete this hookimpl if your layers' forward already has a backward pass.
    return None
    # <<< TODO(train)


# --------------------------------------------------------------------------
# The primitives the core's merge is built from (called by qp.merge)
# --------------------------------------------------------------------------


@hookimpl
def quantplug_dequantize(module):
    # >>> TODO(dequantize): return a NEW (out_features, in_features) tensor in the compute
    #     dtype, on the layer's device, computed exactly as your library dequantizes, so that
    #     module(x) == x @ W.T + module.bias up to your library's own rounding. Leave the
    #     layer unchanged, and make it work after the layer ran a forward (libraries repack
    #     their storage in place on the first call).
    raise NotImplementedError(f"TODO(dequantize) in {__name__}")
    # <<< TODO(dequantize)


@hookimpl
def quantplug_requantize(module, weight):
    # >>> TODO(requantize): return a NEW layer of the same class and format as `module`
    #     (its bits, group size, symmetry, grid...) holding `weight`, the merged dense weight,
    #     with a copy of module's bias, on module's device. Quantize `weight`: returning a
    #     copy of module's storage drops the adapter. Leave `module` unchanged: qp.unmerge
    #     puts it back. If your format cannot be rebuilt, drop "requantize" from merge_modes
    #     with a reason in limits and raise here.
    raise NotImplementedError(f"TODO(requantize) in {__name__}")
    # <<< TODO(requantize)


@hookimpl
def quantplug_group_size(module):
    """Optional: the input group of a group-wise format, which QALoRA adapters pool over."""
    # >>> TODO(group-size): optional. If your format shares one scale (and one zero point) among
    #     each run of g consecutive input columns of every row, return g for `module` (an int that
    #     divides in_features and is smaller than it); else None: per-channel scales, codebooks,
    #     groups over permuted columns. Cheap: read attributes, never dequantize. QALoRA adapters
    #     with qalora_group_size=None pool over these groups, and merge mode "zeros" needs them.
    return None
    # <<< TODO(group-size)


@hookimpl
def quantplug_fold_into_zeros(module, offsets):
    """Optional: merge mode "zeros", for formats that store a zero point per group."""
    # >>> TODO(fold-zeros): optional. If your format stores a zero point per (row, group) and you
    #     add "zeros" to merge_modes: return a NEW layer with module's codes, scales and bias bit
    #     for bit, each zero point moved so that the dequantized weight grows by offsets[o, k] over
    #     group k of row o (offsets is (out_features, in_features // g)); with W = s * (q - z) that
    #     is z - offsets / s, rounded where z is an integer. Leave `module` unchanged. Raise
    #     ValueError naming the reason for a layer of yours without zero points (symmetric).
    #     Without zero points, leave "zeros" out of merge_modes and raise here.
    raise NotImplementedError(f"TODO(fold-zeros) in {__name__}")
    # <<< TODO(fold-zeros)


@hookimpl
def quantplug_quantize(linear, variant):
    variant = variant or VARIANTS[0]
    if variant not in VARIANTS:
        raise ValueError(f"unknown {NAME} variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
    # >>> TODO(quantize): build a NEW quantized layer of your library from the plain nn.Linear
    #     `linear` (weight, optional bias) in format `variant`, without calibration data
    #     (round-to-nearest), on linear's device, with your library's own API. Leave `linear`
    #     unchanged. The conformance suite builds every layer it tests through this hook.
    raise NotImplementedError(f"TODO(quantize) in {__name__}")
    # <<< TODO(quantize)


# --------------------------------------------------------------------------
# Kernels (called once when plugins load)
# --------------------------------------------------------------------------


@hookimpl
def quantplug_register_kernels(register):
    """Optional: faster kernels for the core's ops; every op already has a reference."""
    # >>> TODO(kernels): optional. For each fast kernel call
    #     register.kernel("lora_add", fn, name=f"{NAME}-fused", backend=NAME, device="cuda",
    #                     dtypes=(torch.bfloat16,), priority=10)
    #     importing GPU-only code (Triton) inside fn. Delete this hookimpl if you have none.
    return None
    # <<< TODO(kernels)


# >>> TODO(helpers): optional. Helper functions or your layer code go here, or in modules of
#     this package imported inside the hooks above (keep this module's import cheap).
# <<< TODO(helpers)

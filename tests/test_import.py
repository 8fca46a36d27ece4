"""``import quantplug`` stays light: no torch, no backend library, no transformers, no peft."""

import subprocess
import sys

HEAVY = (
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "hqq",
    "torchao",
    "gptqmodel",
    "aqlm",
    "neural_compressor",
    "optimum",
    "eetq",
    "triton",
)


def test_import_quantplug_imports_nothing_heavy():
    code = (
        "import sys, quantplug\n"
        "assert quantplug.LoraConfig(r=4).r == 4\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import quantplug pulled in: {out.stdout.strip()}"


def test_loading_plugins_imports_no_backend_library():
    """Discovery reads entry points and metadata only; libraries load when a layer needs them."""
    code = (
        "import sys, quantplug\n"
        "rows = quantplug.backends()\n"
        "assert rows, 'no backend found'\n"
        f"print(','.join(m for m in {HEAVY[1:]!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"plugin discovery imported: {out.stdout.strip()}"


def test_submodule_imports_do_not_shadow_public_functions():
    """``import quantplug.<module>`` sets an attribute on the package: no module may share a public name."""
    code = (
        "import importlib, pkgutil, quantplug\n"
        "mods = [m.name for m in pkgutil.iter_modules(quantplug.__path__)]\n"
        "clash = sorted(set(mods) & set(quantplug.__all__))\n"
        "print(','.join(clash))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"modules named like public functions: {out.stdout.strip()}"


def test_lazy_names_are_all_exported():
    import quantplug

    assert set(quantplug._LAZY) <= set(quantplug.__all__)
    for name in quantplug.__all__:
        assert getattr(quantplug, name) is not None, name

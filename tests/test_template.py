"""The plugin template (plugins/template) and the author's guide (docs/plugins.md) keep each other honest.

The template must implement every hook and be harmless until filled; the
guide's tutorial must fill exactly the template's blocks; and the template,
renamed and filled with the guide's own code blocks, must install and pass
the conformance suite, as a third party's plugin would.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import importlib_metadata as metadata
import pytest
import quantplug as qp
import torch
from quantplug import hookspecs
from quantplug._registry import ENTRY_POINT_GROUP, hook
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "plugins" / "template"
GUIDE = ROOT / "docs" / "plugins.md"
HOOKS = [name for name in vars(hookspecs) if name.startswith("quantplug_")]
FILES = ("pyproject.toml", "quantplug_template/__init__.py", "tests/test_conformance.py")

# a block to fill:  "# >>> TODO(<id>): ..."  ...  "# <<< TODO(<id>)", in Python and TOML alike
BLOCK = re.compile(
    r"^(?P<indent>[ \t]*)# >>> TODO\((?P<id>[\w-]+)\).*?^[ \t]*# <<< TODO\((?P=id)\)[^\n]*\n", re.M | re.S
)
# the guide's code: "<!-- fill: <id> -->" or "<!-- file: <path> -->" just before a fenced block
SNIPPET = re.compile(r"<!-- (?P<kind>fill|file): (?P<key>\S+) -->\n```\w*\n(?P<code>.*?)```", re.S)


def guide_code() -> tuple[dict[str, str], dict[str, str]]:
    """The guide's tutorial: block id -> code, and new file path -> content."""
    fills: dict[str, str] = {}
    files: dict[str, str] = {}
    for match in SNIPPET.finditer(GUIDE.read_text()):
        target = fills if match["kind"] == "fill" else files
        assert match["key"] not in target, f"docs/plugins.md has two code blocks for {match['key']}"
        target[match["key"]] = match["code"]
    return fills, files


def template_blocks() -> set[str]:
    return {m["id"] for name in FILES for m in BLOCK.finditer((TEMPLATE / name).read_text())}


def fill(text: str, code: dict[str, str]) -> str:
    """Replace every block, markers included, by ``code[id]`` at the block's indentation."""

    def replace(match: re.Match) -> str:
        lines = code[match["id"]].splitlines(keepends=True)
        return "".join(match["indent"] + line if line.strip() else line for line in lines)

    return BLOCK.sub(replace, text)


def make_plugin(folder: Path, name: str, code: dict[str, str], files: dict[str, str]) -> None:
    """README.md's steps: copy, rename (three substitutions), fill every block, add new files."""
    shutil.copytree(TEMPLATE, folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    (folder / "conftest.py").unlink()
    (folder / "quantplug_template").rename(folder / f"quantplug_{name}")
    for relative in FILES:
        path = folder / relative.replace("quantplug_template", f"quantplug_{name}")
        text = path.read_text()
        text = text.replace("quantplug_template", f"quantplug_{name}").replace(
            "quantplug-TODO", f"quantplug-{name}"
        )
        text = fill(text.replace('"TODO"', f'"{name}"'), code)
        assert "TODO" not in text, f"{relative} still has TODOs after filling: {text}"
        path.write_text(text)
    for relative, content in files.items():
        (folder / relative).write_text(content)


def load_template():
    """The unfilled template's module, imported from its folder (it is not installed)."""
    spec = importlib.util.spec_from_file_location(
        "quantplug_template", TEMPLATE / "quantplug_template" / "__init__.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the template ------------------------------------------------------------------


def test_template_implements_every_hook_with_its_spec_arguments():
    template = load_template()
    for name in HOOKS:
        impl = getattr(template, name, None)
        assert impl is not None and hasattr(impl, "quantplug_impl"), f"the template has no @hookimpl {name}"
        # every argument of the spec but ``backend``: quantplug asks a plugin only about its own backend
        spec_args = [a for a in inspect.signature(getattr(hookspecs, name)).parameters if a != "backend"]
        assert list(inspect.signature(impl).parameters) == spec_args, (
            f"{name}: arguments differ from the spec's (less backend)"
        )


def test_unfilled_template_is_harmless_and_says_what_is_left():
    template = load_template()
    name = qp.register(template, name="quantplug-template-unfilled")
    try:
        status = qp.load_plugins().status("TODO")
        assert status.status == qp.Status.MISSING  # its placeholder library
        assert qp.detect(nn.Linear(4, 4)) == "linear"  # claims nothing, breaks nobody
        linear = nn.Linear(8, 4)
        for hook_name, kwargs in [
            ("quantplug_dequantize", {"module": linear}),
            ("quantplug_requantize", {"module": linear, "weight": linear.weight}),
            ("quantplug_quantize", {"linear": linear, "variant": None}),
        ]:
            block = hook_name.removeprefix("quantplug_")
            with pytest.raises(NotImplementedError, match=rf"TODO\({block}\)"):
                getattr(hook(), hook_name)(backend="TODO", **kwargs)
            assert getattr(hook(), hook_name)(backend="linear", **kwargs) is not None  # others unaffected
        with pytest.raises(ValueError, match="valid variants: default"):
            hook().quantplug_quantize(linear=linear, backend="TODO", variant="int3")
    finally:
        qp.unregister(name)


def test_unfilled_template_tests_stay_out_of_the_repository_run():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(TEMPLATE), "-q", "--collect-only", "-p", "no:cacheprovider"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert "no tests collected" in result.stdout or "no tests ran" in result.stdout, result.stdout


# -- the guide ---------------------------------------------------------------------


def test_guide_fills_exactly_the_templates_blocks():
    fills, files = guide_code()
    assert set(fills) == template_blocks()
    assert set(files) == {"quantplug_toyint8/toy.py"}


def test_guide_names_every_hook_with_its_signature():
    guide = GUIDE.read_text()
    for name in HOOKS:
        arguments = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
        assert f"`{name}({arguments})`" in guide, f"docs/plugins.md lacks `{name}({arguments})`"


def test_template_readme_rename_matches_the_guide():
    command = 'sed -i "s/quantplug_template/quantplug_$NAME/g; s/quantplug-TODO/quantplug-$NAME/g; s/\\"TODO\\"/\\"$NAME\\"/g"'
    assert command in (TEMPLATE / "README.md").read_text()
    assert command in GUIDE.read_text()


# -- the template, filled with the guide's example, as a third party's plugin --------


@pytest.mark.slow
def test_filled_template_installs_and_passes_the_conformance_suite(tmp_path):
    fills, files = guide_code()
    plugin = tmp_path / "quantplug-toyint8"
    make_plugin(plugin, "toyint8", fills, files)
    # a real install (pip builds the wheel from pyproject.toml), but into a folder of its
    # own: the running environment never sees the plugin, and nothing needs uninstalling
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-c",
            str(ROOT / "constraints.txt"),
            "--target",
            str(site),
            str(plugin),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    (dist,) = metadata.distributions(path=[str(site)])
    assert dist.name == "quantplug-toyint8"
    assert [(ep.name, ep.value) for ep in dist.entry_points.select(group=ENTRY_POINT_GROUP)] == [
        ("toyint8", "quantplug_toyint8")
    ]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(plugin / "tests"), "-q", "-p", "no:cacheprovider"],
        capture_output=True,
        text=True,
        cwd=plugin,
        env=env,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    promised = re.search(r"# (\d+) passed", GUIDE.read_text())
    assert passed and promised and passed[1] == promised[1], (
        f"the guide promises {promised and promised[0]}: {summary}"
    )
    assert "toyint8" not in {ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def test_filled_template_works_in_process(tmp_path):
    """The same plugin without installing it: registered in-process, used as the guide shows."""
    fills, files = guide_code()
    make_plugin(tmp_path / "quantplug-toyint8", "toyint8", fills, files)
    sys.path.insert(0, str(tmp_path / "quantplug-toyint8"))
    name = None
    try:
        import quantplug_toyint8

        name = qp.register(quantplug_toyint8, name="quantplug-toyint8-in-process")
        assert qp.load_plugins().status("toyint8").ok
        model = nn.Sequential(qp.quantize(nn.Linear(128, 64), "toyint8"))
        original = model[0]
        qp.attach(model, qp.LoraConfig(r=8, alpha=16, target_modules=["0"], init="random"))
        assert (
            qp.load_plugins().kernels.resolve("lora_add", "toyint8", "cpu", torch.float32).name
            == "toyint8-addmm"
        )
        x = torch.randn(3, 128)
        with torch.no_grad():
            want = model(x)
            report = qp.merge(model, mode="requantize")
            assert type(model[0].base).__name__ == "ToyInt8Linear" and report.layers[0].adapter_error < 0.05
            assert torch.allclose(model(x), want, rtol=0.05, atol=0.05)
        qp.unmerge(model)
        assert model[0].base is original
    finally:
        if name is not None:
            qp.unregister(name)
        sys.path.remove(str(tmp_path / "quantplug-toyint8"))
        for module in [m for m in sys.modules if m.split(".")[0] == "quantplug_toyint8"]:
            del sys.modules[module]

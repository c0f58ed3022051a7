"""Packaging metadata (pyproject.toml) and setup.py's torch check — cheap checks, no build.

The install itself (README "Install", editable and wheel, pip 23.2.1 and the newest pip) is proven by
the CI install stage, .ci/install_stage.sh.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def names(requirements):
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_build_system_requires_the_build_tools_but_not_torch(pyproject):
    build = pyproject["build-system"]
    assert build["build-backend"] == "setuptools.build_meta"
    assert names(build["requires"]) == {"setuptools", "wheel", "pybind11", "ninja"}
    # PEP 660 editable installs need setuptools >= 64
    assert any(re.fullmatch(r"setuptools>=(6[4-9]|[7-9]\d|\d{3,})(\.\d+)*", r) for r in build["requires"])


def test_project_metadata(pyproject):
    project = pyproject["project"]
    assert project["name"] == "baichuan-kernels"
    assert project["requires-python"] == ">=3.10"
    assert "version" in project["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "baichuan_kernels.__version__"}
    # torch is installed first by the user (its CPU or CUDA build): listing it would make pip fetch one
    all_requirements = project["dependencies"] + sum(project["optional-dependencies"].values(), [])
    assert "torch" not in names(all_requirements)


def test_extras(pyproject):
    extras = {k: names(v) for k, v in pyproject["project"]["optional-dependencies"].items()}
    assert set(extras) == {"triton", "train", "test", "bench"}
    assert extras["train"] == {"sentencepiece", "safetensors", "tqdm", "matplotlib"}
    assert "triton" in extras["triton"]
    assert {"pytest", "hypothesis"} <= extras["test"]
    assert "matplotlib" in extras["bench"]


def test_minitrain_entry_point_resolves(pyproject):
    target = pyproject["project"]["scripts"]["minitrain"]
    module, _, attr = target.partition(":")
    assert (module, attr) == ("minitrain.__main__", "main")
    assert callable(getattr(importlib.import_module(module), attr))


def test_packages_found(pyproject):
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert set(include) == {"baichuan_kernels*", "minitrain*"}


def run_setup_py(tmp_path, torch_version=None, extra_path=()):
    """`python setup.py --version` with torch hidden (torch_version None) or faked at that version."""
    paths = [str(tmp_path)] + list(extra_path)
    if torch_version is None:
        code = "import sys; sys.modules['torch'] = None\n"  # `import torch` raises ImportError
    else:
        fake = tmp_path / "torch"
        (fake / "utils").mkdir(parents=True)
        (fake / "__init__.py").write_text(f"__version__ = {torch_version!r}\n")
        (fake / "utils" / "__init__.py").write_text("")
        (fake / "utils" / "cpp_extension.py").write_text("")
        code = ""
    code += (f"import sys; sys.path[:0] = {paths!r}; sys.argv = ['setup.py', '--version']\n"
             "exec(compile(open('setup.py').read(), 'setup.py', 'exec'), {'__name__': '__main__', '__file__': 'setup.py'})\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_setup_py_without_torch_says_install_torch_first(tmp_path):
    r = run_setup_py(tmp_path)
    assert r.returncode != 0
    assert "install torch first" in r.stderr
    assert "--no-build-isolation" in r.stderr
    assert "Traceback" not in r.stderr


def test_setup_py_in_an_isolated_build_env_says_add_no_build_isolation(tmp_path):
    # pip's isolated build environment puts /tmp/pip-build-env-*/... on sys.path
    r = run_setup_py(tmp_path, extra_path=[str(tmp_path / "pip-build-env-x" / "overlay")])
    assert r.returncode != 0
    assert "install torch first" in r.stderr
    assert "isolated environment" in r.stderr and "add --no-build-isolation" in r.stderr


def test_setup_py_with_too_old_torch(tmp_path):
    r = run_setup_py(tmp_path, torch_version="2.5.1+cpu")
    assert r.returncode != 0
    assert "needs torch >= 2.6, found torch 2.5.1+cpu" in r.stderr
    assert "Traceback" not in r.stderr

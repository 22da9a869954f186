"""Packaging and hygiene: every module imports on a CPU-only machine, ruff is clean, the wheel is complete."""

import importlib
import json
import os
import pkgutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import fastdpo

ROOT = Path(__file__).resolve().parents[1]


def _all_modules() -> list[str]:
    names = ["fastdpo.kernels"]
    for info in pkgutil.walk_packages(fastdpo.__path__, prefix="fastdpo."):
        names.append(info.name)
    for info in pkgutil.iter_modules([str(ROOT / "kernels")], prefix="fastdpo.kernels."):
        names.append(info.name)
    return sorted(set(names))


@pytest.mark.parametrize("name", _all_modules())
def test_every_module_imports(name):
    importlib.import_module(name)


def test_import_does_not_touch_cuda():
    code = (
        "import torch, fastdpo\n"
        "import fastdpo.losses, fastdpo.trainer, fastdpo.integrations.trl\n"
        "assert not torch.cuda.is_initialized(), 'importing fastdpo initialized CUDA'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# Where the installation's import machinery finds `fastdpo.kernels` and a top-level `kernels`, asked of every
# meta path finder (the first hit would hide a later finder that maps ours), plus sys.path, as resolved paths.
_IMPORT_PROBE = """
import importlib.util, json, sys
from pathlib import Path

def where(spec):
    if spec is None:
        return []
    return [str(Path(p).resolve()) for p in spec.submodule_search_locations or [spec.origin]]

finders = [f.find_spec("kernels", None) for f in sys.meta_path if hasattr(f, "find_spec")]
print(json.dumps({
    "ours": where(importlib.util.find_spec("fastdpo.kernels")),
    "top": [where(importlib.util.find_spec("kernels"))] + [where(s) for s in finders],
    "path": [str(Path(p).resolve()) for p in sys.path if p],
}))
"""


def test_no_top_level_kernels_module(tmp_path):
    """`kernels` is another PyPI package that transformers probes; ours ships only as fastdpo.kernels.

    A fresh interpreter outside the checkout, with ``-P`` (no working directory on sys.path) and no
    PYTHONPATH, sees only what the installation adds: meta path finders and .pth path entries. Paths are
    compared resolved, so the result does not depend on the folder names (a clone named fastdpo included).
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [sys.executable, "-P", "-c", _IMPORT_PROBE], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout)
    ours = {str((ROOT / "kernels").resolve()), *found["ours"]}
    assert found["ours"], "fastdpo.kernels is not importable"
    for locations in found["top"]:
        assert not ours.intersection(locations), f"top-level `kernels` maps to ours: {locations}"
    # The checkout on sys.path (an old-style develop install's .pth) would expose kernels/ as top-level.
    assert str(ROOT.resolve()) not in found["path"]


def test_repo_root_does_not_shadow_pypi_kernels():
    """From the repository root, as ``python -m pytest`` runs, ``import kernels`` is the PyPI package.

    transformers (>= 5.25) imports the PyPI package ``kernels``; a top-level ``kernels/`` package of ours on
    sys.path first would break ``import trl``. The working directory is on sys.path under ``-c`` as under
    ``-m``.
    """
    code = (
        "import pathlib\n"
        "import trl, transformers.integrations.hub_kernels\n"
        "from trl import DPOConfig, KTOConfig\n"
        "import fastdpo.kernels.linear_logprobs, kernels\n"
        f"root = pathlib.Path({str(ROOT)!r}).resolve()\n"
        "assert pathlib.Path(kernels.__file__).resolve().parent != root / 'kernels', kernels.__file__\n"
        "origin = pathlib.Path(fastdpo.kernels.linear_logprobs.__file__).resolve()\n"
        "assert origin.parent.name == 'kernels', origin\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]


def test_ruff_clean():
    # ruff is a test extra, run from this interpreter: CI does not put the venv's bin/ on PATH.
    cmd = [sys.executable, "-m", "ruff", "check", "."]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _build_wheel(source: Path, out: Path) -> Path:
    env = {**os.environ, "FASTDPO_NO_EXT": "1"}
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out)]
    subprocess.run([*cmd, str(source)], check=True, env=env)
    (wheel,) = out.glob("fastdpo-*.whl")
    return wheel


def _build_sdist(out: Path) -> Path:
    env = {**os.environ, "FASTDPO_NO_EXT": "1"}
    cmd = [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--skip-dependency-check"]
    cmd += ["-o", str(out)]
    subprocess.run([*cmd, str(ROOT)], check=True, env=env, capture_output=True)
    (sdist,) = out.glob("fastdpo-*.tar.gz")
    return sdist


@pytest.mark.parametrize("source", ["tree", "sdist"])
def test_wheel_ships_kernels_inside_fastdpo(tmp_path, source):
    """The wheel, built from the checkout or from its sdist, holds fastdpo/kernels/*.py and no top-level
    kernels/, and works when installed, beside the PyPI package ``kernels``."""
    if source == "sdist":
        sdist = _build_sdist(tmp_path / "sdist")
        names = tarfile.open(sdist).getnames()
        assert any(n.endswith("/kernels/linear_logprobs.py") for n in names)
        assert any(n.endswith("/csrc/pack_planner.cpp") for n in names)
        wheel = _build_wheel(sdist, tmp_path)
    else:
        wheel = _build_wheel(ROOT, tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastdpo/kernels/linear_logprobs.py" in names
    assert "fastdpo/kernels/preference_loss.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    code = (
        "import torch, fastdpo, transformers.integrations.hub_kernels\n"
        f"assert fastdpo.__file__.startswith({str(site)!r}), fastdpo.__file__\n"
        "from fastdpo.kernels import linear_logprobs as k\n"
        f"assert k.__file__.startswith({str(site)!r}), k.__file__\n"
        "h, w = torch.randn(5, 8), torch.randn(11, 8)\n"
        "t = torch.tensor([1, 2, -100, 3, 10])\n"
        "out = fastdpo.linear_logprobs(h, w, t, backend='torch')\n"
        "ref = (h @ w.T).log_softmax(-1).gather(1, t.clamp(min=0)[:, None])[:, 0] * (t != -100)\n"
        "assert torch.allclose(out, ref, atol=1e-5)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)

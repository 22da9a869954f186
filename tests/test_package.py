"""Packaging and hygiene: every module imports on a CPU-only machine, ruff is clean, the wheel is complete."""

import importlib
import pkgutil
import shutil
import subprocess
import sys
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


def test_no_top_level_kernels_module():
    """`kernels` is another PyPI package that transformers probes; ours ships only as fastdpo.kernels."""
    assert importlib.util.find_spec("fastdpo.kernels") is not None
    spec = importlib.util.find_spec("kernels")
    assert spec is None or "fastdpo" not in str(spec.origin or spec.submodule_search_locations)


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed")
def test_ruff_clean():
    out = subprocess.run(["ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_wheel_ships_kernels_inside_fastdpo(tmp_path):
    """The built wheel holds fastdpo/kernels/*.py and no top-level kernels/, and works when installed."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        env={**__import__("os").environ, "FASTDPO_NO_EXT": "1"},
    )
    (wheel,) = tmp_path.glob("fastdpo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastdpo/kernels/linear_logprobs.py" in names
    assert "fastdpo/kernels/preference_loss.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    code = (
        "import torch, fastdpo\n"
        f"assert fastdpo.__file__.startswith({str(site)!r}), fastdpo.__file__\n"
        "from fastdpo.kernels import linear_logprobs as k\n"
        "h, w = torch.randn(5, 8), torch.randn(11, 8)\n"
        "t = torch.tensor([1, 2, -100, 3, 10])\n"
        "out = fastdpo.linear_logprobs(h, w, t, backend='torch')\n"
        "ref = (h @ w.T).log_softmax(-1).gather(1, t.clamp(min=0)[:, None])[:, 0] * (t != -100)\n"
        "assert torch.allclose(out, ref, atol=1e-5)\n"
    )
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        cwd=tmp_path,
        env={**__import__("os").environ, "PYTHONPATH": str(site)},
    )

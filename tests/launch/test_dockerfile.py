"""The Dockerfile, read statically (no Docker engine in CI): its pins agree with pyproject.toml and
tools/install.sh, it installs the CUDA FBGEMM build and TorchRec without dependencies, and runs as a user."""

from __future__ import annotations

import re
import tomllib

import pytest
from tests.helpers import REPO


DOCKERFILE = (REPO / "Dockerfile").read_text()
INSTALL_SH = (REPO / "tools" / "install.sh").read_text()


def arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE, re.M)
    assert match, f"Dockerfile has no `ARG {name}=...`"
    return match.group(1)


def pyproject_pin(package: str) -> str:
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in dependencies if re.match(rf"{package}\s*==", d)]
    return pin.split("==")[1].strip()


def test_torch_pin_and_base_image_match_pyproject() -> None:
    torch = pyproject_pin("torch")
    assert arg("TORCH_VERSION") == torch
    assert re.search(rf'^install "torch=={re.escape(torch)}"$', INSTALL_SH, re.M)
    base = arg("BASE_IMAGE").replace("${TORCH_VERSION}", torch)
    assert re.fullmatch(rf"pytorch/pytorch:{re.escape(torch)}-cuda[\d.]+-cudnn\d+-runtime", base), base


@pytest.mark.parametrize("name, variable", [("FBGEMM_VERSION", "FBGEMM_VERSION"), ("TORCHREC_VERSION", "TORCHREC_VERSION")])
def test_fbgemm_and_torchrec_pins_match_install_sh(name: str, variable: str) -> None:
    match = re.search(rf"^{variable}=(\S+)$", INSTALL_SH, re.M)
    assert match and arg(name) == match.group(1)


def test_installs_cuda_fbgemm_and_torchrec_without_dependencies() -> None:
    assert '"fbgemm-gpu==${FBGEMM_VERSION}"' in DOCKERFILE  # the CUDA build, not fbgemm-gpu-cpu
    assert "fbgemm-gpu-cpu" not in DOCKERFILE
    assert 'pip install --no-deps "torchrec==${TORCHREC_VERSION}"' in DOCKERFILE
    # Every pip install that could resolve torch names the pinned one, so the base's build stays.
    for command in re.findall(r"pip install (?!--no-deps)[^\n\\]*", DOCKERFILE):
        assert '"torch==${TORCH_VERSION}"' in command, command


def test_copies_what_the_job_runs_and_ends_as_a_non_root_user() -> None:
    for path in ("pyproject.toml", "recsys", "configs", "launch"):
        assert re.search(rf"^COPY {path} ", DOCKERFILE, re.M), path
    users = re.findall(r"^USER (\S+)$", DOCKERFILE, re.M)
    assert users and users[-1] not in ("root", "0")
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "data", "runs"} <= set(ignored)

"""Installing: the README's set-up commands, and a CPU build of torch kept by `pip install -r requirements.txt`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CPU_TORCH = "pip install torch --index-url https://download.pytorch.org/whl/cpu"


def set_up_section() -> str:
    readme = (REPO / "README.md").read_text()
    return readme[readme.index("## Set up and run"): readme.index("\n## ", readme.index("## Set up and run") + 1)]


def test_readme_says_how_to_install_the_cpu_build_of_torch_first():
    section = set_up_section()
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert blocks[0].splitlines() == ["pip install -r requirements.txt", "python app.py"]  # the two commands, as before
    assert CPU_TORCH in section and "first" in section
    assert CPU_TORCH in (REPO / "requirements.txt").read_text()


def test_requirements_keep_an_installed_cpu_torch():
    """What the README promises: with the CPU build installed, `pip install -r requirements.txt` installs
    no other torch (checked offline: --no-index fails if anything would have to be downloaded)."""
    import torch

    if not torch.__version__.endswith("+cpu"):
        pytest.skip(f"torch {torch.__version__} is not a CPU build")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "-r", "requirements.txt"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"Requirement already satisfied: torch>=[\d.]+ .*\(2[\d.]+\+cpu\)", done.stdout), done.stdout
    assert "Would install" not in done.stdout, done.stdout

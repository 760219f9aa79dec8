"""ruff, pinned in requirements.txt, with the rules of pyproject.toml: no findings in src or
tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_ruff_finds_nothing_in_src_and_tests():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache",
                             "--output-format", "concise", "src", "tests"],
                            cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert "All checks passed!" in result.stdout and result.returncode == 0, (
        f"ruff check src tests (exit {result.returncode}):\n{result.stdout}{result.stderr}")


def test_ruff_is_the_pinned_version():
    pinned = next(line.split("==")[1].split()[0]
                  for line in (REPO / "requirements.txt").read_text().splitlines()
                  if line.startswith("ruff=="))
    result = subprocess.run([sys.executable, "-m", "ruff", "--version"], capture_output=True,
                            text=True, timeout=60, check=True)
    assert result.stdout.split() == ["ruff", pinned]

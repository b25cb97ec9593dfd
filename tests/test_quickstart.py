"""The quickstart example runs and reports matching losses."""

import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # run by .ci/run's second pytest call

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quickstart_losses_match():
  out = subprocess.run(
      [sys.executable, str(ROOT / 'examples' / 'quickstart.py'), '--k', '4',
       '--batch-size', '64', '--steps', '6', '--width', '32'],
      capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stdout + out.stderr
  assert 'losses match' in out.stdout
  assert 'accumulated (k=4)' in out.stdout

"""The numerical check of ``benchmarks/train_step.py`` passes on the current code.

The benchmark times jaxrobust's WRN step against the PyTorch WRN only after
``--torch_check`` has shown the two compute the same thing (float64, within
1e-9: logits, features, every gradient, BatchNorm running statistics, eval
logits). Benchmarks are not run by the suite, so this check had gone stale
once (it kept a running-variance correction after BatchNorm adopted PyTorch's
rule) without anyone seeing it; this test runs it.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "train_step.py")


@pytest.mark.slow
def test_train_step_benchmark_numerical_check_passes():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, SCRIPT, "--torch_check"], capture_output=True, text=True,
                        env=env, timeout=600, check=False)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-3000:]
  assert "=> OK (tolerance 1e-9)" in out
  assert "final BN running var " in out  # compared raw, no n/(n-1) correction

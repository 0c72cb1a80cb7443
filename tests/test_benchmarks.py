"""The benchmark scripts run end to end on a tiny config (their figures are measured elsewhere:
docs/benchmarks.md); this only guards them against breaking between GPU leases."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_step_benchmark_times_a_tiny_step_under_the_timing_lock(tmp_path):
  result = subprocess.run(
      [sys.executable, "benchmarks/train_step.py", "--config=configs/albef.py:tiny", "--batch=16", "--text_len=8",
       "--steps=1", "--peak_tflops=1.0", f"--timing_lock={tmp_path / 'lock'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  (row,) = [line for line in result.stdout.splitlines() if line.startswith("| configs/albef.py:tiny")]
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert cells[5] == "none" and cells[6] == "False" and float(cells[7]) > 0, row  # remat, scan, img/s
  assert os.path.exists(tmp_path / "lock")

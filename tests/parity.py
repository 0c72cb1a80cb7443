"""Shared measure for the converter parity tests."""
import numpy as np


def max_relative_error(actual, reference) -> float:
  """max |actual - reference| / max |reference|, in float64."""
  actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
  return float(np.abs(actual - reference).max() / np.abs(reference).max())

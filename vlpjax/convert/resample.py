"""Position-embedding resampling with PyTorch's bicubic kernel, in NumPy.

ALBEF, ViCHA and timm resize ViT position embeddings with
`F.interpolate(mode='bicubic', align_corners=False)`: Keys' cubic convolution with a = -0.75,
source coordinates `(i + 0.5) * in / out - 0.5` (not clamped for the cubic kernel) and the four
taps clamped to the border. `jax.image.resize('cubic')` uses a = -0.5 and differs by ~1e-3, so
the converter uses this port, which matches torch to float32 rounding.
"""
import numpy as np

_A = -0.75


def _cubic_weights(t: np.ndarray) -> np.ndarray:
  """Weights [n, 4] of the taps at offsets -1, 0, 1, 2 for fractional positions `t` [n]."""

  def near(x):  # |x| <= 1
    return ((_A + 2) * x - (_A + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """The linear map [out_size, in_size] of a 1-D torch bicubic resize (align_corners=False).

  Row i holds the weights of output sample i:
    src = (i + 0.5) * in_size / out_size - 0.5,  taps floor(src) - 1 .. floor(src) + 2
  clamped to [0, in_size - 1] (repeated border), weights from Keys' kernel with a = -0.75.
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"bicubic_matrix: sizes must be positive, got {in_size} -> {out_size}")
  src = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
  base = np.floor(src)
  weights = _cubic_weights(src - base)                                    # [out, 4]
  taps = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3), 0, in_size - 1)
  matrix = np.zeros((out_size, in_size), np.float64)
  np.add.at(matrix, (np.repeat(np.arange(out_size), 4), taps.ravel()), weights.ravel())
  return matrix


def resize_bicubic(grid: np.ndarray, out_height: int, out_width: int) -> np.ndarray:
  """Resizes `grid` [height, width, channels] like torch bicubic on [1, channels, height, width].

  out[y, x, c] = sum_{i, j} Wy[y, i] * Wx[x, j] * grid[i, j, c], computed in float64 and
  returned in the input dtype.
  """
  rows = bicubic_matrix(grid.shape[0], out_height)
  cols = bicubic_matrix(grid.shape[1], out_width)
  out = np.einsum("yi,xj,ijc->yxc", rows, cols, grid.astype(np.float64), optimize=True)
  return out.astype(grid.dtype)


def grid_size(pos_embedding: np.ndarray, name: str = "pos_embedding") -> int:
  """Side g of the square patch grid of a [1, 1 + g*g, width] table (CLS first)."""
  if pos_embedding.ndim != 3 or pos_embedding.shape[0] != 1:
    raise ValueError(f"{name}: expected shape [1, 1 + g*g, width], got {pos_embedding.shape}")
  patches = pos_embedding.shape[1] - 1
  side = int(round(patches ** 0.5))
  if side * side != patches:
    raise ValueError(f"{name}: {patches} patch positions do not form a square grid "
                     f"(shape {pos_embedding.shape}; tables with extra tokens such as DeiT's "
                     "distillation token are not supported)")
  return side


def resample_pos_embedding(pos_embedding: np.ndarray, new_grid: int,
                           name: str = "pos_embedding") -> np.ndarray:
  """Resamples [1, 1 + g*g, width] to [1, 1 + new_grid**2, width]; the CLS row is kept.

  The patch rows are viewed as a [g, g, width] image (row-major, as ViT flattens patches) and
  resized with `resize_bicubic`, exactly as ALBEF's `interpolate_pos_embed` does in torch.
  """
  old_grid = grid_size(pos_embedding, name)
  if old_grid == new_grid:
    return pos_embedding
  width = pos_embedding.shape[-1]
  patches = pos_embedding[0, 1:].reshape(old_grid, old_grid, width)
  resized = resize_bicubic(patches, new_grid, new_grid).reshape(1, new_grid * new_grid, width)
  return np.concatenate([pos_embedding[:, :1], resized], axis=1)

"""Improved precision and recall (Kynkäänniemi et al., NeurIPS 2019) on feature vectors.

Each set of features stands for a manifold: the union of balls around its points, the
ball of point x with the radius to x's k-th nearest OTHER point of the same set (k = 3,
the paper's choice). Then

  precision = the fraction of generated features inside the real manifold (how many
              samples look like data: fidelity),
  recall    = the fraction of real features inside the generated manifold (how much of
              the data the samples cover: diversity).

"Inside" is inclusive (distance ≤ radius), as in the authors' code, so two identical sets
have precision = recall = 1. Distances are Euclidean, in float64, in row chunks: no more
than `chunk_size` × N distances exist at once, so a few thousand examples per set need a
few hundred MB at most. Both sets should have equally many points: the radii shrink as a
set grows, so precision and recall are comparable only between equal set sizes.
"""
from __future__ import annotations

import numpy as np

# The paper's neighbourhood size.
DEFAULT_K = 3
# Rows per block of the distance matrix.
DEFAULT_CHUNK_SIZE = 1024


def _as_features(features, name: str) -> np.ndarray:
  features = np.asarray(features, np.float64)
  if features.ndim != 2:
    raise ValueError(f"{name} must be [N, D] features, got shape {features.shape}.")
  return features


def _squared_distances(a: np.ndarray, b: np.ndarray, b_norms: np.ndarray) -> np.ndarray:
  """[n, m] ‖a_i − b_j‖² as ‖a‖² − 2 a·b + ‖b‖² (one matrix product)."""
  a_norms = np.einsum("ij,ij->i", a, a)
  scale = a_norms[:, None] + b_norms[None, :]
  squared = scale - 2.0 * (a @ b.T)
  # For a_i = b_j the expansion leaves a rounding residue of about D·ε·(‖a‖² + ‖b‖²),
  # of either sign: call it 0, so identical points are exactly at distance 0 (and a
  # duplicate's zero radius still contains its twin).
  return np.where(squared <= 1e-12 * scale, 0.0, squared)


def manifold_radii(features, *, k: int = DEFAULT_K,
                   chunk_size: int = DEFAULT_CHUNK_SIZE) -> np.ndarray:
  """Distance of each point to its k-th nearest other point of the same set.

  Args:
    features: [N, D], N > k.
    k: the neighbour whose distance is the radius (1 = the nearest other point).
    chunk_size: rows of the distance matrix computed at once.

  Returns:
    [N] float64 radii.
  """
  features = _as_features(features, "features")
  count = features.shape[0]
  if k < 1 or count <= k:
    raise ValueError(f"k-NN radii need 1 <= k < N, got k={k} and N={count}.")
  norms = np.einsum("ij,ij->i", features, features)
  radii = np.empty(count, np.float64)
  for start in range(0, count, chunk_size):
    stop = min(start + chunk_size, count)
    squared = _squared_distances(features[start:stop], features, norms)
    # A point is not its own neighbour; an identical OTHER point (distance 0) is.
    squared[np.arange(stop - start), np.arange(start, stop)] = np.inf
    radii[start:stop] = np.sqrt(np.partition(squared, k - 1, axis=1)[:, k - 1])
  return radii


def coverage_fraction(manifold, radii, queries, *,
                      chunk_size: int = DEFAULT_CHUNK_SIZE) -> float:
  """The fraction of `queries` inside at least one ball (centre `manifold[i]`, radius
  `radii[i]`, boundary included).

  Args:
    manifold: [N, D] ball centres.
    radii: [N] their radii (`manifold_radii`).
    queries: [M, D], M ≥ 1.
  """
  manifold = _as_features(manifold, "manifold")
  queries = _as_features(queries, "queries")
  if queries.shape[0] == 0:
    raise ValueError("coverage_fraction needs at least one query point.")
  squared_radii = np.square(np.asarray(radii, np.float64))
  norms = np.einsum("ij,ij->i", manifold, manifold)
  inside = 0
  for start in range(0, queries.shape[0], chunk_size):
    squared = _squared_distances(queries[start:start + chunk_size], manifold, norms)
    inside += int(np.sum(np.any(squared <= squared_radii[None, :], axis=1)))
  return inside / queries.shape[0]


def precision_recall(real, generated, *, k: int = DEFAULT_K,
                     chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[float, float]:
  """(precision, recall) of `generated` against `real`, each in [0, 1].

  Args:
    real: [N, D] features of data examples.
    generated: [M, D] features of samples in the same space (M = N for comparable
      numbers; see the module docstring).
    k: neighbourhood size of the manifolds (3 in the paper).
    chunk_size: rows of the distance matrices computed at once.
  """
  real = _as_features(real, "real")
  generated = _as_features(generated, "generated")
  if real.shape[1] != generated.shape[1]:
    raise ValueError(f"real and generated features differ in dimension: {real.shape} vs "
                     f"{generated.shape}.")
  precision = coverage_fraction(real, manifold_radii(real, k=k, chunk_size=chunk_size),
                                generated, chunk_size=chunk_size)
  recall = coverage_fraction(generated, manifold_radii(generated, k=k, chunk_size=chunk_size),
                             real, chunk_size=chunk_size)
  return precision, recall

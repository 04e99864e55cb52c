"""Vector math shared by the downstream jobs, on NumPy and Arrow (no Spark, no torch)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (zero rows stay zero)."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms == 0, 1, norms)


def row_cosines(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Cosine of each row of `left` with the same row of `right`."""
    return np.einsum("ij,ij->i", unit_rows(left), unit_rows(right))


def arrow_matrix(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A list<float> column of equal-length vectors as a [rows, dim] float32 matrix, without a
    Python loop over rows."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    rows = len(column)
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if rows and len(flat) % rows:
        raise ValueError("vectors of different lengths in one table")
    return flat.reshape(rows, -1) if rows else flat.reshape(0, 0)

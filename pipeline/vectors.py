"""Vector math shared by the downstream jobs, on NumPy and Arrow (no Spark, no torch)."""

from __future__ import annotations

from typing import Literal, get_args

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
        parts = [arrow_matrix(chunk) for chunk in column.chunks if len(chunk)]
        return np.concatenate(parts) if parts else np.empty((0, 0), np.float32)
    rows = len(column)
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if rows and len(flat) % rows:
        raise ValueError("vectors of different lengths in one table")
    return flat.reshape(rows, -1) if rows else flat.reshape(0, 0)


def vectors_to_arrow(vectors: np.ndarray) -> pa.ListArray:
    """[rows, dim] float32 -> Arrow list<float> without a Python loop."""
    rows, dim = vectors.shape
    offsets = pa.array(np.arange(0, (rows + 1) * dim, dim, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1), pa.float32()))


# --- stored formats ------------------------------------------------------------------------
# float32 keeps `embedding` (array<float>); the compact formats keep `embedding` null and store
# `embedding_packed` (binary) with, for int8, the per-vector `embedding_scale`.
VectorFormat = Literal["float32", "float16", "int8", "binary"]
VECTOR_FORMATS: tuple[VectorFormat, ...] = get_args(VectorFormat)
Metric = Literal["cosine", "dot"]
METRICS: tuple[Metric, ...] = get_args(Metric)


def pack_vectors(vectors: np.ndarray, fmt: str) -> tuple[list[bytes], np.ndarray | None]:
    """[rows, dim] float32 -> one bytes value per row, and int8's per-row scales.
    float16: 2 bytes a dimension; int8: 1 byte, symmetric, scaled by the row's largest
    magnitude; binary: 1 bit (the sign), packed 8 to a byte."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if fmt == "float16":
        return [row.tobytes() for row in vectors.astype("<f2")], None
    if fmt == "int8":
        scales = np.abs(vectors).max(axis=1) / 127.0
        safe = np.where(scales == 0, 1.0, scales)[:, None]
        quantized = np.clip(np.rint(vectors / safe), -127, 127).astype(np.int8)
        return [row.tobytes() for row in quantized], scales.astype(np.float32)
    if fmt == "binary":
        return [row.tobytes() for row in np.packbits(vectors > 0, axis=1)], None
    raise ValueError(f"vector format must be one of {VECTOR_FORMATS[1:]} to pack, got {fmt!r}")


def unpack_vectors(packed: list[bytes], scales: np.ndarray | None, fmt: str, dim: int
                   ) -> np.ndarray:
    """The inverse of pack_vectors, as float32 (binary as -1/+1 per dimension)."""
    rows = len(packed)
    expected = {"float16": 2 * dim, "int8": dim, "binary": (dim + 7) // 8}.get(fmt)
    if expected is not None and any(len(row) != expected for row in packed):
        raise ValueError(f"stored {fmt} vectors do not have {dim} dimensions "
                         f"({expected} bytes each)")
    joined = b"".join(packed)
    if fmt == "float16":
        return np.frombuffer(joined, "<f2").reshape(rows, dim).astype(np.float32)
    if fmt == "int8":
        quantized = np.frombuffer(joined, np.int8).reshape(rows, dim).astype(np.float32)
        return quantized * np.asarray(scales, np.float32)[:, None]
    if fmt == "binary":
        bits = np.unpackbits(np.frombuffer(joined, np.uint8).reshape(rows, -1), axis=1)
        return bits[:, :dim].astype(np.float32) * 2 - 1
    raise ValueError(f"unknown vector format {fmt!r}")


def stored_vectors(vectors: np.ndarray, fmt: str) -> list[pa.Array]:
    """The embedding, embedding_packed and embedding_scale columns of a vector format."""
    rows = len(vectors)
    if fmt == "float32":
        return [vectors_to_arrow(vectors), pa.nulls(rows, pa.binary()),
                pa.nulls(rows, pa.float32())]
    packed, scales = pack_vectors(vectors, fmt)
    return [pa.nulls(rows, pa.list_(pa.float32())), pa.array(packed, pa.binary()),
            pa.array(scales, pa.float32()) if scales is not None else pa.nulls(rows, pa.float32())]


def batch_matrix(batch: pa.RecordBatch, fmt: str, dim: int) -> np.ndarray:
    """A batch's vectors as [rows, dim] float32, whichever format the table stores."""
    if fmt == "float32":
        return arrow_matrix(batch.column("embedding"))
    scales = (batch.column("embedding_scale").to_numpy(zero_copy_only=False)
              if fmt == "int8" else None)
    return unpack_vectors(batch.column("embedding_packed").to_pylist(), scales, fmt, dim)


# --- probe vectors: what an endpoint's model is, recorded with the table --------------------
PROBE_DIMENSIONS = 64


def encode_probe(vectors: np.ndarray) -> str:
    """Probe texts' vectors as a short text for a table property: the first PROBE_DIMENSIONS
    dimensions of each, as unit float16 rows, in base64."""
    import base64

    head = unit_rows(np.asarray(vectors, np.float32)[:, :PROBE_DIMENSIONS])
    return f"{len(head)}x{head.shape[1]}:" + base64.b64encode(head.astype("<f2").tobytes()).decode()


def probe_agreement(recorded: str, current: str) -> float:
    """The lowest cosine between the same probe text's recorded and current vectors (1.0: the
    same model; a server's batching moves it by about 1e-4); 0.0 when they cannot compare."""
    import base64

    try:
        shapes, matrices = [], []
        for text in (recorded, current):
            shape, data = text.split(":", 1)
            rows, dim = (int(part) for part in shape.split("x"))
            shapes.append((rows, dim))
            matrices.append(np.frombuffer(base64.b64decode(data), "<f2")
                            .reshape(rows, dim).astype(np.float32))
    except ValueError:
        return 0.0
    if shapes[0] != shapes[1]:
        return 0.0
    return float(row_cosines(*matrices).min())

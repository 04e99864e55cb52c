"""Exact top k of vector batches against a query matrix, in NumPy and Arrow: what each executor
runs over its partition of a vectors table (pipeline.search does the Spark side).

No Spark and no torch here: the executors' Python workers import this module to run the scoring
function, and a worker that had to import torch first would start seconds later."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.vectors import batch_matrix, unit_rows


def best_first(positions: np.ndarray, scores: np.ndarray, doc_ids: np.ndarray,
               chunk_indexes: np.ndarray) -> np.ndarray:
    """Positions in the search's order: score descending, then doc_id, then chunk_index (the
    global merge orders the same way, so ties do not depend on partitioning)."""
    order = np.lexsort((chunk_indexes[positions], doc_ids[positions].astype(str),
                        -scores[positions]))
    return positions[order]


def top_window(scores: np.ndarray, size: int) -> np.ndarray:
    """Positions of the `size` best scores and of every score tied with the last of them."""
    if len(scores) <= size:
        return np.arange(len(scores))
    chosen = np.argpartition(-scores, size - 1)[:size]
    return np.flatnonzero(scores >= scores[chosen].min())


def top_positions(scores: np.ndarray, doc_ids: np.ndarray, chunk_indexes: np.ndarray, k: int,
                  by_document: bool) -> np.ndarray:
    """Positions of the k best scores, best first; by document, only each document's best
    position counts, so the result names k distinct documents (or all there are)."""
    window = 4 * k if by_document else k
    while True:
        ordered = best_first(top_window(scores, window), scores, doc_ids, chunk_indexes)
        if not by_document:
            return ordered[:k]
        _, first = np.unique(doc_ids[ordered], return_index=True)
        best = ordered[np.sort(first)][:k]
        if len(best) >= k or window >= len(scores):
            return best
        window = min(len(scores), window * 4)


@dataclass
class Candidates:
    """One query's best rows so far, with their texts (None where none are carried)."""

    scores: np.ndarray
    doc_ids: np.ndarray
    chunk_indexes: np.ndarray
    texts: np.ndarray

    @classmethod
    def empty(cls) -> Candidates:
        return cls(np.empty(0, np.float32), np.empty(0, object), np.empty(0, np.int32),
                   np.empty(0, object))

    def merged(self, scores: np.ndarray, doc_ids: np.ndarray, chunk_indexes: np.ndarray,
               texts: np.ndarray, k: int, by_document: bool) -> Candidates:
        scores = np.concatenate([self.scores, scores])
        doc_ids = np.concatenate([self.doc_ids, doc_ids])
        chunk_indexes = np.concatenate([self.chunk_indexes, chunk_indexes])
        texts = np.concatenate([self.texts, texts])
        keep = top_positions(scores, doc_ids, chunk_indexes, k, by_document)
        return Candidates(scores[keep], doc_ids[keep], chunk_indexes[keep], texts[keep])


def score_batches(queries: np.ndarray, query_ids: list[str], k: int, by_document: bool,
                  normalize: bool, vector_format: str = "float32", block_rows: int = 1024,
                  text_col: str | None = None
                  ) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The function for DataFrame.mapInArrow: batches of (doc_id, chunk_index), the stored
    vector columns and, with `text_col`, the text -> this partition's top k rows per query,
    under the query's id, with their text (null without `text_col`)."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        best = [Candidates.empty() for _ in range(len(queries))]
        for batch in batches:
            if not batch.num_rows:
                continue
            matrix = batch_matrix(batch, vector_format, queries.shape[1])
            if matrix.shape[1] != queries.shape[1]:
                raise ValueError(f"table vectors have {matrix.shape[1]} dimensions, the "
                                 f"queries {queries.shape[1]}")
            if normalize:
                matrix = unit_rows(matrix)
            doc_ids = np.asarray(batch.column("doc_id").to_pylist(), dtype=object)
            chunk_indexes = batch.column("chunk_index").to_numpy(zero_copy_only=False)
            texts = (np.asarray(batch.column(text_col).to_pylist(), dtype=object) if text_col
                     else np.full(batch.num_rows, None, dtype=object))
            for start in range(0, len(queries), block_rows):
                scores = queries[start:start + block_rows] @ matrix.T
                for offset, row in enumerate(scores):
                    keep = top_positions(row, doc_ids, chunk_indexes, k, by_document)
                    query = start + offset
                    best[query] = best[query].merged(row[keep], doc_ids[keep],
                                                     chunk_indexes[keep], texts[keep], k,
                                                     by_document)
        yield _partial_batch(query_ids, best)

    return run


def _partial_batch(query_ids: list[str], best: list[Candidates]) -> pa.RecordBatch:
    counts = [len(c.scores) for c in best]
    return pa.RecordBatch.from_arrays([
        pa.array(np.repeat(np.asarray(query_ids, dtype=object), counts), pa.string()),
        pa.array([d for c in best for d in c.doc_ids], pa.string()),
        pa.array(np.concatenate([c.chunk_indexes for c in best]).astype(np.int32)
                 if best else np.empty(0, np.int32)),
        pa.array(np.concatenate([c.scores for c in best]).astype(np.float32)
                 if best else np.empty(0, np.float32)),
        pa.array([t for c in best for t in c.texts], pa.string()),
    ], names=["query_id", "doc_id", "chunk_index", "score", "chunk_text"])

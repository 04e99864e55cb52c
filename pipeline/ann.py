"""Export a vectors table as an approximate-nearest-neighbour index for serving (faiss HNSW),
with its id mapping, and measure its recall@10 against the exact distributed search.

The index is one local file that a serving process memory-maps, so its vectors are gathered on
the driver here, once, as Arrow; the recall check's exact side still runs on the executors."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import SparkSession

from pipeline.errors import InputError, MissingDependencyError
from pipeline.search import Queries, exact_search
from pipeline.store.vectors import decoded_vectors, read_vectors
from pipeline.vectors import arrow_matrix, unit_rows

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
MANIFEST_FILE = "index.json"


@dataclass
class IndexReport:
    folder: str
    vectors: int
    dimension: int
    metric: str
    hnsw_m: int
    ef_search: int
    recall_at_10: float
    recall_queries: int
    build_seconds: float
    model_id: str | None
    model_fingerprint: str | None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _faiss():
    try:
        import faiss
    except ImportError as error:
        raise MissingDependencyError(
            "--export-index needs faiss: pip install 'spark-embed-pipeline[ann]'") from error
    return faiss


def _to_arrow(frame) -> pa.Table:
    """DataFrame.toArrow (Spark 4), or its private forerunner on Spark 3.5 runtimes."""
    if hasattr(frame, "toArrow"):
        return frame.toArrow()
    return pa.Table.from_batches(frame._collect_as_arrow())


def hnsw_index(matrix: np.ndarray, m: int, ef_construction: int, ef_search: int):
    """An inner-product HNSW index over the rows (normalise them first for cosine)."""
    faiss = _faiss()
    index = faiss.IndexHNSWFlat(matrix.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    index.hnsw.efSearch = ef_search
    index.add(np.ascontiguousarray(matrix, dtype=np.float32))
    return index


def neighbour_recall(approximate: np.ndarray, exact: list[list[int]], selves: np.ndarray,
                     k: int = 10) -> float:
    """Mean overlap of the top k, each query's own row left out of both lists."""
    overlaps = []
    for row, own in enumerate(selves):
        truth = [p for p in exact[row] if p != own][:k]
        found = [p for p in approximate[row] if p != own and p >= 0][:k]
        overlaps.append(len(set(truth) & set(found)) / max(len(truth), 1))
    return float(np.mean(overlaps)) if overlaps else 0.0


def build_index(spark: SparkSession, vectors: str, folder: str, metric: str = "cosine",
                m: int = 32, ef_construction: int = 200, ef_search: int = 128,
                recall_queries: int = 200, seed: int = 7) -> IndexReport:
    """Write `index.faiss`, `ids.parquet` (position -> doc_id, chunk_index) and `index.json`."""
    started = time.perf_counter()
    frame, properties = read_vectors(spark, vectors)
    frame = decoded_vectors(frame, properties)
    table = _to_arrow(frame.select("doc_id", "chunk_index", "embedding"))
    if table.num_rows == 0:
        raise InputError(f"{vectors} holds no vectors to index")
    matrix = arrow_matrix(table.column("embedding"))
    if metric == "cosine":
        matrix = unit_rows(matrix)
    index = hnsw_index(matrix, m, ef_construction, ef_search)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    _faiss().write_index(index, str(out / INDEX_FILE))
    ids = pa.table({"position": pa.array(np.arange(table.num_rows, dtype=np.int64)),
                    "doc_id": table.column("doc_id"), "chunk_index": table.column("chunk_index")})
    pq.write_table(ids, out / IDS_FILE)
    build_seconds = time.perf_counter() - started

    sample = np.random.default_rng(seed).choice(table.num_rows, min(recall_queries,
                                                                    table.num_rows), replace=False)
    recall = _recall_against_exact(spark, frame, index, matrix, sample, ids, metric)
    report = IndexReport(
        folder=str(out.resolve()), vectors=table.num_rows, dimension=matrix.shape[1],
        metric=metric, hnsw_m=m, ef_search=ef_search, recall_at_10=round(recall, 4),
        recall_queries=len(sample), build_seconds=round(build_seconds, 2),
        model_id=properties.get("pipeline.model_id"),
        model_fingerprint=properties.get("pipeline.model_fingerprint"),
    )
    (out / MANIFEST_FILE).write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    return report


def _recall_against_exact(spark: SparkSession, frame, index, matrix: np.ndarray,
                          sample: np.ndarray, ids: pa.Table, metric: str) -> float:
    """Stored vectors as queries: the index's 11 nearest against the exact search's 11 nearest,
    without the query's own row."""
    queries = Queries([str(p) for p in sample], matrix[sample])
    exact_rows = exact_search(spark, frame, queries, 11, metric=metric).collect()
    position = {(d, c): p for p, d, c in zip(*(ids.column(n).to_pylist() for n in
                                               ("position", "doc_id", "chunk_index")),
                                             strict=True)}
    exact: dict[str, list[tuple[int, int]]] = {}
    for row in exact_rows:
        exact.setdefault(row.query_id, []).append((row.rank, position[(row.doc_id,
                                                                       row.chunk_index)]))
    exact_lists = [[p for _, p in sorted(exact.get(str(q), []))] for q in sample]
    _, approximate = index.search(np.ascontiguousarray(matrix[sample]), 11)
    return neighbour_recall(approximate, exact_lists, sample)

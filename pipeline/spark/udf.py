"""Spark glue around the encoder: Arrow batches in, Arrow batches out. The model loads once per
Python worker (pipeline.model.load keeps it) and serves every batch, partition and job there."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.model.encode import Encoder, EncodeStats
from pipeline.model.load import get_encoder
from pipeline.model.spec import ModelSpec
from pipeline.vectors import row_cosines, stored_vectors

log = logging.getLogger("pipeline.spark.udf")

CHUNK_SCHEMA = pa.schema([
    ("doc_id", pa.string()),
    ("chunk_index", pa.int32()),
    ("chunk_text", pa.string()),
    ("char_start", pa.int32()),
    ("char_end", pa.int32()),
    ("token_count", pa.int32()),
    ("padded_tokens", pa.int32()),
    ("embedding", pa.list_(pa.float32())),
    ("embedding_packed", pa.binary()),
    ("embedding_scale", pa.float32()),
    ("content_hash", pa.string()),
])
CHUNK_DDL = (
    "doc_id string, chunk_index int, chunk_text string, char_start int, char_end int, "
    "token_count int, padded_tokens int, embedding array<float>, embedding_packed binary, "
    "embedding_scale float, content_hash string"
)


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs, and nothing more: shipped to executors with the function."""

    model: ModelSpec
    max_batch_tokens: int
    max_batch_rows: int
    min_fill: float = 0.9
    chunk_mode: str = "window"
    chunk_tokens: int | None = None
    chunk_overlap: int = 32
    store_text: bool = True
    vector_format: str = "float32"
    load_log_dir: str | None = None


def task_gpu() -> str | None:
    """The GPU address Spark assigned to the running task (spark.task.resource.gpu.amount)."""
    from pyspark import TaskContext

    context = TaskContext.get()
    if context is None:
        return None
    gpus = context.resources().get("gpu")
    return gpus.addresses[0] if gpus is not None and gpus.addresses else None


def worker_encoder(spec: WorkerSpec) -> Encoder:
    _ensure_worker_logging()
    return get_encoder(spec.model, spec.max_batch_tokens, spec.max_batch_rows, spec.min_fill,
                       task_gpu(), spec.load_log_dir)


def embed_record_batch(encoder: Encoder, spec: WorkerSpec, batch: pa.RecordBatch,
                       stats: EncodeStats) -> pa.RecordBatch:
    """Documents (doc_id, text, content_hash) -> one row per chunk with its vector. `text` is
    already the document text (pipeline.spark.io.documents)."""
    ids = batch.column("doc_id").to_pylist()
    texts = batch.column("text").to_pylist()
    hashes = batch.column("content_hash").to_pylist()
    window = spec.chunk_tokens or encoder.content_capacity
    per_doc = encoder.chunk(texts, window, spec.chunk_overlap, spec.chunk_mode == "truncate")
    owners = [doc for doc, chunks in enumerate(per_doc) for _ in chunks]
    chunks = [chunk for doc_chunks in per_doc for chunk in doc_chunks]
    prompt = spec.model.document_prompt
    token_ids = encoder.tokenize([prompt + chunk.text for chunk in chunks])
    vectors, padded = encoder.embed_ids(token_ids)
    token_counts = np.fromiter((len(row) for row in token_ids), dtype=np.int32, count=len(chunks))
    stats.add(token_counts, padded)
    columns = [
        pa.array([ids[doc] for doc in owners], pa.string()),
        pa.array([chunk.index for chunk in chunks], pa.int32()),
        pa.array([chunk.text if spec.store_text else None for chunk in chunks], pa.string()),
        pa.array([chunk.char_start for chunk in chunks], pa.int32()),
        pa.array([chunk.char_end for chunk in chunks], pa.int32()),
        pa.array(token_counts),
        pa.array(padded.astype(np.int32)),
        *stored_vectors(vectors, spec.vector_format),
        pa.array([hashes[doc] for doc in owners], pa.string()),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=CHUNK_SCHEMA)


def chunk_and_embed(spec: WorkerSpec) -> Callable[[Iterator[pa.RecordBatch]],
                                                   Iterator[pa.RecordBatch]]:
    """The function for DataFrame.mapInArrow: one partition of documents -> chunk rows."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        encoder = worker_encoder(spec)
        stats = EncodeStats()
        started = time.perf_counter()
        documents = 0
        for batch in batches:
            if batch.num_rows:
                documents += batch.num_rows
                yield embed_record_batch(encoder, spec, batch, stats)
        _log_partition(documents, stats, time.perf_counter() - started)

    return run


def embedding_udf(spec: WorkerSpec, kind: str = "document"):
    """An iterator pandas UDF: text column -> array<float>, for use in any DataFrame expression
    (`df.withColumn("v", embedding_udf(spec)("text"))`). Texts are truncated, not chunked; a
    null text has a null vector (an empty string still has the vector of "")."""
    from pyspark.sql.functions import pandas_udf

    @pandas_udf("array<float>")
    def embed(texts: Iterator[pd.Series]) -> Iterator[pd.Series]:
        encoder = worker_encoder(spec)
        for series in texts:
            present = np.flatnonzero(series.notna().to_numpy())
            vectors: list[np.ndarray | None] = [None] * len(series)
            if len(present):
                embedded = encoder.embed(series.iloc[present].tolist(), kind)
                for position, vector in zip(present, embedded, strict=True):
                    vectors[position] = vector
            yield pd.Series(vectors, dtype=object)

    return embed


def similarity_udf(spec: WorkerSpec, kind: str = "document"):
    """An iterator pandas UDF: two text columns -> the cosine of their vectors. Both sides of a
    batch are embedded together, so they share token-budget batches."""
    from pyspark.sql.functions import pandas_udf

    @pandas_udf("double")
    def score(pairs: Iterator[tuple[pd.Series, pd.Series]]) -> Iterator[pd.Series]:
        encoder = worker_encoder(spec)
        for left, right in pairs:
            vectors = encoder.embed(left.fillna("").tolist() + right.fillna("").tolist(), kind)
            yield pd.Series(row_cosines(vectors[:len(left)], vectors[len(left):]),
                            dtype="float64")

    return score


def _log_partition(documents: int, stats: EncodeStats, seconds: float) -> None:
    from pyspark import TaskContext

    context = TaskContext.get()
    partition = context.partitionId() if context is not None else -1
    rate = stats.real_tokens / seconds if seconds > 0 else 0.0
    log.info(
        "partition %d done: %d documents, %d chunks, %d tokens in %.1fs (%.0f tokens/s, "
        "padding efficiency %.2f)", partition, documents, stats.rows, stats.real_tokens, seconds,
        rate, stats.padding_efficiency,
    )


def _ensure_worker_logging() -> None:
    root = logging.getLogger("pipeline")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)

"""Spark glue around the encoder: Arrow batches in, Arrow batches out. The model loads once per
Python worker (pipeline.model.load keeps it) and serves every batch, partition and job there."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import BatchSettings, ChunkSettings, Settings
from pipeline.model.encode import Encoder, EncodeStats
from pipeline.model.load import get_encoder
from pipeline.model.spec import ModelSpec, TextKind
from pipeline.model.stream import Chunking, EmbeddedSlice, embed_stream
from pipeline.schema import CHUNK_SCHEMA
from pipeline.vectors import VectorFormat, row_cosines, stored_vectors

log = logging.getLogger("pipeline.spark.udf")

SLICE_BYTES = 1 << 19


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs, and nothing more: shipped to executors with the function."""

    model: ModelSpec
    batch: BatchSettings = field(default_factory=BatchSettings)
    chunking: ChunkSettings = field(default_factory=ChunkSettings)
    store_text: bool = True
    vector_format: VectorFormat = "float32"
    load_log_dir: str | None = None


def worker_spec(settings: Settings, spec: ModelSpec) -> WorkerSpec:
    """The settings a worker needs, from the typed sections."""
    return WorkerSpec(
        model=spec,
        batch=settings.batch,
        chunking=settings.chunking,
        store_text=settings.output.store_text,
        vector_format=settings.output.vector_format,
        load_log_dir=settings.run.load_log_dir,
    )


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
    _limit_tokenizer_threads()
    return get_encoder(spec.model, spec.batch, task_gpu=task_gpu(), load_log_dir=spec.load_log_dir)


def document_slices(batches: Iterable[pa.RecordBatch], slice_bytes: int = SLICE_BYTES
                    ) -> Iterator[tuple[pa.RecordBatch, list[str]]]:
    """Input batches cut into slices of about `slice_bytes` of text: small enough that the
    accelerator starts soon and the next slice is ready in time, large enough to sort rows by
    length into well-filled model batches."""
    for batch in batches:
        if not batch.num_rows:
            continue
        ends = np.cumsum(pc.binary_length(batch.column("text")).fill_null(0).to_numpy())
        start = 0
        while start < batch.num_rows:
            limit = (ends[start - 1] if start else 0) + slice_bytes
            stop = max(int(np.searchsorted(ends, limit, side="right")), start + 1)
            piece = batch.slice(start, stop - start)
            yield piece, piece.column("text").to_pylist()
            start = stop


def chunk_rows(spec: WorkerSpec, embedded: EmbeddedSlice[pa.RecordBatch]) -> pa.RecordBatch:
    """One embedded slice of documents (doc_id, text, content_hash) -> one row per chunk. A
    document an endpoint refused any chunk of is one row instead: chunk_index -1, the start of
    its text, the server's message in `refusal`, no vector (the run quarantines it)."""
    refused = _refused_documents(embedded)
    keep = [i for i, owner in enumerate(embedded.owners) if owner not in refused]
    owners = pa.array([embedded.owners[i] for i in keep], pa.int32())
    chunks = [embedded.chunks[i] for i in keep]
    columns = [
        embedded.payload.column("doc_id").take(owners),
        pa.array([chunk.index for chunk in chunks], pa.int32()),
        pa.array([chunk.text if spec.store_text else None for chunk in chunks], pa.string()),
        pa.array([chunk.char_start for chunk in chunks], pa.int32()),
        pa.array([chunk.char_end for chunk in chunks], pa.int32()),
        pa.array(embedded.token_counts[keep]),
        pa.array(embedded.padded[keep]),
        *stored_vectors(embedded.vectors[keep], spec.vector_format),
        embedded.payload.column("content_hash").take(owners),
        pa.nulls(len(keep), pa.string()),
        pa.array(np.zeros(len(keep), np.int32)),
    ]
    rows = pa.RecordBatch.from_arrays(columns, schema=CHUNK_SCHEMA)
    if refused:
        rows = pa.Table.from_batches([rows, _refusal_rows(embedded, refused)]
                                     ).combine_chunks().to_batches()[0]
    if embedded.retries and rows.num_rows:
        retries = np.zeros(rows.num_rows, np.int32)
        retries[0] = embedded.retries
        rows = rows.set_column(CHUNK_SCHEMA.get_field_index("retries"), "retries",
                               pa.array(retries))
    return rows


def _refused_documents(embedded: EmbeddedSlice) -> dict[int, str]:
    """Each refused document (index in the slice) and its first refused chunk's message."""
    refused: dict[int, str] = {}
    for owner, refusal in zip(embedded.owners, embedded.refusals or [], strict=False):
        if refusal is not None:
            refused.setdefault(owner, refusal)
    return refused


def _refusal_rows(embedded: EmbeddedSlice, refused: dict[int, str]) -> pa.RecordBatch:
    docs = pa.array(sorted(refused), pa.int32())
    count = len(docs)
    texts = pc.utf8_slice_codeunits(embedded.payload.column("text").take(docs), 0, 1000)
    values = {
        "doc_id": embedded.payload.column("doc_id").take(docs),
        "chunk_index": pa.array(np.full(count, -1, np.int32)),
        "chunk_text": texts,
        "content_hash": embedded.payload.column("content_hash").take(docs),
        "refusal": pa.array([refused[doc] for doc in sorted(refused)], pa.string()),
        "retries": pa.array(np.zeros(count, np.int32)),
    }
    return pa.RecordBatch.from_arrays(
        [values.get(field.name, pa.nulls(count, field.type)) for field in CHUNK_SCHEMA],
        schema=CHUNK_SCHEMA)


def chunk_and_embed(spec: WorkerSpec) -> Callable[[Iterator[pa.RecordBatch]],
                                                   Iterator[pa.RecordBatch]]:
    """The function for DataFrame.mapInArrow: one partition of documents -> chunk rows. `text`
    is already the document text (pipeline.spark.io.documents)."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        encoder = worker_encoder(spec)
        window = spec.chunking.chunk_tokens or encoder.content_capacity
        chunking = Chunking(window, spec.chunking.chunk_overlap,
                            spec.chunking.mode == "truncate")
        stats = EncodeStats()
        started = time.perf_counter()
        documents = 0
        for embedded in embed_stream(encoder, document_slices(batches), chunking,
                                     spec.batch.overlap):
            documents += embedded.payload.num_rows
            stats.add(embedded.token_counts, embedded.padded)
            yield chunk_rows(spec, embedded)
        _log_partition(documents, stats, time.perf_counter() - started)

    return run


def load_model_in_worker(spec: WorkerSpec) -> Callable[[Iterator[pa.RecordBatch]],
                                                        Iterator[pa.RecordBatch]]:
    """A mapInArrow function that only loads the model into its worker (rows: `loaded`)."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for _ in batches:
            pass
        worker_encoder(spec)
        yield pa.RecordBatch.from_pydict({"loaded": [1]})

    return run


def embedding_udf(spec: WorkerSpec, kind: TextKind = "document"):
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


def similarity_udf(spec: WorkerSpec, kind: TextKind = "document"):
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


def _limit_tokenizer_threads() -> None:
    """The Rust tokenizer's thread pool takes every core of the node unless told; a task gets
    `spark.task.cpus` of them. Read once, when the pool starts."""
    from pyspark import TaskContext

    context = TaskContext.get()
    if context is not None:
        os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, context.cpus())))


def _ensure_worker_logging() -> None:
    root = logging.getLogger("pipeline")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)

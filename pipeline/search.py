"""Exact top-k retrieval over a vectors table, computed where the vectors live.

The query matrix travels to the executors with the scoring function (Spark broadcasts a large
pickled function); each partition scores its vectors in blocks with one matrix product and keeps
its own top k per query; a window over the partial results makes the global top k. The corpus is
never collected to the driver: only k rows per query and partition move.

Document-level results rank documents by their best chunk. Each partition keeps its top k
*documents* (its best chunk of each), which is exact: a document in the global top k has its best
chunk in some partition, where fewer than k documents can beat it."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from pipeline.config import InputSettings, ModelSettings, Settings, build_dataclass
from pipeline.embed import worker_spec
from pipeline.model.spec import ModelSpec, resolve_model_spec
from pipeline.spark.io import read_source
from pipeline.spark.session import default_parallelism
from pipeline.spark.udf import WorkerSpec, embedding_udf
from pipeline.store.delta import VECTOR_PROPERTIES, TableRef, check_same_model
from pipeline.vectors import batch_matrix, unit_rows, vectors_to_arrow

STORED_COLUMNS = {"float32": ("embedding",), "float16": ("embedding_packed",),
                  "int8": ("embedding_packed", "embedding_scale"),
                  "binary": ("embedding_packed",)}
PARTIAL_DDL = "query_index int, doc_id string, chunk_index int, score float"
RESULT_COLUMNS = ("query_id", "rank", "doc_id", "chunk_index", "score")
METRICS = ("cosine", "dot")


@dataclass(frozen=True)
class Queries:
    """Query ids and their vectors, row for row."""

    ids: list[str]
    vectors: np.ndarray

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.vectors):
            raise ValueError(f"{len(self.ids)} query ids for {len(self.vectors)} vectors")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("query ids must be unique")


# --- the pure core -------------------------------------------------------------------------


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
    """One query's best rows so far."""

    scores: np.ndarray
    doc_ids: np.ndarray
    chunk_indexes: np.ndarray

    @classmethod
    def empty(cls) -> Candidates:
        return cls(np.empty(0, np.float32), np.empty(0, object), np.empty(0, np.int32))

    def merged(self, scores: np.ndarray, doc_ids: np.ndarray, chunk_indexes: np.ndarray,
               k: int, by_document: bool) -> Candidates:
        scores = np.concatenate([self.scores, scores])
        doc_ids = np.concatenate([self.doc_ids, doc_ids])
        chunk_indexes = np.concatenate([self.chunk_indexes, chunk_indexes])
        keep = top_positions(scores, doc_ids, chunk_indexes, k, by_document)
        return Candidates(scores[keep], doc_ids[keep], chunk_indexes[keep])


def score_batches(queries: np.ndarray, k: int, by_document: bool, normalize: bool,
                  vector_format: str = "float32", block_rows: int = 1024
                  ) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The function for DataFrame.mapInArrow: batches of (doc_id, chunk_index) and the stored
    vector columns -> this partition's top k rows per query."""

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
            for start in range(0, len(queries), block_rows):
                scores = queries[start:start + block_rows] @ matrix.T
                for offset, row in enumerate(scores):
                    keep = top_positions(row, doc_ids, chunk_indexes, k, by_document)
                    query = start + offset
                    best[query] = best[query].merged(row[keep], doc_ids[keep],
                                                     chunk_indexes[keep], k, by_document)
        yield _partial_batch(best)

    return run


def _partial_batch(best: list[Candidates]) -> pa.RecordBatch:
    counts = [len(c.scores) for c in best]
    return pa.RecordBatch.from_arrays([
        pa.array(np.repeat(np.arange(len(best), dtype=np.int32), counts)),
        pa.array([d for c in best for d in c.doc_ids], pa.string()),
        pa.array(np.concatenate([c.chunk_indexes for c in best]).astype(np.int32)
                 if best else np.empty(0, np.int32)),
        pa.array(np.concatenate([c.scores for c in best]).astype(np.float32)
                 if best else np.empty(0, np.float32)),
    ], names=["query_index", "doc_id", "chunk_index", "score"])


# --- Spark glue ----------------------------------------------------------------------------


def exact_search(spark: SparkSession, vectors: DataFrame, queries: Queries, k: int,
                 by_document: bool = False, metric: str = "cosine",
                 vector_format: str = "float32") -> DataFrame:
    """Top k (query_id, rank, doc_id, chunk_index, score) per query over a vectors frame
    (doc_id, chunk_index and the columns of its vector format). Cosine normalises both sides;
    dot takes them as they are. Binary vectors score as -1/+1 against the float queries."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    normalize = metric == "cosine"
    matrix = np.asarray(queries.vectors, dtype=np.float32)
    if normalize:
        matrix = unit_rows(matrix)
    partials = (vectors.select("doc_id", "chunk_index", *STORED_COLUMNS[vector_format])
                .mapInArrow(score_batches(matrix, k, by_document, normalize, vector_format),
                            PARTIAL_DDL))
    if by_document:
        partials = partials.groupBy("query_index", "doc_id").agg(
            F.max_by("chunk_index", "score").alias("chunk_index"), F.max("score").alias("score"))
    order = Window.partitionBy("query_index").orderBy(F.desc("score"), F.asc("doc_id"),
                                                      F.asc("chunk_index"))
    ranked = (partials.withColumn("rank", F.row_number().over(order))
              .where(F.col("rank") <= k))
    ids = spark.createDataFrame(list(enumerate(queries.ids)), "query_index int, query_id string")
    return ranked.join(F.broadcast(ids), "query_index").select(*RESULT_COLUMNS)


def vector_format(properties: dict[str, str]) -> str:
    return properties.get("pipeline.vector_format", "float32")


def decoded_vectors(frame: DataFrame, properties: dict[str, str]) -> DataFrame:
    """The table with `embedding` as array<float> whatever the stored format, for consumers
    that need plain vectors (clustering, index export)."""
    fmt = vector_format(properties)
    packed = [c for c in ("embedding_packed", "embedding_scale") if c in frame.columns]
    if fmt == "float32":
        return frame.drop(*packed)
    dim = int(properties["pipeline.dimension"])
    kept = frame.drop(*packed, "embedding")
    names = kept.columns

    def decode(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            columns = [batch.column(name) for name in names]
            columns.append(vectors_to_arrow(batch_matrix(batch, fmt, dim)))
            yield pa.RecordBatch.from_arrays(columns, names=[*names, "embedding"])

    schema = kept.withColumn("embedding", F.lit(None).cast("array<float>")).schema
    return frame.mapInArrow(decode, schema)


def read_vectors(spark: SparkSession, location: str) -> tuple[DataFrame, dict[str, str]]:
    """The vectors table and its properties."""
    table = TableRef.parse(location)
    if not table.exists(spark):
        raise FileNotFoundError(f"no Delta table at {table.location}")
    return table.read(spark), table.properties(spark)


# --- queries -------------------------------------------------------------------------------


def table_model_settings(spark: SparkSession, location: str) -> ModelSettings | None:
    """The model settings of the last successful run that wrote the table (from `<table>_runs`),
    so a search embeds its queries with the model that made the vectors."""
    runs = TableRef.parse(location).sibling("_runs")
    if not runs.exists(spark):
        return None
    last = (runs.read(spark).where(F.col("status") == "succeeded")
            .orderBy(F.desc("ended_at")).select("config").limit(1).collect())
    if not last:
        return None
    raw = json.loads(last[0]["config"]).get("model") or {}
    return build_dataclass(ModelSettings, raw, "model")


def query_model(spark: SparkSession, settings: Settings, location: str,
                properties: dict[str, str], explicit: bool, instruction: str | None
                ) -> ModelSpec:
    """The query model: the one named on the command line, else the table's own; either way it
    must have made the table's vectors."""
    model = settings.model
    if not explicit:
        model = table_model_settings(spark, location) or model
    if instruction is not None:
        model = dataclasses.replace(model, query_instruction=instruction)
    spec = resolve_model_spec(model)
    check_same_model(TableRef.parse(location), properties, spec.table_properties(),
                     VECTOR_PROPERTIES)
    return spec


def embed_queries(frame: DataFrame, worker: WorkerSpec, partitions: int) -> Queries:
    """(query_id, text) -> query vectors, embedded on the executors with the query prompt."""
    embedded = (frame.select(F.col("query_id").cast("string"), F.col("text").cast("string"))
                .repartition(partitions)
                .withColumn("embedding", embedding_udf(worker, "query")("text"))
                .select("query_id", "embedding").toPandas())
    if embedded.empty:
        raise ValueError("no queries to search")
    return Queries(embedded.query_id.tolist(), np.stack(embedded.embedding.to_numpy())
                   .astype(np.float32))


def query_frame(spark: SparkSession, texts: list[str], source: InputSettings | None
                ) -> DataFrame:
    """Queries from the command line (ids q1, q2, ...) and/or a file or table."""
    frames = []
    if texts:
        frames.append(spark.createDataFrame(
            [(f"q{i}", text) for i, text in enumerate(texts, 1)], "query_id string, text string"))
    if source is not None:
        table = read_source(spark, source)
        frames.append(table.select(F.col(source.id_col).cast("string").alias("query_id"),
                                   F.col(source.text_col).cast("string").alias("text")))
    if not frames:
        raise ValueError("give queries: --query TEXT (repeatable) or --queries FILE_OR_TABLE")
    combined = frames[0]
    for frame in frames[1:]:
        combined = combined.unionByName(frame)
    return combined.where(F.col("text").isNotNull() & (F.trim("text") != ""))


@dataclass
class SearchReport:
    vectors: str
    model_id: str
    queries: int
    k: int
    level: str
    metric: str
    rows: int
    output: str | None
    seconds: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def search_table(spark: SparkSession, settings: Settings, vectors: str, queries: DataFrame,
                 k: int, by_document: bool, metric: str, explicit_model: bool = False,
                 instruction: str | None = None) -> tuple[DataFrame, ModelSpec]:
    """Embed the queries with the table's model and rank the table's chunks (or documents)."""
    frame, properties = read_vectors(spark, vectors)
    spec = query_model(spark, settings, vectors, properties, explicit_model, instruction)
    partitions = settings.spark.partitions or default_parallelism(spark)
    embedded = embed_queries(queries, worker_spec(settings, spec), partitions)
    return exact_search(spark, frame, embedded, k, by_document, metric,
                        vector_format(properties)), spec

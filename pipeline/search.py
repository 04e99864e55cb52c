"""Exact top-k retrieval over a vectors table, computed where the vectors live.

The query matrix travels to the executors with the scoring function (Spark broadcasts a large
pickled function); each partition scores its vectors in blocks with one matrix product and keeps
its own top k per query; a window over the partial results makes the global top k. The corpus is
never collected to the driver: only k rows per query and partition move. The scoring function
itself is pipeline/topk.py, NumPy and Arrow only.

Document-level results rank documents by their best chunk. Each partition keeps its top k
*documents* (its best chunk of each), which is exact: a document in the global top k has its best
chunk in some partition, where fewer than k documents can beat it."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, Row, SparkSession, Window
from pyspark.sql import functions as F

from pipeline.config import (
    InputSettings,
    ModelSettings,
    Settings,
    default_model_id,
    recorded_settings,
)
from pipeline.errors import InputError, UsageError
from pipeline.model.spec import ModelSpec, ModelSpecError, resolve_model_spec
from pipeline.spark.io import read_source
from pipeline.spark.session import default_parallelism, is_connect
from pipeline.store.delta import PROBE_PROPERTY, VECTOR_PROPERTIES, TableRef, check_same_model
from pipeline.store.delta_log import LogSnapshot, local_snapshot
from pipeline.store.runs import last_succeeded_config
from pipeline.store.vectors import (
    STORED_COLUMNS,
    read_vectors,
    vector_format,
)
from pipeline.topk import score_batches
from pipeline.vectors import METRICS, Metric, VectorFormat, unit_rows

# The encoder's modules (pipeline.embed, pipeline.spark.udf, pipeline.model.load: torch and
# transformers) are imported where queries are embedded, not here, so that a local search imports
# them in the background while Spark reads the table (preload_encoder).
if TYPE_CHECKING:
    from pipeline.model.encode import Encoder
    from pipeline.spark.udf import WorkerSpec

log = logging.getLogger("pipeline.search")

PARTIAL_DDL = "query_id string, doc_id string, chunk_index int, score float, chunk_text string"
RESULT_COLUMNS = ("query_id", "rank", "doc_id", "chunk_index", "score")
# Queries a local driver embeds itself (embed_queries); more go to the executors.
DRIVER_QUERIES = 1000
NO_QUERIES = "give queries: --query TEXT (repeatable) or --queries FILE_OR_TABLE"
# A table whose files hold at most this much a local driver scores itself, in one pass over its
# rows fetched as Arrow (no Python workers to start, no shuffle); larger ones are scored where
# they lie. Its rows take about DECODED_PER_STORED[format] x the files' bytes in memory, as
# float32 matrices (a compact format decodes to 4 bytes a dimension).
DRIVER_TABLE_BYTES = 32 << 20
DECODED_PER_STORED = {"float32": 3, "float16": 6, "int8": 12, "binary": 96}
DRIVER_BLOCK_ROWS = 10_000  # rows decoded and scored at once on the driver
# The driver's encoder (pipeline.model.load keeps one model per process): held while it loads.
_DRIVER_ENCODER = threading.Lock()


@dataclass(frozen=True)
class Queries:
    """Query ids and their vectors, row for row."""

    ids: list[str]
    vectors: np.ndarray

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.vectors):
            raise ValueError(f"{len(self.ids)} query ids for {len(self.vectors)} vectors")
        if len(set(self.ids)) != len(self.ids):
            raise InputError("query ids must be unique")


def numbered_ids(texts: list[str]) -> list[str]:
    """The command line's query ids: q1, q2, ... by position."""
    return [f"q{i}" for i in range(1, len(texts) + 1)]


@dataclass(frozen=True)
class QueryTexts:
    """Queries held in this process (the command line's, ids q1, q2, ... by position): a local
    driver embeds them without a Spark job."""

    ids: list[str]
    texts: list[str]

    @classmethod
    def numbered(cls, texts: list[str]) -> QueryTexts:
        if not texts:
            raise UsageError(NO_QUERIES)
        kept = [(query_id, text) for query_id, text in zip(numbered_ids(texts), texts,
                                                            strict=True) if text and text.strip()]
        if not kept:
            raise InputError("no queries to search: every --query is blank")
        return cls([i for i, _ in kept], [t for _, t in kept])

    def frame(self, spark: SparkSession) -> DataFrame:
        """As a local relation (pandas through Arrow): collecting it runs no job."""
        return spark.createDataFrame(pd.DataFrame({"query_id": self.ids, "text": self.texts}),
                                     "query_id string, text string")


# --- Spark glue ----------------------------------------------------------------------------


def exact_search(spark: SparkSession, vectors: DataFrame, queries: Queries, k: int, *,
                 by_document: bool = False, metric: Metric = "cosine",
                 vector_format: VectorFormat = "float32", with_text: bool = False,
                 on_driver: bool = False) -> DataFrame:
    """Top k (query_id, rank, doc_id, chunk_index, score) per query over a vectors frame
    (doc_id, chunk_index and the columns of its vector format). Cosine normalises both sides;
    dot takes them as they are. Binary vectors score as -1/+1 against the float queries.
    `with_text` adds the hits' `chunk_text`, carried through the scoring from the same scan.
    `on_driver` scores the rows in this process (a small table: see DRIVER_TABLE_BYTES), with
    the same function and order as the executors."""
    score, columns = _scoring(queries, k, by_document, metric, vector_format, with_text)
    scanned = vectors.select(*columns)
    if on_driver:
        return _ranked_here(spark, scanned.toArrow().to_batches(DRIVER_BLOCK_ROWS), score,
                            with_text)
    partials = scanned.mapInArrow(score, PARTIAL_DDL)
    if by_document:
        partials = (partials.groupBy("query_id", "doc_id")
                    .agg(F.max_by(F.struct("chunk_index", "chunk_text"), "score").alias("best"),
                         F.max("score").alias("score"))
                    .select("query_id", "doc_id", "best.chunk_index", "score", "best.chunk_text"))
    order = Window.partitionBy("query_id").orderBy(F.desc("score"), F.asc("doc_id"),
                                                      F.asc("chunk_index"))
    return (partials.withColumn("rank", F.row_number().over(order))
            .where(F.col("rank") <= k).select(*RESULT_COLUMNS, *_text_columns(with_text)))


def exact_search_files(spark: SparkSession, snapshot: LogSnapshot, queries: Queries, k: int, *,
                       by_document: bool = False, metric: Metric = "cosine",
                       vector_format: VectorFormat = "float32", with_text: bool = False
                       ) -> DataFrame | None:
    """exact_search over a small local table's Parquet files, read in this process from its
    log's snapshot (pipeline.store.delta_log): no Spark job reads the table. None, for Spark to
    read the table instead, when a file lacks a column (an older file of an evolved schema,
    which Delta reads as nulls) or cannot be read here."""
    score, columns = _scoring(queries, k, by_document, metric, vector_format, with_text)
    try:
        if any(not set(columns) <= set(pq.read_schema(path).names) for path in snapshot.files):
            return None
        return _ranked_here(spark, _file_batches(snapshot.files, columns), score, with_text)
    except (OSError, pa.ArrowException):
        log.debug("the files of version %s are left to Spark", snapshot.version, exc_info=True)
        return None


def _file_batches(paths: Iterable[str], columns: tuple[str, ...]) -> Iterator[pa.RecordBatch]:
    for path in paths:  # one file open at a time
        with pq.ParquetFile(path) as file:
            yield from file.iter_batches(DRIVER_BLOCK_ROWS, columns=list(columns))


def _scoring(queries: Queries, k: int, by_document: bool, metric: Metric, fmt: VectorFormat,
             with_text: bool) -> tuple[Callable, tuple[str, ...]]:
    """The scoring function over Arrow batches, and the columns it reads."""
    if metric not in METRICS:
        raise UsageError(f"metric must be one of {METRICS}, got {metric!r}")
    if k < 1:
        raise UsageError(f"k must be at least 1, got {k}")
    normalize = metric == "cosine"
    matrix = np.asarray(queries.vectors, dtype=np.float32)
    if normalize:
        matrix = unit_rows(matrix)
    score = score_batches(matrix, queries.ids, k, by_document, normalize, fmt,
                          text_col="chunk_text" if with_text else None)
    return score, ("doc_id", "chunk_index", *STORED_COLUMNS[fmt], *_text_columns(with_text))


def _text_columns(with_text: bool) -> tuple[str, ...]:
    return ("chunk_text",) if with_text else ()


def _ranked_here(spark: SparkSession, batches: Iterable[pa.RecordBatch], score,
                 with_text: bool) -> DataFrame:
    """All the table's rows through the scoring function in this process: its one partial
    result is each query's top k, best first (exact, as a single partition's is)."""
    partial = pa.Table.from_batches(list(score(iter(batches))))
    frame = partial.to_pandas()
    frame.insert(1, "rank", frame.groupby("query_id", sort=False).cumcount() + 1)
    schema = "query_id string, rank int, doc_id string, chunk_index int, score float" + (
        ", chunk_text string" if with_text else "")
    return spark.createDataFrame(frame[[*RESULT_COLUMNS, *_text_columns(with_text)]], schema)


def readable_snapshot(spark: SparkSession, location: str) -> LogSnapshot | None:
    """The table's snapshot from its log (pipeline.store.delta_log) where this process sees the
    files Spark would read: not over Spark Connect (the files are the server's), and a path
    without a scheme only where Hadoop's default filesystem is the local one."""
    if is_connect(spark):
        return None
    if "://" not in location and not location.startswith("file:"):
        with suppress(Exception):  # no JVM to ask: the path is taken as local
            default = spark.sparkContext._jsc.hadoopConfiguration().get("fs.defaultFS")
            if default and not default.startswith("file:"):
                return None
    return local_snapshot(location)


def fits_driver(spark: SparkSession, size_bytes: int, fmt: VectorFormat) -> bool:
    """A table of files of `size_bytes` decodes within DRIVER_TABLE_BYTES and within half of
    what the driver may receive."""
    limit = DRIVER_TABLE_BYTES
    with suppress(Exception):
        limit = min(limit, _bytes(spark.conf.get("spark.driver.maxResultSize", "1g")) // 2)
    return size_bytes * DECODED_PER_STORED[fmt] <= limit


def _bytes(size: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    size = size.strip().lower().removesuffix("b")
    if size and size[-1] in units:
        return int(float(size[:-1]) * units[size[-1]])
    return int(size) if size.isdigit() and int(size) > 0 else 1 << 62


# --- queries -------------------------------------------------------------------------------


def table_model_settings(spark: SparkSession, location: str) -> ModelSettings | None:
    """The model settings of the last successful run that wrote the table (from `<table>_runs`),
    so a search embeds its queries with the model that made the vectors."""
    config = last_succeeded_config(spark, TableRef.parse(location))
    return recorded_settings(config).model if config is not None else None


def is_tables_model(model: ModelSettings, properties: dict[str, str]) -> bool:
    """True when the profile's model is the one the table records (id, fingerprint, dimension,
    pooling, prompts, max length): then `<table>_runs` need not be read for it. Only a model
    under the table's model id is resolved, so no other model is fetched for the comparison."""
    if (model.id or default_model_id(model.name)) != properties.get("pipeline.model_id"):
        return False
    try:
        recorded = resolve_model_spec(model).table_properties()
    except ModelSpecError:
        return False
    recorded.pop(PROBE_PROPERTY, None)  # compared by cosine, in check_same_model
    return all(properties.get(key) == value for key, value in recorded.items())


def query_model(spark: SparkSession, settings: Settings, location: str,
                properties: dict[str, str], explicit: bool, instruction: str | None
                ) -> ModelSpec:
    """The query model: the one named on the command line, else the table's own; either way it
    must have made the table's vectors."""
    model = settings.model
    if not explicit and not is_tables_model(model, properties):
        model = table_model_settings(spark, location) or model
    if instruction is not None:
        model = dataclasses.replace(model, query_instruction=instruction)
    spec = resolve_model_spec(model)
    check_same_model(TableRef.parse(location), properties, spec.table_properties(),
                     VECTOR_PROPERTIES)
    return spec


def embed_queries(frame: DataFrame, worker: WorkerSpec, partitions: int,
                  on_driver: bool = False) -> Queries:
    """(query_id, text) -> query vectors, with the query prompt. With `on_driver`, up to
    DRIVER_QUERIES queries are embedded in this process (the encoder is plain Python and torch):
    for a handful, starting Python workers that each load the model costs far more than the
    embedding. More queries, or without `on_driver`, are embedded on the executors."""
    pairs = frame.select(F.col("query_id").cast("string"), F.col("text").cast("string"))
    if on_driver:
        few = pairs.limit(DRIVER_QUERIES + 1).collect()
        if len(few) <= DRIVER_QUERIES:
            return _embed_here([row.query_id for row in few], [row.text for row in few], worker)
    from pipeline.spark.udf import embedding_udf

    embedded = (pairs.repartition(partitions)
                .withColumn("embedding", embedding_udf(worker, "query")("text"))
                .select("query_id", "embedding").toPandas())
    if embedded.empty:
        raise InputError("no queries to search")
    return Queries(embedded.query_id.tolist(), np.stack(embedded.embedding.to_numpy())
                   .astype(np.float32))


def _embed_here(ids: list[str], texts: list[str], worker: WorkerSpec) -> Queries:
    if not ids:
        raise InputError("no queries to search")
    with _DRIVER_ENCODER:
        encoder = _driver_encoder(worker)
        return Queries(ids, np.asarray(encoder.embed(texts, "query"), dtype=np.float32))


def _driver_encoder(worker: WorkerSpec) -> Encoder:
    from pipeline.model.load import get_encoder

    return get_encoder(worker.model, worker.batch, load_log_dir=worker.load_log_dir)


def import_encoder_in_background() -> threading.Thread:
    """Import the encoder's modules (torch, transformers: seconds) in another thread. A job
    calls it before its first reads of the table, which leave this process waiting on the JVM;
    whichever thread needs the modules first then waits only for what is left. Not a daemon
    thread: the interpreter lets it finish before it exits."""

    def run() -> None:
        try:
            from transformers import AutoModel, AutoTokenizer  # noqa: F401

            import pipeline.spark.udf  # noqa: F401 (torch, through the encoder)
        except Exception:
            log.debug("importing the encoder's modules ahead failed", exc_info=True)

    thread = threading.Thread(target=run, name="import-encoder")
    thread.start()
    return thread


def preload_encoder(settings: Settings) -> threading.Thread:
    """Load the settings' model into this process in a background thread. A local search starts
    it first: the seconds of importing torch and transformers and reading the weights then
    overlap the JVM's reads of the table, and the query embedding, which waits for it, finds the
    model resident when it is the table's (the usual case; get_encoder replaces another). A
    failure here is only logged: the embedding's own load reports it, if the model is used."""
    _DRIVER_ENCODER.acquire()  # here, not in the thread, so the embedding cannot go first

    def load() -> None:
        try:
            from pipeline.spark.udf import worker_spec

            _driver_encoder(worker_spec(settings, resolve_model_spec(settings.model)))
        except Exception:
            log.debug("loading %s ahead failed", settings.model.name, exc_info=True)
        finally:
            _DRIVER_ENCODER.release()

    thread = threading.Thread(target=load, name="preload-encoder", daemon=True)
    thread.start()
    return thread


def local_master(spark: SparkSession) -> bool:
    """True where the driver shares the machine with the executors (a local master), so that
    loading the model there costs what a worker's load would."""
    try:
        return spark.conf.get("spark.master", "").startswith("local")
    except Exception:  # a Spark Connect server may not say: treat it as a cluster
        return False


def query_frame(spark: SparkSession, texts: list[str], source: InputSettings | None
                ) -> DataFrame:
    """Queries from the command line (ids q1, q2, ...) and/or a file or table."""
    if not texts and source is None:
        raise UsageError(NO_QUERIES)
    frames = [QueryTexts(numbered_ids(texts), texts).frame(spark)] if texts else []
    if source is not None:
        table = read_source(spark, source)
        frames.append(table.select(F.col(source.id_col).cast("string").alias("query_id"),
                                   F.col(source.text_col).cast("string").alias("text")))
    combined = frames[0]
    for frame in frames[1:]:
        combined = combined.unionByName(frame)
    return combined.where(F.col("text").rlike(r"\S"))  # as QueryTexts: blank texts dropped


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


def search_table(spark: SparkSession, settings: Settings, vectors: str,
                 queries: DataFrame | QueryTexts, k: int, *, by_document: bool, metric: Metric,
                 explicit_model: bool = False, instruction: str | None = None,
                 with_text: bool = False) -> tuple[DataFrame, ModelSpec]:
    """Embed the queries with the table's model and rank the table's chunks (or documents),
    with their text if asked. On a local master the queries are embedded on the driver, the
    model loading meanwhile, and a small local table is read there from its files."""
    on_driver = local_master(spark)
    loading = preload_encoder(settings) if on_driver else None
    try:
        table = open_vectors(spark, vectors, on_driver)
        spec = query_model(spark, settings, vectors, table.properties, explicit_model,
                           instruction)
        from pipeline.spark.udf import worker_spec  # after the reads: the preload imports it

        embedded = _embedded(spark, queries, worker_spec(settings, spec),
                             settings.spark.partitions, on_driver)
    finally:
        if loading is not None:
            loading.join()  # on an error too: no thread left loading while the job exits
    options = dict(k=k, by_document=by_document, metric=metric,
                   vector_format=vector_format(table.properties), with_text=with_text)
    if table.snapshot is not None:
        results = exact_search_files(spark, table.snapshot, embedded, **options)
        if results is not None:
            return results, spec
    frame = table.frame if table.frame is not None else read_vectors(spark, vectors)[0]
    return exact_search(spark, frame, embedded, on_driver=table.on_driver, **options), spec


def _embedded(spark: SparkSession, queries: DataFrame | QueryTexts, worker: WorkerSpec,
              partitions: int | None, on_driver: bool) -> Queries:
    if isinstance(queries, QueryTexts):
        if on_driver and len(queries.ids) <= DRIVER_QUERIES:
            return _embed_here(queries.ids, queries.texts, worker)
        queries = queries.frame(spark)
    return embed_queries(queries, worker, partitions or default_parallelism(spark), on_driver)


@dataclass(frozen=True)
class SearchedTable:
    """The table a search ranks: its properties; a small local table's snapshot, whose files
    the driver reads itself, or the frame Spark reads; and whether the driver scores it."""

    properties: dict[str, str]
    snapshot: LogSnapshot | None = None
    frame: DataFrame | None = None
    on_driver: bool = False


def open_vectors(spark: SparkSession, location: str, on_driver: bool) -> SearchedTable:
    """On a local driver, a small local table from its log (its properties with it, and no
    Spark job); else the table through Spark, scored on a local driver when small enough."""
    snapshot = readable_snapshot(spark, location) if on_driver else None
    if snapshot is not None and fits_driver(spark, snapshot.size_bytes,
                                            vector_format(snapshot.properties)):
        return SearchedTable(snapshot.properties, snapshot=snapshot, on_driver=True)
    frame, properties = read_vectors(spark, location)
    # a snapshot read here that did not fit above will not fit now; without one, Delta says
    small = on_driver and snapshot is None and fits_driver(
        spark, TableRef.parse(location).size_bytes(spark), vector_format(properties))
    return SearchedTable(properties, frame=frame, on_driver=small)


def result_counts(results: DataFrame) -> tuple[int, int]:
    """Result rows and the queries they answer, in one job."""
    counts = results.agg(F.count("*").alias("rows"),
                         F.countDistinct("query_id").alias("queries")).first()
    return counts["rows"], counts["queries"]


def ranked_rows(results: DataFrame) -> list[Row]:
    """The results collected, by query and rank: sorted here, as a global sort in Spark costs a
    sampling job and a shuffle."""
    return sorted(results.collect(), key=lambda row: (row.query_id, row.rank))

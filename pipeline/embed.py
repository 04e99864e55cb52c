"""One embedding run: read -> check -> embed -> write -> summary."""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass

from pyspark.sql import DataFrame, Observation, SparkSession
from pyspark.sql import functions as F

from pipeline.config import Settings
from pipeline.model.spec import ModelSpec, resolve_model_spec
from pipeline.spark.io import documents, read_source, reject_reason
from pipeline.spark.session import default_parallelism
from pipeline.spark.udf import CHUNK_DDL, WorkerSpec, chunk_and_embed
from pipeline.store.delta import VECTOR_COLUMNS, TableRef, write_vectors

log = logging.getLogger("pipeline.embed")


@dataclass
class RunSummary:
    run_id: str
    output: str
    model_id: str
    model_fingerprint: str
    dimension: int
    documents_read: int
    documents_embedded: int
    chunks_written: int
    rejected: int
    tokens: int
    padded_tokens: int
    padding_efficiency: float
    seconds: float
    tokens_per_second: float
    table_version: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def worker_spec(settings: Settings, spec: ModelSpec) -> WorkerSpec:
    return WorkerSpec(
        model=spec,
        max_batch_tokens=settings.batch.max_batch_tokens,
        max_batch_rows=settings.batch.max_batch_rows,
        min_fill=settings.batch.min_fill,
        chunk_mode=settings.chunking.mode,
        chunk_tokens=settings.chunking.chunk_tokens,
        chunk_overlap=settings.chunking.chunk_overlap,
        store_text=settings.output.store_text,
        load_log_dir=settings.run.load_log_dir,
    )


def embed_documents(docs: DataFrame, worker: WorkerSpec, partitions: int) -> DataFrame:
    """Valid documents -> chunk rows with vectors (doc_id, chunk_index, ..., embedding)."""
    return docs.repartition(partitions).mapInArrow(chunk_and_embed(worker), CHUNK_DDL)


def run_embedding(spark: SparkSession, settings: Settings) -> RunSummary:
    started = time.perf_counter()
    run_id = uuid.uuid4().hex[:16]
    source = documents(read_source(spark, settings.input), settings.input)
    spec = resolve_model_spec(settings.model)
    table = TableRef.parse(settings.output.path)
    partitions = settings.spark.partitions or default_parallelism(spark)
    log.info("run %s: %s -> %s with %s (%d-d, %s pooling), %d partitions", run_id,
             settings.input.path, table.location, spec.model_id, spec.dimension, spec.pooling,
             partitions)

    checked = source.withColumn("reject_reason", reject_reason())
    rejected = _write_rejects(spark, table, checked, run_id)

    read_stats = Observation("documents_read")
    valid = (checked.observe(read_stats, F.count(F.lit(1)).alias("documents_read"))
             .where(F.col("reject_reason").isNull()).drop("reject_reason"))
    chunks = embed_documents(valid, worker_spec(settings, spec), partitions)
    write_stats = Observation("chunks_written")
    chunks = chunks.observe(
        write_stats,
        F.count(F.lit(1)).alias("chunks"),
        F.sum(F.when(F.col("chunk_index") == 0, 1).otherwise(0)).alias("documents"),
        F.sum("token_count").alias("tokens"),
        F.sum("padded_tokens").alias("padded"),
    )
    rows = (chunks.withColumn("model_id", F.lit(spec.model_id))
            .withColumn("model_fingerprint", F.lit(spec.fingerprint))
            .withColumn("embedded_at", F.current_timestamp())
            .withColumn("run_id", F.lit(run_id))
            .select(*VECTOR_COLUMNS))
    version = write_vectors(spark, table, rows, settings.output.mode, spec.table_properties())

    written = write_stats.get
    seconds = time.perf_counter() - started
    tokens = int(written.get("tokens") or 0)
    padded = int(written.get("padded") or 0)
    return RunSummary(
        run_id=run_id,
        output=table.location,
        model_id=spec.model_id,
        model_fingerprint=spec.fingerprint,
        dimension=spec.dimension,
        documents_read=int(read_stats.get.get("documents_read") or 0),
        documents_embedded=int(written.get("documents") or 0),
        chunks_written=int(written.get("chunks") or 0),
        rejected=rejected,
        tokens=tokens,
        padded_tokens=padded,
        padding_efficiency=round(tokens / padded, 4) if padded else 1.0,
        seconds=round(seconds, 2),
        tokens_per_second=round(tokens / seconds, 1) if seconds else 0.0,
        table_version=version,
    )


def _write_rejects(spark: SparkSession, table: TableRef, checked: DataFrame, run_id: str) -> int:
    """Quarantine rows that cannot be embedded in `<output>_rejects`, with the reason."""
    stats = Observation("rejected")
    rejects = (checked.where(F.col("reject_reason").isNotNull())
               .observe(stats, F.count(F.lit(1)).alias("rejected"))
               .select("doc_id", F.col("reject_reason").alias("reason"),
                       F.substring("text", 1, 1000).alias("text_prefix"),
                       F.lit(run_id).alias("run_id"),
                       F.current_timestamp().alias("rejected_at")))
    rejects_table = table.sibling("_rejects")
    rejects_table.write(rejects, "append")
    count = int(stats.get.get("rejected") or 0)
    if count:
        log.warning("run %s: %d rows rejected, see %s", run_id, count, rejects_table.location)
    return count

"""Embedding and writing: wave after wave for incremental runs (each wave one commit, the next
embedding while this one commits), one commit for overwrite and append runs."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager, suppress

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from pipeline.errors import worker_errors
from pipeline.run.failures import interrupt_spark_jobs
from pipeline.run.plan import Wave, plan_waves
from pipeline.run.state import ChunkTotals, Run
from pipeline.schema import ACCOUNT_COLUMNS, CHUNK_DDL, VECTOR_COLUMNS
from pipeline.spark.udf import WorkerSpec, chunk_and_embed, load_model_in_worker, worker_spec
from pipeline.store.delta import (
    append_documents,
    delete_documents,
    drop_overlapping_rows,
    foreign_commits_since,
    merge_documents,
    relabels,
    replace_vectors,
    with_commit_retries,
    write_vectors,
)
from pipeline.store.runs import write_rejects

log = logging.getLogger("pipeline.embed")


def embed_documents(docs: DataFrame, worker: WorkerSpec, partitions: int) -> DataFrame:
    """Documents (doc_id, text, content_hash) -> chunk rows with vectors."""
    return (docs.select("doc_id", "text", "content_hash").repartition(partitions)
            .mapInArrow(chunk_and_embed(worker), CHUNK_DDL))


@contextmanager
def released(frame: DataFrame) -> Iterator[DataFrame]:
    """Unpersist a frame when done. Not after an interrupt: its Py4J connection then holds a
    stale answer and would wait for the interrupted Spark action (the process is ending)."""
    interrupted = False
    try:
        yield frame
    except BaseException as error:
        interrupted = not isinstance(error, Exception)
        raise
    finally:
        if not interrupted:
            frame.unpersist()


@contextmanager
def warming_workers(run: Run) -> Iterator[None]:
    """Start the Python workers and load the model on the executors while the driver plans,
    then wait for them, so the first wave finds the model resident; a plan with nothing to
    embed stops them instead. A warm-up that fails is only logged (the embedding itself then
    reports the problem)."""
    worker = worker_spec(run.settings, run.spec)
    warm = (run.spark.range(0, run.partitions, 1, run.partitions)
            .mapInArrow(load_model_in_worker(worker), "loaded long"))
    thread = threading.Thread(target=_warm, args=(run, warm), name=f"warm-{run.run_id}")
    thread.start()
    try:
        yield
        if not run.plan.to_embed:
            interrupt_spark_jobs(run.spark, _job_tag(run, "warm"))
    finally:
        thread.join()


def _warm(run: Run, warm: DataFrame) -> None:
    started = time.perf_counter()
    try:
        with _tagged(run, "warm"):
            warm.collect()
        log.info("run %s: workers ready in %.1fs", run.run_id, time.perf_counter() - started)
    except Exception as error:
        log.info("run %s: warming the workers stopped: %r", run.run_id, error)


def _job_tag(run: Run, step: str) -> str:
    return f"{run.run_id}-{step}"


@contextmanager
def _tagged(run: Run, step: str) -> Iterator[None]:
    """The Spark jobs this thread starts meanwhile carry the step's tag (tags are per thread),
    so interrupt_spark_jobs can stop them alone."""
    run.spark.addTag(_job_tag(run, step))
    try:
        yield
    finally:
        run.spark.removeTag(_job_tag(run, step))


def write_in_one_commit(run: Run, docs: DataFrame, properties: dict[str, str]
                        ) -> tuple[int, ChunkTotals]:
    """Overwrite or append mode. The vectors are materialised on the executors first and
    counted there (observed metrics do not arrive over Spark Connect, nor from the nested plan
    of an overwrite with another model, which replaces rows and properties together)."""
    mode = run.settings.output.mode
    stored = run.table.properties(run.spark)
    relabel = relabels(stored, properties)
    with worker_errors():
        materialized = _materialized(observed_chunks(run, docs))
    with released(materialized) as chunks:
        totals = _observed_totals(chunks)
        vectors = quarantine_refused(run, chunks, totals).select(*VECTOR_COLUMNS)
        if mode == "overwrite" and relabel:
            version = replace_vectors(run.spark, run.table, vectors, properties, stored)
        else:
            version = write_vectors(run.spark, run.table, vectors, mode,
                                    properties if relabel else None)
    return version, totals


def embed_in_waves(run: Run, planned: DataFrame) -> None:
    """Embed and commit wave after wave, each wave one commit, in order; the next wave embeds
    while this one commits. Missing documents are deleted in the last MERGE wave's commit (or
    in a commit of their own when there is none)."""
    plan, retries = run.plan, run.settings.output.commit_retries
    deleted = (planned.where(F.col("status") == "deleted").select("doc_id")
               if plan.delete_missing and plan.deleted else None)
    waves = plan_waves(run, planned)
    merges = [wave for wave in waves if wave.kind == "merge"]
    own_tags: set[str] = set()
    with closing(embedded_waves(run, waves)) as embedded:
        for wave, embedded_chunks, totals, embed_seconds in embedded:
            committing = run.elapsed
            tag = f"{run.run_id}:{wave.tag}"
            chunks = quarantine_refused(run, embedded_chunks, totals)
            if wave.kind == "append" and not totals.chunks:
                log.info("run %s: wave %d/%d has nothing to commit (every document refused)",
                         run.run_id, wave.number, wave.of)
            elif wave.kind == "append" and run.blind_appends and not foreign_commits_since(
                    run.spark, run.table, run.planned_at, own_tags):
                _append_wave(run, chunks, tag, own_tags)
            else:
                ids = wave.docs.select("doc_id")
                if totals.refused:  # a refused document keeps its stored chunks
                    ids = ids.join(embedded_chunks.where(F.col("refusal").isNotNull())
                                   .select("doc_id"), "doc_id", "left_anti")
                if deleted is not None and merges and wave is merges[-1]:
                    ids = ids.unionByName(deleted)
                with_commit_retries(
                    lambda c=chunks, i=ids, t=tag: merge_documents(run.spark, run.table, c, i, t),
                    f"wave {wave.number}/{wave.of}", retries)
            run.written.add(totals)
            _log_wave(run, wave, totals, embed_seconds, run.elapsed - committing)
    if deleted is not None and not merges:
        with_commit_retries(lambda: delete_documents(run.spark, run.table, deleted,
                                                     f"{run.run_id}:delete-missing"),
                            "deleting missing documents", retries)


def embedded_waves(run: Run, waves: list[Wave]
                   ) -> Iterator[tuple[Wave, DataFrame, ChunkTotals, float]]:
    """Each wave's materialised chunks, totals and embedding seconds, in order. While the
    caller commits one wave, the next embeds in a background thread, so the accelerator does
    not wait for commits; at most two waves' vectors are held at once. Each wave's frame is
    released after its commit; if the caller stops early, the wave still embedding is stopped
    (its Spark jobs carry a tag of their own) and released."""
    def embed(wave: Wave) -> tuple[DataFrame, ChunkTotals, float]:
        started = time.perf_counter()
        with _tagged(run, "embed"), worker_errors():
            chunks = _materialized(observed_chunks(run, wave.docs))
            return chunks, _observed_totals(chunks), time.perf_counter() - started

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"embed-{run.run_id}")
    pending = pool.submit(embed, waves[0]) if waves else None
    current: DataFrame | None = None
    try:
        for index, wave in enumerate(waves):
            current, totals, seconds = pending.result()
            pending = pool.submit(embed, waves[index + 1]) if index + 1 < len(waves) else None
            yield wave, current, totals, seconds
            current.unpersist()
            current = None
    finally:
        if pending is not None or current is not None:
            # From a thread of its own: after an interrupt this thread's Py4J connection may
            # hold a stale answer (see record_failure).
            stopper = threading.Thread(target=_stop_waves, args=(run, pending, current),
                                       name=f"stop-{run.run_id}")
            stopper.start()
            stopper.join()
        pool.shutdown(wait=False)


def _stop_waves(run: Run, pending: Future | None, current: DataFrame | None) -> None:
    """A run ending early: stop the wave embedding ahead and release what the waves made."""
    frames = [current] if current is not None else []
    if pending is not None:
        if not pending.done():
            interrupt_spark_jobs(run.spark, _job_tag(run, "embed"))
        with suppress(BaseException):  # stopped or failed: the run's error is the one to report
            frames.append(pending.result()[0])
    for frame in frames:
        try:
            frame.unpersist()
        except Exception as error:
            log.warning("could not release a wave's vectors: %r", error)


def _log_wave(run: Run, wave: Wave, totals: ChunkTotals, embed_seconds: float,
              commit_seconds: float) -> None:
    timing = {"wave": wave.number, "kind": wave.kind, "documents": totals.documents,
              "chunks": totals.chunks, "embed_seconds": round(embed_seconds, 2),
              "commit_seconds": round(commit_seconds, 2)}
    log.info("run %s: wave %d/%d committed (%s): %d documents, %d chunks (embedded in "
             "%.1fs, committed in %.1fs)", run.run_id, wave.number, wave.of, wave.kind,
             totals.documents, totals.chunks, timing["embed_seconds"],
             timing["commit_seconds"], extra={"wave_timing": timing})


def _append_wave(run: Run, chunks: DataFrame, tag: str, own_tags: set[str]) -> None:
    """A blind append, then the check that no other writer wrote these documents first."""
    retries = run.settings.output.commit_retries
    rows = chunks.select(*VECTOR_COLUMNS)
    appended_at = with_commit_retries(
        lambda: append_documents(run.spark, run.table, rows, tag), tag, retries)
    own_tags.add(tag)
    with_commit_retries(
        lambda: drop_overlapping_rows(run.spark, run.table, rows, tag, appended_at,
                                      run.planned_at, own_tags),
        f"{tag}: overlap check", retries)


def quarantine_refused(run: Run, chunks: DataFrame, totals: ChunkTotals) -> DataFrame:
    """The chunks to commit: documents an endpoint refused go to `<output>_rejects` with the
    server's message instead (a later run tries them again)."""
    if not totals.refused:
        return chunks
    refused = (chunks.where(F.col("refusal").isNotNull())
               .select("doc_id", F.col("refusal").alias("reject_reason"),
                       F.lit(None).cast("string").alias("raw_record"),
                       F.col("chunk_text").alias("text"),
                       F.lit(None).cast("string").alias("source_file")))
    write_rejects(run.spark, run.table, refused, run.run_id, totals.refused)
    return chunks.where(F.col("refusal").isNull())


def observed_chunks(run: Run, docs: DataFrame) -> DataFrame:
    """Chunk rows with provenance columns, plus the account columns (padding, an endpoint's
    refusals and retries)."""
    chunks = embed_documents(docs, worker_spec(run.settings, run.spec), run.partitions)
    return (chunks.withColumn("model_id", F.lit(run.spec.model_id))
            .withColumn("model_fingerprint", F.lit(run.spec.fingerprint))
            .withColumn("embedded_at", F.current_timestamp())
            .withColumn("run_id", F.lit(run.run_id))
            .select(*VECTOR_COLUMNS, *ACCOUNT_COLUMNS))


def _total_columns() -> list[Column]:
    return [
        F.sum(F.when(F.col("chunk_index") == 0, 1).otherwise(0)).alias("documents"),
        F.sum(F.when(F.col("refusal").isNull(), 1).otherwise(0)).alias("chunks"),
        F.sum("token_count").alias("tokens"),
        F.sum("padded_tokens").alias("padded"),
        F.sum(F.when(F.col("refusal").isNotNull(), 1).otherwise(0)).alias("refused"),
        F.sum("retries").alias("retries"),
    ]


def _totals(row) -> ChunkTotals:
    return ChunkTotals(*(int(row[name] or 0) for name in ChunkTotals.NAMES))


def _materialized(chunks: DataFrame) -> DataFrame:
    """Embed once: the MERGE reads its source more than once, and a cached plan is not always
    matched inside it, so the wave's vectors are checkpointed on the executors (memory, then
    disk). A lost executor then fails the run rather than re-embedding; a rerun resumes."""
    return chunks.localCheckpoint(eager=True)


def _observed_totals(chunks: DataFrame) -> ChunkTotals:
    """Totals of a materialised chunk frame."""
    return _totals(chunks.agg(*_total_columns()).collect()[0])

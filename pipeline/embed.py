"""One embedding run: read -> quarantine -> plan -> embed in waves -> write -> summary.

Incremental runs compare each source document's content hash with the table and embed only new
and changed documents, committing one wave of documents at a time through a Delta MERGE keyed by
(doc_id, chunk_index). A run killed at any moment leaves only whole waves behind, and the same
command run again plans what is still missing, so it finishes the work without duplicates."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from pipeline.config import InputSettings, Settings
from pipeline.model.spec import ModelSpec, resolve_model_spec
from pipeline.schema import CHUNK_DDL, VECTOR_COLUMNS, VECTOR_DDL
from pipeline.spark.io import InputError, documents, read_source
from pipeline.spark.session import default_parallelism
from pipeline.spark.udf import WorkerSpec, chunk_and_embed, load_model_in_worker, worker_spec
from pipeline.store.delta import (
    TableRef,
    append_documents,
    appends_blindly,
    check_same_model,
    delete_documents,
    drop_overlapping_rows,
    foreign_commits_since,
    keep_one_copy,
    label_missing_properties,
    merge_documents,
    prepare_table,
    relabels,
    replace_vectors,
    upgrade_advice,
    with_commit_retries,
    write_vectors,
)
from pipeline.store.runs import append_run, write_rejects

log = logging.getLogger("pipeline.embed")

DUPLICATE_FAILS = "duplicate id (input.duplicates=fail)"
# "duplicated": a document stored twice (a writer killed between its append and its overlap
# check, while another wrote the same document); one copy is kept and it is embedded again.
TO_MERGE = ("changed", "duplicated")
TO_EMBED = ("new", *TO_MERGE)


@dataclass
class RunPlan:
    """What an incremental run will do, by document."""

    documents_read: int = 0
    rejected: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    deleted: int = 0
    duplicated: int = 0  # stored more than once: one copy kept, re-embedded if in the source
    delete_missing: bool = True
    waves: int = 0

    @property
    def to_embed(self) -> int:
        return self.new + self.changed

    def to_json(self) -> str:
        return json.dumps({"dry_run": True, **asdict(self)}, sort_keys=True)


@dataclass
class RunSummary:
    run_id: str
    mode: str
    output: str
    model_id: str
    model_fingerprint: str
    dimension: int
    documents_read: int
    documents_new: int
    documents_changed: int
    documents_unchanged: int
    documents_deleted: int
    documents_embedded: int
    chunks_written: int
    rejected: int
    waves: int
    tokens: int
    padded_tokens: int
    padding_efficiency: float
    seconds: float
    tokens_per_second: float
    table_version: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class ChunkTotals:
    documents: int = 0
    chunks: int = 0
    tokens: int = 0
    padded: int = 0

    def add(self, other: ChunkTotals) -> None:
        for name in ("documents", "chunks", "tokens", "padded"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class Run:
    """The state one run carries from step to step."""

    spark: SparkSession
    settings: Settings
    table: TableRef
    spec: ModelSpec = field(init=False)  # resolved by check_inputs
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    clock: float = field(default_factory=time.perf_counter)
    plan: RunPlan = field(default_factory=RunPlan)
    written: ChunkTotals = field(default_factory=ChunkTotals)
    version: int | None = None  # the last version this run committed
    planned_at: int = -1  # the table version the plan read (-1: a table this run created)
    blind_appends: bool = False  # whether new documents are appended without a MERGE
    writing: bool = False  # past the checks and the plan: rows may have been committed

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.clock

    @property
    def partitions(self) -> int:
        return self.settings.spark.partitions or default_parallelism(self.spark)


def embed_documents(docs: DataFrame, worker: WorkerSpec, partitions: int) -> DataFrame:
    """Documents (doc_id, text, content_hash) -> chunk rows with vectors."""
    return (docs.select("doc_id", "text", "content_hash").repartition(partitions)
            .mapInArrow(chunk_and_embed(worker), CHUNK_DDL))


def run_embedding(spark: SparkSession, settings: Settings, dry_run: bool = False
                  ) -> RunSummary | RunPlan:
    """Everything is checked (source, columns, model folder, duplicate ids, model guard) before
    any embedding. Every run is recorded in `<output>_runs`; a failed one too, whether it fails
    at a check, halfway (with what its committed waves wrote) or is interrupted."""
    run = Run(spark, settings, TableRef.parse(settings.output.path))
    if dry_run:
        return dry_run_plan(run, check_inputs(run, dry_run=True))
    try:
        with released(check_inputs(run)) as flagged:
            summary = _run(run, flagged)
    except BaseException as error:
        _record_failure(run, error)
        raise
    append_run(spark, run.table, run_record(run, "succeeded", None))
    return summary


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


def check_inputs(run: Run, dry_run: bool = False) -> DataFrame:
    """The source's columns, the model folder and the source's ids, before any embedding.
    Returns every source row flagged with its reject reason."""
    source = read_source(run.spark, run.settings.input)
    run.spec = resolve_model_spec(run.settings.model)
    flagged = flag_rows(source, run.settings.input, run.run_id)
    if run.settings.input.duplicates == "fail":
        try:
            _fail_on_duplicate_ids(run, flagged, quarantine=not dry_run)
        except InputError:
            flagged.unpersist()
            raise
    return flagged


def _record_failure(run: Run, error: BaseException) -> None:
    """Record the failed run. An interrupt (SIGTERM, Ctrl-C) may land in the middle of a Py4J
    call, whose connection then holds a stale answer: stop the Spark jobs still running and
    record from a fresh thread, which gets a connection of its own."""
    def record() -> None:
        if not isinstance(error, Exception):
            interrupt_spark_jobs(run.spark)
        try:
            _count_committed(run)
            append_run(run.spark, run.table, run_record(run, "failed", repr(error)))
        except Exception as record_error:  # the original error is the one to report
            log.error("run %s failed and could not be recorded: %r", run.run_id, record_error)

    recorder = threading.Thread(target=record, name=f"record-{run.run_id}")
    recorder.start()
    recorder.join()


def interrupt_spark_jobs(spark: SparkSession, tag: str | None = None) -> None:
    """Cancel the session's running Spark actions, or those of one tag (call it from a thread
    of its own after an interrupt)."""
    try:
        spark.interruptTag(tag) if tag else spark.interruptAll()
    except Exception as error:
        log.warning("could not stop running Spark jobs: %r", error)


def _count_committed(run: Run) -> None:
    """What a failed run left in the table, read from the rows that carry its run id: exact
    even when it was stopped in the middle of a commit."""
    if not run.writing or not run.table.exists(run.spark):
        return
    row = (run.table.read(run.spark).where(F.col("run_id") == run.run_id)
           .agg(F.sum(F.when(F.col("chunk_index") == 0, 1).otherwise(0)).alias("documents"),
                F.count(F.lit(1)).alias("chunks"), F.sum("token_count").alias("tokens"))
           .collect()[0])
    if row["chunks"]:
        run.written = ChunkTotals(row["documents"], row["chunks"], int(row["tokens"]))
        run.version = run.table.version(run.spark)


def dry_run_plan(run: Run, flagged: DataFrame) -> RunPlan:
    """The plan, with the same model guard as a real run, and nothing written."""
    exists = run.table.exists(run.spark)
    if exists and run.settings.output.mode != "overwrite":
        check_same_model(run.table, run.table.properties(run.spark), table_properties(run))
    if exists:
        run.planned_at = run.table.version(run.spark)
    plan, planned = make_plan(run, flagged,
                              table_exists=exists and run.settings.output.mode == "incremental")
    planned.unpersist()
    flagged.unpersist()
    return plan


def _run(run: Run, flagged: DataFrame) -> RunSummary:
    mode = run.settings.output.mode
    properties = table_properties(run)
    existed = prepare_table(run.spark, run.table, VECTOR_DDL, mode, properties)
    incremental = mode == "incremental"
    if incremental:
        stored = run.table.properties(run.spark)  # labelling below adds only pipeline.* keys
        run.blind_appends = appends_blindly(stored)
    if existed and incremental:
        label_missing_properties(run.spark, run.table, stored, properties)
        advice = upgrade_advice(run.table, stored)
        if advice:
            log.warning(advice)
        run.planned_at = run.table.version(run.spark)
    with warming_workers(run):
        run.plan, planned = make_plan(run, flagged, table_exists=existed and incremental)
    log.info("run %s (%s) planned after %.1fs: %s", run.run_id, mode, run.elapsed,
             json.dumps(asdict(run.plan), sort_keys=True))
    write_rejects(run.spark, run.table, flagged, run.run_id, run.plan.rejected)
    run.writing = True
    if run.plan.duplicated:
        _keep_one_copy(run, planned)
    with released(planned):
        if incremental:
            embed_in_waves(run, planned)
            run.version = run.table.version(run.spark)
        else:
            run.version, totals = write_in_one_commit(
                run, planned.where(F.col("status") == "new"), properties)
            run.written.add(totals)
    return summarize(run)


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
        if run.plan is not None and not run.plan.to_embed:
            interrupt_spark_jobs(run.spark, f"{run.run_id}-warm")
    finally:
        thread.join()


def _warm(run: Run, warm: DataFrame) -> None:
    started = time.perf_counter()
    run.spark.addTag(f"{run.run_id}-warm")
    try:
        warm.collect()
        log.info("run %s: workers ready in %.1fs", run.run_id, time.perf_counter() - started)
    except Exception as error:
        log.info("run %s: warming the workers stopped: %r", run.run_id, error)
    finally:
        run.spark.removeTag(f"{run.run_id}-warm")


def write_in_one_commit(run: Run, docs: DataFrame, properties: dict[str, str]
                        ) -> tuple[int, ChunkTotals]:
    """Overwrite or append mode. The vectors are materialised on the executors first and
    counted there (observed metrics do not arrive over Spark Connect, nor from the nested plan
    of an overwrite with another model, which replaces rows and properties together)."""
    mode = run.settings.output.mode
    stored = run.table.properties(run.spark)
    relabel = relabels(stored, properties)
    with released(_materialized(observed_chunks(run, docs))) as chunks:
        totals = _observed_totals(chunks)
        vectors = chunks.select(*VECTOR_COLUMNS)
        if mode == "overwrite" and relabel:
            version = replace_vectors(run.spark, run.table, vectors, properties, stored)
        else:
            version = write_vectors(run.spark, run.table, vectors, mode,
                                    properties if relabel else None)
    return version, totals


def table_properties(run: Run) -> dict[str, str]:
    """What the table says about its rows: the model's properties, the stored format and the
    chunking (rows chunked another way would not match a clean run)."""
    chunking = run.settings.chunking
    label = "truncate" if chunking.mode == "truncate" else (
        f"window:{chunking.chunk_tokens or 'auto'}:{chunking.chunk_overlap}")
    return {**run.spec.table_properties(),
            "pipeline.vector_format": run.settings.output.vector_format,
            "pipeline.chunking": label}


def flag_rows(source: DataFrame, settings: InputSettings, run_id: str) -> DataFrame:
    """Every source row with its document text, hash and reject reason (null when valid);
    duplicate ids fail the run or, with keep_last, reject all but the last row per id.

    The persisted frame carries the run id: Spark shares cached data between equal plans, and
    a Delta scan's plan is equal at every table version, so without it a concurrent or later run
    in the same session could read this run's cached plan of an older table version."""
    docs = documents(source, settings)
    if settings.duplicates == "keep_last":
        valid = F.col("reject_reason").isNull()
        latest = Window.partitionBy("doc_id").orderBy(
            F.when(valid, 0).otherwise(1), F.col("order_key").desc_nulls_last(),
            F.col("content_hash").desc())  # ties on the order column: still one answer
        docs = docs.withColumn("reject_reason", F.when(
            valid & (F.row_number().over(latest) > 1),
            F.lit(f"duplicate id, superseded by a later {settings.order_col}"),
        ).otherwise(F.col("reject_reason")))
    return (docs.drop("order_key").withColumn("run_id", F.lit(run_id))
            .persist(StorageLevel.DISK_ONLY))


def _fail_on_duplicate_ids(run: Run, flagged: DataFrame, quarantine: bool) -> None:
    """With input.duplicates=fail, a duplicated id stops the run before anything is embedded.
    Its rows are quarantined first (not in a dry run), so the rejects table shows them all."""
    valid = flagged.where(F.col("reject_reason").isNull())
    counts = valid.groupBy("doc_id").count().where(F.col("count") > 1)
    duplicates = counts.orderBy(F.col("count").desc(), "doc_id").limit(5).collect()
    if not duplicates:
        return
    if quarantine:
        held = (valid.join(counts.select("doc_id"), "doc_id", "left_semi")
                .withColumn("reject_reason", F.lit(DUPLICATE_FAILS)))
        others = flagged.where(F.col("reject_reason").isNotNull())
        rejects = others.unionByName(held)
        write_rejects(run.spark, run.table, rejects, run.run_id, rejects.count())
    listed = ", ".join(f"{row['doc_id']!r} x{row['count']}" for row in duplicates)
    raise InputError(
        f"duplicate document ids in the source: {listed}; deduplicate the source, or set "
        "input.duplicates=keep_last with input.order_col to keep the latest row per id"
        + (f" (the rows are in {run.table.sibling('_rejects').location})" if quarantine else "")
    )


def make_plan(run: Run, flagged: DataFrame, table_exists: bool) -> tuple[RunPlan, DataFrame]:
    """Classify documents against the table: new, changed, unchanged, deleted. Returns the counts
    and the persisted plan (doc_id, text, content_hash, status); text only where it is needed.
    One pass over the table's key columns (chunk 0 of each document, at the planned version)."""
    source = flagged.where(F.col("reject_reason").isNull()).select("doc_id", "text",
                                                                   "content_hash")
    if table_exists:
        stored = (run.table.read(run.spark, run.planned_at).where(F.col("chunk_index") == 0)
                  .groupBy("doc_id")
                  .agg(F.max("content_hash").alias("stored_hash"),
                       F.count(F.lit(1)).alias("copies")))
        planned = source.join(stored, "doc_id", "full_outer").withColumn("status", _status())
    else:
        planned = source.withColumn("status", F.lit("new")).withColumn("copies", F.lit(0))
    planned = (planned.withColumn("text", F.when(F.col("status").isin(*TO_EMBED), F.col("text")))
               .withColumn("doubled", F.coalesce(F.col("copies") > 1, F.lit(False)))
               .select("doc_id", "text", "content_hash", "status", "doubled")
               .persist(StorageLevel.DISK_ONLY))
    counts: Counter[str] = Counter()
    duplicated = 0
    for row in planned.groupBy("status", "doubled").count().collect():
        counts[row["status"]] += row["count"]
        duplicated += row["count"] if row["doubled"] else 0
    rejected = flagged.where(F.col("reject_reason").isNotNull()).count()
    plan = RunPlan(
        rejected=rejected,
        new=counts.get("new", 0),
        changed=sum(counts.get(status, 0) for status in TO_MERGE),
        unchanged=counts.get("unchanged", 0),
        deleted=counts.get("deleted", 0),
        duplicated=duplicated,
        delete_missing=run.settings.output.deletes_missing(run.settings.input.snapshot),
    )
    plan.documents_read = plan.to_embed + plan.unchanged + rejected
    plan.waves = _wave_count(plan.new, run) + _wave_count(plan.changed, run)
    return plan, planned


def _wave_count(documents: int, run: Run) -> int:
    return math.ceil(documents / run.settings.output.wave_docs)


def _status() -> Column:
    return (F.when(F.col("stored_hash").isNull(), F.lit("new"))
            .when(F.col("content_hash").isNull(), F.lit("deleted"))
            .when(F.col("copies") > 1, F.lit("duplicated"))
            .when(F.col("content_hash") == F.col("stored_hash"), F.lit("unchanged"))
            .otherwise(F.lit("changed")))


def _keep_one_copy(run: Run, planned: DataFrame) -> None:
    """Documents stored twice keep one copy before the waves; those still in the source are
    embedded again, those missing from it are then deleted or kept as the snapshot says."""
    doubled = planned.where(F.col("doubled")).select("doc_id")
    log.warning("run %s: %d documents stored more than once (a writer was killed between its "
                "append and its overlap check); keeping one copy", run.run_id,
                run.plan.duplicated)
    with_commit_retries(
        lambda: keep_one_copy(run.spark, run.table, doubled, run.planned_at,
                              f"{run.run_id}:duplicates"),
        "removing second copies", run.settings.output.commit_retries)


@dataclass
class Wave:
    """One wave's documents and how they are committed."""

    number: int
    of: int
    docs: DataFrame
    kind: str  # "append": documents the plan found absent; "merge": changed ones

    @property
    def tag(self) -> str:
        return f"{self.kind}:{self.number}/{self.of}"


def plan_waves(run: Run, planned: DataFrame) -> list[Wave]:
    """New documents first, in blind-append waves (no join against the table); then changed
    documents in MERGE waves. Waves split documents by a hash of doc_id."""
    plan, waves = run.plan, []
    groups = (("append", ("new",), _wave_count(plan.new, run)),
              ("merge", TO_MERGE, _wave_count(plan.changed, run)))
    for kind, statuses, count in groups:
        for number in range(count):
            in_wave = F.pmod(F.xxhash64("doc_id"), F.lit(count)) == number
            docs = planned.where(F.col("status").isin(*statuses) & in_wave)
            waves.append(Wave(len(waves) + 1, plan.waves, docs, kind))
    return waves


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
        for wave, chunks, totals, embed_seconds in embedded:
            committing = run.elapsed
            tag = f"{run.run_id}:{wave.tag}"
            if wave.kind == "append" and run.blind_appends and not foreign_commits_since(
                    run.spark, run.table, run.planned_at, own_tags):
                _append_wave(run, chunks, tag, own_tags)
            else:
                ids = wave.docs.select("doc_id")
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
        run.spark.addTag(f"{run.run_id}-embed")
        try:
            chunks = _materialized(observed_chunks(run, wave.docs))
            return chunks, _observed_totals(chunks), time.perf_counter() - started
        finally:
            run.spark.removeTag(f"{run.run_id}-embed")

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
            # hold a stale answer (see _record_failure).
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
            interrupt_spark_jobs(run.spark, f"{run.run_id}-embed")
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


def observed_chunks(run: Run, docs: DataFrame) -> DataFrame:
    """Chunk rows with provenance columns, plus `padded_tokens` for the padding account."""
    chunks = embed_documents(docs, worker_spec(run.settings, run.spec), run.partitions)
    return (chunks.withColumn("model_id", F.lit(run.spec.model_id))
            .withColumn("model_fingerprint", F.lit(run.spec.fingerprint))
            .withColumn("embedded_at", F.current_timestamp())
            .withColumn("run_id", F.lit(run.run_id))
            .select(*VECTOR_COLUMNS, "padded_tokens"))


def _total_columns() -> list[Column]:
    return [
        F.sum(F.when(F.col("chunk_index") == 0, 1).otherwise(0)).alias("documents"),
        F.count(F.lit(1)).alias("chunks"),
        F.sum("token_count").alias("tokens"),
        F.sum("padded_tokens").alias("padded"),
    ]


def _totals(row) -> ChunkTotals:
    return ChunkTotals(*(int(row[name] or 0) for name in ("documents", "chunks", "tokens",
                                                          "padded")))


def _materialized(chunks: DataFrame) -> DataFrame:
    """Embed once: the MERGE reads its source more than once, and a cached plan is not always
    matched inside it, so the wave's vectors are checkpointed on the executors (memory, then
    disk). A lost executor then fails the run rather than re-embedding; a rerun resumes."""
    return chunks.localCheckpoint(eager=True)


def _observed_totals(chunks: DataFrame) -> ChunkTotals:
    """Totals of a materialised chunk frame."""
    return _totals(chunks.agg(*_total_columns()).collect()[0])


def summarize(run: Run) -> RunSummary:
    plan, totals, version = run.plan, run.written, run.version
    seconds = time.perf_counter() - run.clock
    return RunSummary(
        run_id=run.run_id,
        mode=run.settings.output.mode,
        output=run.table.location,
        model_id=run.spec.model_id,
        model_fingerprint=run.spec.fingerprint,
        dimension=run.spec.dimension,
        documents_read=plan.documents_read,
        documents_new=plan.new,
        documents_changed=plan.changed,
        documents_unchanged=plan.unchanged,
        documents_deleted=plan.deleted if plan.delete_missing else 0,
        documents_embedded=totals.documents,
        chunks_written=totals.chunks,
        rejected=plan.rejected,
        waves=plan.waves,
        tokens=totals.tokens,
        padded_tokens=totals.padded,
        padding_efficiency=round(totals.tokens / totals.padded, 4) if totals.padded else 1.0,
        seconds=round(seconds, 2),
        tokens_per_second=round(totals.tokens / seconds, 1) if seconds else 0.0,
        table_version=version,
    )


def run_record(run: Run, status: str, error: str | None) -> dict:
    """The run's row in `<output>_runs`; a failed run still says what it committed."""
    spec = getattr(run, "spec", None)  # unset when the model folder itself failed
    return {
        "run_id": run.run_id,
        "started_at": run.started_at,
        "ended_at": datetime.now(timezone.utc),
        "status": status,
        "mode": run.settings.output.mode,
        "plan": json.dumps(asdict(run.plan), sort_keys=True),
        "chunks_written": run.written.chunks,
        "tokens": run.written.tokens,
        "seconds": round(time.perf_counter() - run.clock, 2),
        "model_fingerprint": spec.fingerprint if spec else None,
        "config": json.dumps(run.settings.to_dict(), sort_keys=True),
        "table_version": run.version,
        "error": error,
    }

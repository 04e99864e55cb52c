"""Delta tables the pipeline writes: the vectors (one row per chunk, self-describing through
table properties) and the rejects beside them."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from delta import exceptions as delta_errors
from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipeline.errors import PipelineError
from pipeline.schema import VECTOR_COLUMNS
from pipeline.vectors import probe_agreement

log = logging.getLogger("pipeline.store")
T = TypeVar("T")
# What Delta reports while another process is half-way through creating the same table.
RACING_CREATE = re.compile(r"NON_EMPTY_LOCATION|DELTA_TABLE_NOT_FOUND")
CONFLICTS = (
    delta_errors.DeltaConcurrentModificationException, delta_errors.ConcurrentWriteException,
    delta_errors.MetadataChangedException, delta_errors.ProtocolChangedException,
    delta_errors.ConcurrentAppendException, delta_errors.ConcurrentDeleteReadException,
    delta_errors.ConcurrentDeleteDeleteException, delta_errors.ConcurrentTransactionException,
)


class ModelMismatchError(PipelineError, ValueError):
    """The table holds vectors of another model: mixing them would make scores meaningless."""


class TableNotFoundError(PipelineError, FileNotFoundError):
    """No Delta table where one was named."""


@dataclass(frozen=True)
class TableRef:
    """A Delta table by path (anything with a slash or a scheme) or by catalog name."""

    location: str

    @classmethod
    def parse(cls, location: str) -> TableRef:
        """Local paths become absolute, so the table is the same wherever Spark resolves them."""
        if ("/" in location or location.startswith(".")) and "://" not in location:
            return cls(str(Path(location).expanduser().resolve()))
        return cls(location)

    @property
    def is_path(self) -> bool:
        return "/" in self.location or ":" in self.location

    @property
    def sql_name(self) -> str:
        if self.is_path:
            return "delta.`" + self.location.replace("`", "``") + "`"
        return self.location

    def sibling(self, suffix: str) -> TableRef:
        return TableRef(self.location.rstrip("/") + suffix)

    def exists(self, spark: SparkSession) -> bool:
        """Through SQL and the DataFrame reader only, which Spark Connect serves too (Delta's
        Python `DeltaTable` API needs the Delta Connect plugin on a Connect server)."""
        if not self.is_path:
            return spark.catalog.tableExists(self.location)
        try:
            spark.read.format("delta").load(self.location).schema  # noqa: B018 (analysis only)
        except AnalysisException:
            return False
        return True

    def read(self, spark: SparkSession, version: int | None = None) -> DataFrame:
        """The table's rows (at `version`: Delta time travel), as SQL reads them."""
        travel = f" VERSION AS OF {version}" if version is not None else ""
        return spark.sql(f"SELECT * FROM {self.sql_name}{travel}")

    def version(self, spark: SparkSession) -> int:
        return int(spark.sql(f"DESCRIBE HISTORY {self.sql_name} LIMIT 1").collect()[0]["version"])

    def history(self, spark: SparkSession, after: int, newest: int | None = None
                ) -> list[Commit]:
        """The commits after version `after` (only the `newest` ones when given), oldest first.
        Reads only the newest commits of the log, more while others commit meanwhile."""
        limit = newest or max(self.version(spark) - after, 0) + 8
        while True:
            rows = (spark.sql(f"DESCRIBE HISTORY {self.sql_name} LIMIT {limit}")
                    .select("version", "operation", "userMetadata", "operationMetrics")
                    .collect())
            versions = [int(row["version"]) for row in rows]
            if newest or len(rows) < limit or min(versions) <= after + 1:
                break
            limit *= 2  # commits landed between the version read and the history read
        commits = [Commit(int(row["version"]), row["operation"], row["userMetadata"],
                          dict(row["operationMetrics"] or {})) for row in rows]
        return sorted((c for c in commits if c.version > after), key=lambda c: c.version)

    def size_bytes(self, spark: SparkSession) -> int:
        """The bytes of the table's current files (Delta's metadata: nothing is scanned)."""
        row = spark.sql(f"DESCRIBE DETAIL {self.sql_name}").select("sizeInBytes").first()
        return int(row[0] or 0) if row is not None else 0

    def properties(self, spark: SparkSession) -> dict[str, str]:
        rows = spark.sql(f"SHOW TBLPROPERTIES {self.sql_name}").collect()
        return {row["key"]: row["value"] for row in rows}

    def write(self, df: DataFrame, mode: str, tag: str | None = None,
              merge_schema: bool = False) -> None:
        """Append or overwrite; `tag` becomes the commit's userMetadata in the history;
        `merge_schema` adds columns the table lacks."""
        writer = df.write.format("delta").mode(mode)
        if tag:
            writer = writer.option("userMetadata", tag)
        if merge_schema:
            writer = writer.option("mergeSchema", "true")
        if self.is_path:
            writer.save(self.location)
        else:
            writer.saveAsTable(self.location)

    def create(self, spark: SparkSession, ddl: str, properties: dict[str, str]) -> None:
        spark.sql(f"CREATE TABLE IF NOT EXISTS {self.sql_name} ({ddl}) USING delta"
                  f"{_tblproperties(properties)}")

    def replace(self, df: DataFrame, properties: dict[str, str]) -> None:
        """Replace data, schema and properties in one commit (CREATE OR REPLACE TABLE AS
        SELECT), so no reader ever sees the new rows under the old labels."""
        writer = df.writeTo(self.sql_name).using("delta")
        for key, value in properties.items():
            writer = writer.tableProperty(key, value)
        writer.createOrReplace()

    def set_properties(self, spark: SparkSession, properties: dict[str, str]) -> None:
        spark.sql(f"ALTER TABLE {self.sql_name} SET{_tblproperties(properties)}")


@dataclass(frozen=True)
class Commit:
    """One entry of a table's history."""

    version: int
    operation: str
    user_metadata: str | None
    metrics: dict[str, str]


def _tblproperties(properties: dict[str, str]) -> str:
    if not properties:
        return ""
    assignments = ", ".join(f"'{k}' = '{_quote(v)}'" for k, v in properties.items())
    return f" TBLPROPERTIES ({assignments})"


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


# The same conflicts as Spark Connect reports them: by error class or Delta's class name.
CONFLICT_NAMES = re.compile(
    r"DELTA_CONCURRENT_|DELTA_METADATA_CHANGED|DELTA_PROTOCOL_CHANGED|Concurrent(Append|"
    r"DeleteRead|DeleteDelete|Transaction|Write)Exception|MetadataChangedException|"
    r"ProtocolChangedException|DeltaConcurrentModificationException")


def error_condition(error: Exception) -> str | None:
    """Spark's error class (getCondition in Spark 4, getErrorClass in 3.5)."""
    for name in ("getCondition", "getErrorClass"):
        method = getattr(error, name, None)
        if method is not None:
            return method()
    return None


def is_commit_conflict(error: Exception) -> bool:
    """A commit another writer won (classic Spark raises Delta's Python classes for these)."""
    if isinstance(error, CONFLICTS):
        return True
    condition = error_condition(error)
    return bool(CONFLICT_NAMES.search(f"{condition} {type(error).__name__} {error}"[:2000]))


class CommitConflictError(PipelineError, RuntimeError):
    """Another writer kept winning the race for the table; a rerun converges."""


def with_commit_retries(action: Callable[[], T], what: str, retries: int) -> T:
    """Run a Delta commit; when a concurrent writer wins, wait and try again (each try re-reads
    the table, so it merges against what the winner wrote)."""
    for attempt in range(retries + 1):
        try:
            return action()
        except Exception as error:
            if not is_commit_conflict(error):
                raise
            if attempt == retries:
                raise CommitConflictError(
                    f"{what}: another writer changed the table {retries + 1} times in a row "
                    f"({type(error).__name__}); run the job again, it resumes where it stopped"
                ) from error
            wait = 2.0 * (attempt + 1)
            log.warning("%s lost a commit race (%s); retrying in %.0fs", what,
                        type(error).__name__, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


GUARDED_PROPERTIES = ("pipeline.model_fingerprint", "pipeline.dimension",
                      "pipeline.vector_format", "pipeline.max_length", "pipeline.chunking",
                      "pipeline.endpoint_revision", "pipeline.probe_vectors")
# An endpoint's probe vectors are compared by cosine: a server's batching moves them a little.
PROBE_PROPERTY = "pipeline.probe_vectors"
PROBE_AGREEMENT = 0.99


# An overwrite with another model carries over the user's own table properties and these Delta
# settings, which are plain preferences. Other `delta.*` entries (protocol, features, column
# mapping, row tracking) are Delta's bookkeeping for the old table and are not copied.
DELTA_PREFERENCES = (
    "delta.enableChangeDataFeed", "delta.logRetentionDuration",
    "delta.deletedFileRetentionDuration", "delta.checkpointInterval", "delta.autoOptimize.",
    "delta.dataSkippingNumIndexedCols", "delta.dataSkippingStatsColumns",
    "delta.enableDeletionVectors", "delta.targetFileSize", "delta.tuneFileSizesForRewrites",
)

# What a query must share with the table's vectors to be compared with them.
VECTOR_PROPERTIES = ("pipeline.model_fingerprint", "pipeline.dimension", "pipeline.vector_format",
                     "pipeline.endpoint_revision", PROBE_PROPERTY)


def check_same_model(table: TableRef, stored: dict[str, str], wanted: dict[str, str],
                     keys: tuple[str, ...] = GUARDED_PROPERTIES) -> None:
    """Refuse to add rows made another way (model, dimension, format, max length, chunking) to
    a table, or to a table this pipeline did not make; the error lists every difference.
    Readers pass VECTOR_PROPERTIES: a query may be cut at another max length."""
    if "pipeline.model_fingerprint" not in stored:
        raise ModelMismatchError(
            f"{table.location} exists but records no pipeline.model_fingerprint, so this "
            "pipeline did not make it; write to a new table, or replace this one with "
            "--mode overwrite"
        )
    differences = [f"{key}={stored[key]} (this run: {wanted[key]})" for key in keys
                   if key in stored and key in wanted and key != PROBE_PROPERTY
                   and stored[key] != wanted[key]]
    if PROBE_PROPERTY in keys and PROBE_PROPERTY in stored and PROBE_PROPERTY in wanted:
        agreement = probe_agreement(stored[PROBE_PROPERTY], wanted[PROBE_PROPERTY])
        if agreement < PROBE_AGREEMENT:
            differences.append(
                f"other vectors for the probe texts (cosine {agreement:.3f} with the table's, "
                f"below {PROBE_AGREEMENT}): the endpoint serves another model or revision "
                f"under the name {wanted.get('pipeline.endpoint_model')}")
    if differences:
        raise ModelMismatchError(
            f"{table.location} holds vectors of model {stored.get('pipeline.model_id')} made "
            f"with {', '.join(differences)}; this run uses model {wanted['pipeline.model_id']}. "
            "Write to a new table, or replace this one with --mode overwrite"
        )


# What tables the pipeline creates get: a MERGE or DELETE then marks replaced rows in a deletion
# vector instead of rewriting every file that holds one (delta-spark 3.1+); and Serializable
# isolation, under which a MERGE conflicts with a concurrent blind append of rows it should have
# read (WriteSerializable lets both commit), so new documents can be appended blindly.
CREATION_PROPERTIES = {"delta.enableDeletionVectors": "true",
                       "delta.isolationLevel": "Serializable"}


def prepare_table(spark: SparkSession, table: TableRef, ddl: str, mode: str,
                  properties: dict[str, str]) -> bool:
    """Create the vectors table with its model properties if missing; then check that it holds
    the same model (unless it is to be overwritten: another process may have created it in
    the meantime). True when it already existed."""
    existed = table.exists(spark)
    if not existed:
        with_commit_retries(
            lambda: _create_unless_racing(spark, table, ddl,
                                          {**CREATION_PROPERTIES, **properties}),
            f"creating {table.location}", retries=3)
    if mode != "overwrite":
        check_same_model(table, table.properties(spark), properties)
    return existed


def appends_blindly(stored: dict[str, str]) -> bool:
    """Whether new documents may be appended without a MERGE: only under Serializable
    isolation (see CREATION_PROPERTIES); other tables insert them by MERGE, as before."""
    return stored.get("delta.isolationLevel") == "Serializable"


def upgrade_advice(table: TableRef, stored: dict[str, str]) -> str | None:
    """For a table made without CREATION_PROPERTIES: what each incremental write costs, and the
    one command that upgrades it (deletion vectors are a protocol upgrade, so the user's
    decision, not ours)."""
    missing = {key: value for key, value in CREATION_PROPERTIES.items()
               if stored.get(key, "").lower() != value.lower()}
    if not missing:
        return None
    assignments = ", ".join(f"'{key}' = '{value}'" for key, value in missing.items())
    return (f"{table.location} lacks {', '.join(missing)}: every MERGE rewrites each file that "
            "holds a changed row, and new documents are inserted by MERGE, which joins the whole "
            "table. Upgrade it once with this SQL (readers then need delta-spark 2.3+, "
            "Databricks Runtime 12.2+, or delta-rs through DataFusion): "
            f"ALTER TABLE {table.sql_name} SET TBLPROPERTIES ({assignments})")


def _create_unless_racing(spark: SparkSession, table: TableRef, ddl: str,
                          properties: dict[str, str]) -> None:
    """Create the table. A concurrent creator leaves a `_delta_log` without a first commit for a
    moment, which Delta reports as a non-empty location or a missing table (or, for CREATE TABLE
    IF NOT EXISTS, takes for a table); wait for that commit instead of failing."""
    for attempt in range(10):
        try:
            table.create(spark, ddl, properties)
        except AnalysisException as error:
            if not RACING_CREATE.search(str(error_condition(error))) or attempt == 9:
                raise
        if table.exists(spark):
            return
        time.sleep(1.0)
    raise RuntimeError(f"{table.location}: another writer's creation of the table never "
                       "committed; remove its _delta_log folder if nothing writes it")


def write_vectors(spark: SparkSession, table: TableRef, df: DataFrame, mode: str,
                  relabel_to: dict[str, str] | None = None) -> int:
    """Overwrite or append chunk rows in one commit into a table prepare_table made or
    checked; then set `relabel_to`, properties the guard let change. Returns the version."""
    table.write(df, mode)
    if relabel_to:
        table.set_properties(spark, relabel_to)
    return table.version(spark)


def label_missing_properties(spark: SparkSession, table: TableRef, stored: dict[str, str],
                             properties: dict[str, str]) -> None:
    """Add the properties a table made by an older version of the pipeline lacks (the guard
    passed, so the rows were made this way), so that later runs are guarded on them too."""
    missing = {key: value for key, value in properties.items() if key not in stored}
    if missing:
        table.set_properties(spark, missing)


def relabels(stored: dict[str, str], properties: dict[str, str]) -> bool:
    """Whether writing under these properties changes what the table says (an endpoint's probe
    vectors move a little from run to run: check_same_model compares them by cosine)."""
    return any(stored.get(key) != value for key, value in properties.items()
               if not (key == PROBE_PROPERTY and key in stored))


def replace_vectors(spark: SparkSession, table: TableRef, df: DataFrame,
                    properties: dict[str, str], stored: dict[str, str]) -> int:
    """Replace the rows and the model properties in one commit, for an overwrite with another
    model or format: no reader ever sees new vectors under the old labels. Properties the
    user set are kept. Returns the version."""
    kept = {key: value for key, value in stored.items()
            if key.startswith(DELTA_PREFERENCES)
            or not key.startswith(("delta.", "option.", "pipeline."))}
    table.replace(df, {**kept, **properties})
    return table.version(spark)


# --- incremental writes ----------------------------------------------------------------------

KEY = "t.doc_id = s.doc_id AND t.chunk_index = s.chunk_index"
USER_METADATA_CONF = "spark.databricks.delta.commitInfo.userMetadata"
# Commits that add no rows: they cannot have written a document an append wave also writes.
NO_NEW_ROWS = frozenset({"OPTIMIZE", "SET TBLPROPERTIES", "UNSET TBLPROPERTIES", "DELETE",
                         "VACUUM START", "VACUUM END", "REORG", "CREATE TABLE"})
# The metric that counts the rows a commit added, by operation (a MERGE's updates add no key).
ROWS_ADDED = {"WRITE": "numOutputRows", "MERGE": "numTargetRowsInserted",
              "UPDATE": None, "STREAMING UPDATE": "numOutputRows"}


@contextmanager
def temp_view(frame: DataFrame) -> Iterator[str]:
    """A uniquely named temporary view of `frame`, for SQL statements (MERGE INTO)."""
    name = f"pipeline_source_{uuid.uuid4().hex[:12]}"
    frame.createOrReplaceTempView(name)
    try:
        yield name
    finally:
        frame.sparkSession.catalog.dropTempView(name)


@contextmanager
def commit_tag(spark: SparkSession, tag: str) -> Iterator[None]:
    """Label the SQL commits made inside with `tag` (the history's userMetadata), for people
    reading the history. A session setting: runs sharing one session in threads may label each
    other's commits, so nothing decides by these labels (appends carry theirs as a write
    option). Not restored after an interrupt, whose Py4J connection holds a stale answer."""
    previous = spark.conf.get(USER_METADATA_CONF, None)
    spark.conf.set(USER_METADATA_CONF, tag)
    try:
        yield
    except Exception:
        _set_conf(spark, USER_METADATA_CONF, previous)
        raise
    _set_conf(spark, USER_METADATA_CONF, previous)


def _set_conf(spark: SparkSession, key: str, value: str | None) -> None:
    if value is None:
        spark.conf.unset(key)
    else:
        spark.conf.set(key, value)


def merge_documents(spark: SparkSession, table: TableRef, chunks: DataFrame,
                    doc_ids: DataFrame, tag: str) -> None:
    """Replace every listed document's chunks in one commit: upsert the new chunk rows by
    (doc_id, chunk_index) and delete the document's other chunks, so a document whose chunk
    count shrank keeps none of its old tail. A listed document without chunks is deleted.
    With deletion vectors, replaced rows are marked, not copied with their files."""
    current = table.read(spark).select("doc_id", "chunk_index").distinct()
    stale = (current.join(doc_ids, "doc_id", "left_semi")
             .join(chunks.select("doc_id", "chunk_index"), ["doc_id", "chunk_index"],
                   "left_anti")
             .withColumn("_delete", F.lit(True)))
    source = (chunks.withColumn("_delete", F.lit(False))
              .unionByName(stale, allowMissingColumns=True))
    updates = ", ".join(f"{name} = s.{name}" for name in VECTOR_COLUMNS)
    values = ", ".join(f"s.{name}" for name in VECTOR_COLUMNS)
    with temp_view(source) as view, commit_tag(spark, tag):
        spark.sql(f"MERGE INTO {table.sql_name} t USING {view} s ON {KEY} "
                  "WHEN MATCHED AND s._delete THEN DELETE "
                  f"WHEN MATCHED THEN UPDATE SET {updates} "
                  f"WHEN NOT MATCHED AND NOT s._delete THEN INSERT ({', '.join(VECTOR_COLUMNS)}) "
                  f"VALUES ({values})")


def delete_documents(spark: SparkSession, table: TableRef, doc_ids: DataFrame, tag: str,
                     only_run: str | None = None) -> None:
    """Delete every chunk of the listed documents (only those a given run wrote, with
    `only_run`) in one commit."""
    condition = "t.doc_id = s.doc_id" + (f" AND t.run_id = '{_quote(only_run)}'"
                                         if only_run else "")
    with temp_view(doc_ids.select("doc_id").distinct()) as view, commit_tag(spark, tag):
        spark.sql(f"MERGE INTO {table.sql_name} t USING {view} s ON {condition} "
                  "WHEN MATCHED THEN DELETE")


def keep_one_copy(spark: SparkSession, table: TableRef, doubled: DataFrame, version: int,
                  tag: str) -> None:
    """Documents stored more than once (by two writers, one killed between its append and its
    overlap check): keep the rows of one run per document (each run wrote whole documents),
    chosen the same way by every reader of `version`, and delete the others in one commit."""
    keep = (table.read(spark, version).where(F.col("chunk_index") == 0)
            .join(doubled.select("doc_id"), "doc_id", "left_semi")
            .groupBy("doc_id").agg(F.max("run_id").alias("keep")))
    with temp_view(keep) as view, commit_tag(spark, tag):
        spark.sql(f"MERGE INTO {table.sql_name} t USING {view} s "
                  "ON t.doc_id = s.doc_id AND NOT (t.run_id <=> s.keep) WHEN MATCHED THEN DELETE")


def append_documents(spark: SparkSession, table: TableRef, chunks: DataFrame, tag: str) -> int:
    """Insert chunks of documents the plan found absent: a blind append, which reads nothing
    of the table. Returns the version it committed (found by its tag)."""
    table.write(chunks, "append", tag=tag)
    for newest in (64, None):  # the newest commits first; the whole log if others piled on
        found = [c.version for c in table.history(spark, -1, newest=newest)
                 if c.user_metadata == tag]
        if found:
            return found[-1]
    raise RuntimeError(f"{table.location}: the append tagged {tag} is not in the history")


def drop_overlapping_rows(spark: SparkSession, table: TableRef, chunks: DataFrame, tag: str,
                          appended_at: int, planned_at: int, own_tags: set[str]) -> int:
    """A blind append does not conflict with a concurrent writer that added the same documents.
    So after it, if anything but this run's own appends committed between the plan's version
    and the append, this run's rows of documents another writer had already written are deleted
    (that writer's rows stay): of any writers appending one document, the earliest commit wins,
    and no key is doubled. Returns how many documents were handed over."""
    between = [c for c in table.history(spark, planned_at) if c.version < appended_at]
    if not any(_adds_rows(c, own_tags) for c in between):
        return 0
    run_id = tag.split(":")[0]
    others = (table.read(spark, appended_at - 1).where(F.col("run_id") != run_id)
              .select("doc_id").distinct()
              .join(chunks.select("doc_id").distinct(), "doc_id", "left_semi")).persist()
    try:
        count = others.count()
        if count:
            log.warning("%s: %d documents were written by another writer first; removing this "
                        "run's rows of them", tag, count)
            delete_documents(spark, table, others, f"{tag}:overlap", only_run=run_id)
        return count
    finally:
        others.unpersist()


def foreign_commits_since(spark: SparkSession, table: TableRef, version: int,
                          own_tags: set[str]) -> bool:
    """Whether another writer has committed rows since `version` (a run's own appends and
    commits that add no rows do not count)."""
    return any(_adds_rows(c, own_tags) for c in table.history(spark, version))


def _adds_rows(commit: Commit, own_tags: set[str]) -> bool:
    """Whether a commit may have added rows another run's append also holds: not this run's own
    appends (tagged by write option), nor commits that add none; by their metrics where known."""
    if commit.user_metadata in own_tags or commit.operation in NO_NEW_ROWS:
        return False
    metric = ROWS_ADDED.get(commit.operation, "unknown")
    if metric == "unknown":
        return True
    return metric is not None and int(commit.metrics.get(metric, "1") or 1) > 0

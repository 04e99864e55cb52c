"""Delta tables the pipeline writes: the vectors (one row per chunk, self-describing through
table properties) and the rejects beside them."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from delta import exceptions as delta_errors
from delta.tables import DeltaTable
from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

VECTOR_DDL = (
    "doc_id string, chunk_index int, chunk_text string, char_start int, char_end int, "
    "token_count int, embedding array<float>, embedding_packed binary, embedding_scale float, "
    "content_hash string, model_id string, "
    "model_fingerprint string, embedded_at timestamp, run_id string"
)
VECTOR_COLUMNS = tuple(part.split()[0] for part in VECTOR_DDL.split(", "))


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


class ModelMismatchError(ValueError):
    """The table holds vectors of another model: mixing them would make scores meaningless."""


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
        return f"delta.`{self.location}`" if self.is_path else self.location

    def sibling(self, suffix: str) -> TableRef:
        return TableRef(self.location.rstrip("/") + suffix)

    def exists(self, spark: SparkSession) -> bool:
        if self.is_path:
            return DeltaTable.isDeltaTable(spark, self.location)
        return spark.catalog.tableExists(self.location)

    def delta(self, spark: SparkSession) -> DeltaTable:
        if self.is_path:
            return DeltaTable.forPath(spark, self.location)
        return DeltaTable.forName(spark, self.location)

    def read(self, spark: SparkSession) -> DataFrame:
        """The table's rows through the DataFrame reader (works over Spark Connect too)."""
        if self.is_path:
            return spark.read.format("delta").load(self.location)
        return spark.read.table(self.location)

    def version(self, spark: SparkSession) -> int:
        return int(self.delta(spark).history(1).collect()[0]["version"])

    def properties(self, spark: SparkSession) -> dict[str, str]:
        rows = spark.sql(f"SHOW TBLPROPERTIES {self.sql_name}").collect()
        return {row["key"]: row["value"] for row in rows}

    def write(self, df: DataFrame, mode: str) -> None:
        writer = df.write.format("delta").mode(mode)
        if self.is_path:
            writer.save(self.location)
        else:
            writer.saveAsTable(self.location)

    def create(self, spark: SparkSession, df: DataFrame, properties: dict[str, str]) -> None:
        builder = DeltaTable.createIfNotExists(spark).addColumns(df.schema)
        builder = builder.location(self.location) if self.is_path else builder.tableName(
            self.location)
        for key, value in properties.items():
            builder = builder.property(key, value)
        builder.execute()

    def replace(self, df: DataFrame, properties: dict[str, str]) -> None:
        """Replace data, schema and properties in one commit (CREATE OR REPLACE TABLE AS
        SELECT), so no reader ever sees the new rows under the old labels."""
        writer = df.writeTo(self.sql_name).using("delta")
        for key, value in properties.items():
            writer = writer.tableProperty(key, value)
        writer.createOrReplace()

    def set_properties(self, spark: SparkSession, properties: dict[str, str]) -> None:
        assignments = ", ".join(f"'{k}' = '{_quote(v)}'" for k, v in properties.items())
        spark.sql(f"ALTER TABLE {self.sql_name} SET TBLPROPERTIES ({assignments})")


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


class CommitConflictError(RuntimeError):
    """Another writer kept winning the race for the table; a rerun converges."""


def with_commit_retries(action: Callable[[], T], what: str, retries: int) -> T:
    """Run a Delta commit; when a concurrent writer wins, wait and try again (each try re-reads
    the table, so it merges against what the winner wrote)."""
    for attempt in range(retries + 1):
        try:
            return action()
        except CONFLICTS as error:
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
                      "pipeline.vector_format", "pipeline.max_length", "pipeline.chunking")


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
VECTOR_PROPERTIES = ("pipeline.model_fingerprint", "pipeline.dimension", "pipeline.vector_format")


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
                   if key in stored and key in wanted and stored[key] != wanted[key]]
    if differences:
        raise ModelMismatchError(
            f"{table.location} holds vectors of model {stored.get('pipeline.model_id')} made "
            f"with {', '.join(differences)}; this run uses model {wanted['pipeline.model_id']}. "
            "Write to a new table, or replace this one with --mode overwrite"
        )


def prepare_table(spark: SparkSession, table: TableRef, schema_df: DataFrame, mode: str,
                  properties: dict[str, str]) -> bool:
    """Create the vectors table with its model properties if missing, else check that it holds
    the same model (unless it is to be overwritten). True when it already existed."""
    if not table.exists(spark):
        with_commit_retries(lambda: _create_unless_racing(spark, table, schema_df, properties),
                            f"creating {table.location}", retries=3)
        return False
    if mode != "overwrite":
        check_same_model(table, table.properties(spark), properties)
    return True


def _create_unless_racing(spark: SparkSession, table: TableRef, schema_df: DataFrame,
                          properties: dict[str, str]) -> None:
    """Create the table. A concurrent creator leaves a `_delta_log` without a first commit for a
    moment, which Delta reports as a non-empty location or a missing table; wait for that
    commit instead of failing."""
    for attempt in range(5):
        try:
            table.create(spark, schema_df, properties)
            return
        except AnalysisException as error:
            if not RACING_CREATE.search(str(error.getCondition())) or attempt == 4:
                raise
            time.sleep(1.0)
            if table.exists(spark):
                return


def write_vectors(spark: SparkSession, table: TableRef, df: DataFrame, mode: str,
                  relabel_to: dict[str, str] | None = None) -> int:
    """Overwrite or append chunk rows in one commit into a table prepare_table made or
    checked; then set `relabel_to`, properties the guard let change. Returns the version."""
    table.write(df, mode)
    if relabel_to:
        table.set_properties(spark, relabel_to)
    return table.version(spark)


def label_missing_properties(spark: SparkSession, table: TableRef,
                             properties: dict[str, str]) -> None:
    """Add the properties a table made by an older version of the pipeline lacks (the guard
    passed, so the rows were made this way), so that later runs are guarded on them too."""
    stored = table.properties(spark)
    missing = {key: value for key, value in properties.items() if key not in stored}
    if missing:
        table.set_properties(spark, missing)


def relabels(stored: dict[str, str], properties: dict[str, str]) -> bool:
    """Whether writing under these properties changes what the table says."""
    return any(stored.get(key) != value for key, value in properties.items())


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


def merge_documents(spark: SparkSession, table: TableRef, chunks: DataFrame,
                    doc_ids: DataFrame) -> None:
    """Replace every listed document's chunks in one commit: upsert the new chunk rows by
    (doc_id, chunk_index) and delete the document's other chunks, so a document whose chunk
    count shrank keeps none of its old tail. A listed document without chunks is deleted."""
    current = table.delta(spark).toDF().select("doc_id", "chunk_index")
    stale = (current.join(doc_ids, "doc_id", "left_semi")
             .join(chunks.select("doc_id", "chunk_index"), ["doc_id", "chunk_index"],
                   "left_anti")
             .withColumn("_delete", F.lit(True)))
    source = (chunks.withColumn("_delete", F.lit(False))
              .unionByName(stale, allowMissingColumns=True))
    columns = {name: f"s.{name}" for name in VECTOR_COLUMNS}
    (table.delta(spark).alias("t")
     .merge(source.alias("s"), "t.doc_id = s.doc_id AND t.chunk_index = s.chunk_index")
     .whenMatchedDelete("s._delete")
     .whenMatchedUpdate(set=columns)
     .whenNotMatchedInsert(condition="NOT s._delete", values=columns)
     .execute())


def delete_documents(spark: SparkSession, table: TableRef, doc_ids: DataFrame) -> None:
    """Delete every chunk of the listed documents in one commit."""
    (table.delta(spark).alias("t").merge(doc_ids.alias("s"), "t.doc_id = s.doc_id")
     .whenMatchedDelete().execute())

"""Delta tables the pipeline writes: the vectors (one row per chunk, self-describing through
table properties) and the rejects beside them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession

VECTOR_COLUMNS = (
    "doc_id", "chunk_index", "chunk_text", "char_start", "char_end", "token_count", "embedding",
    "content_hash", "model_id", "model_fingerprint", "embedded_at", "run_id",
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

    def set_properties(self, spark: SparkSession, properties: dict[str, str]) -> None:
        assignments = ", ".join(f"'{k}' = '{_quote(v)}'" for k, v in properties.items())
        spark.sql(f"ALTER TABLE {self.sql_name} SET TBLPROPERTIES ({assignments})")


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def check_same_model(table: TableRef, stored: dict[str, str], wanted: dict[str, str]) -> None:
    """Refuse to add vectors of another model or dimension to a table."""
    for key in ("pipeline.model_fingerprint", "pipeline.dimension"):
        if key in stored and stored[key] != wanted[key]:
            raise ModelMismatchError(
                f"{table.location} holds vectors with {key}={stored[key]} "
                f"(model {stored.get('pipeline.model_id')}), this run makes {key}={wanted[key]} "
                f"(model {wanted['pipeline.model_id']}); write to a new table, or replace this "
                "one with --mode overwrite"
            )


def write_vectors(spark: SparkSession, table: TableRef, df: DataFrame, mode: str,
                  properties: dict[str, str]) -> int:
    """Write chunk rows; the table records the model in its properties. Returns the version."""
    if not table.exists(spark):
        table.create(spark, df, properties)
    elif mode == "append":
        check_same_model(table, table.properties(spark), properties)
    table.write(df, mode)
    stored = table.properties(spark)
    if any(stored.get(key) != value for key, value in properties.items()):
        table.set_properties(spark, properties)
    return table.version(spark)

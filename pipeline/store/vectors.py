"""Reading the vectors table: its rows and properties, and its vectors decoded to
array<float> whatever the stored format (for clustering and index export)."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipeline.store.delta import TableNotFoundError, TableRef
from pipeline.vectors import batch_matrix, vectors_to_arrow

STORED_COLUMNS = {"float32": ("embedding",), "float16": ("embedding_packed",),
                  "int8": ("embedding_packed", "embedding_scale"),
                  "binary": ("embedding_packed",)}

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
    try:
        frame = table.read(spark)
        frame.columns  # noqa: B018 (analysis, which Spark Connect defers)
    except AnalysisException as error:
        raise TableNotFoundError(f"no Delta table at {table.location}") from error
    return frame, table.properties(spark)

"""The one definition of a chunk row: what the embedding task writes (Arrow), and the vectors
table's columns (the same, less the padding account, plus provenance). Spark DDL and column
lists derive from these."""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa

CHUNK_SCHEMA = pa.schema([
    ("doc_id", pa.string()),
    ("chunk_index", pa.int32()),
    ("chunk_text", pa.string()),
    ("char_start", pa.int32()),
    ("char_end", pa.int32()),
    ("token_count", pa.int32()),
    ("padded_tokens", pa.int32()),  # the padding account: counted, not stored
    ("embedding", pa.list_(pa.float32())),
    ("embedding_packed", pa.binary()),
    ("embedding_scale", pa.float32()),
    ("content_hash", pa.string()),
    # An endpoint's account, counted, not stored: a refused document's one row (chunk_index
    # -1) holds the server's message, and a slice's first row the retries its requests took.
    ("refusal", pa.string()),
    ("retries", pa.int32()),
])
ACCOUNT_COLUMNS = ("padded_tokens", "refusal", "retries")
PROVENANCE = [
    ("model_id", pa.string()),
    ("model_fingerprint", pa.string()),
    ("embedded_at", pa.timestamp("us", tz="UTC")),
    ("run_id", pa.string()),
]
VECTOR_SCHEMA = pa.schema([field for field in CHUNK_SCHEMA if field.name not in ACCOUNT_COLUMNS]
                          + [pa.field(name, kind) for name, kind in PROVENANCE])

_SPARK_TYPES = {pa.string(): "string", pa.int32(): "int", pa.int64(): "bigint",
                pa.float32(): "float", pa.float64(): "double", pa.binary(): "binary",
                pa.list_(pa.float32()): "array<float>", pa.timestamp("us", tz="UTC"): "timestamp"}


def ddl(schema: pa.Schema, names: Iterable[str] | None = None) -> str:
    """Spark DDL of the schema's fields (of `names` only, in that order, when given)."""
    fields = [schema.field(name) for name in names] if names is not None else list(schema)
    return ", ".join(f"{field.name} {_SPARK_TYPES[field.type]}" for field in fields)


CHUNK_DDL = ddl(CHUNK_SCHEMA)
VECTOR_DDL = ddl(VECTOR_SCHEMA)
VECTOR_COLUMNS = tuple(VECTOR_SCHEMA.names)

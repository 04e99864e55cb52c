"""Reading sources: Delta, Parquet, JSONL, CSV or a catalog table, with errors that name the
problem before any model is loaded."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StringType

from pipeline.config import InputSettings
from pipeline.errors import InputError

log = logging.getLogger("pipeline.spark.io")

BUILTIN_PREFIX = "builtin:"
TABLE_PREFIX = "table:"
CORRUPT_RECORD = "_corrupt_record"  # Spark's column for JSON and CSV lines it cannot parse
SOURCE_FILE = "_source_file"  # added by read_source to a file source: the file of each row
SUFFIX_FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}


def resolve_input_path(path: str) -> str:
    """`builtin:NAME` names a corpus shipped inside the package (`builtin:sample_corpus`)."""
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX):]
        shipped = Path(__file__).resolve().parent.parent / "data" / f"{name}.jsonl"
        if not shipped.exists():
            raise InputError(f"no built-in corpus named {name!r}")
        return str(shipped)
    return path


def detect_format(path: str) -> str:
    if path.startswith(TABLE_PREFIX):
        return "table"
    local = Path(path)
    if "://" not in path and not local.exists() and _looks_like_table_name(path):
        return "table"
    if "://" not in path and not local.exists():
        parent = local.parent if str(local.parent) else Path(".")
        nearby = sorted(p.name for p in parent.iterdir())[:20] if parent.is_dir() else []
        raise InputError(f"input {path} does not exist; {parent} holds {nearby}")
    if (local / "_delta_log").is_dir():
        return "delta"
    suffix = local.suffix.lower()
    if suffix in SUFFIX_FORMATS:
        return SUFFIX_FORMATS[suffix]
    if local.is_dir():
        suffixes = {p.suffix.lower() for p in local.rglob("*") if p.is_file()}
        for known, fmt in SUFFIX_FORMATS.items():
            if known in suffixes:
                return fmt
        raise InputError(f"cannot tell the format of {path}; set input.format (--format)")
    return "delta"


def _looks_like_table_name(path: str) -> bool:
    """`schema.table` or `catalog.schema.table`, not a missing file such as `docs.jsonl`."""
    return (re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*){1,2}", path) is not None
            and Path(path).suffix.lower() not in SUFFIX_FORMATS)


def read_source(spark: SparkSession, settings: InputSettings,
                required: dict[str, str | None] | None = None) -> DataFrame:
    """The source as Spark reads it; the named columns (default: the id, text and title
    settings, see document_columns) must exist, or the error lists what does. For the default
    (a run's documents), rows read from files carry their file's path in SOURCE_FILE."""
    path = resolve_input_path(settings.path)
    fmt = detect_format(path) if settings.format == "auto" else settings.format
    try:
        df = _read(spark, path, fmt, settings.csv_options)
        columns = df.columns
    except InputError:
        raise
    except Exception as error:
        raise InputError(f"cannot read {path} as {fmt}: {read_error_reason(error)}") from error
    wanted = required if required is not None else document_columns(settings, columns, path)
    missing = [f"{key}={name!r}" for key, name in wanted.items() if name and name not in columns]
    if missing:
        hint = ("; the title is optional: --title-col '' embeds the text alone"
                if wanted.get("input.title_col") not in (None, "", *columns) else "")
        raise InputError(f"{path} ({fmt}) has no column {', '.join(missing)}; it has {columns}"
                         f"{hint}")
    if required is None and not settings.cast_columns:
        refuse_non_string_columns(df, wanted, f"{path} ({fmt})")
    if required is None and fmt != "table" and "_metadata" not in columns:
        df = df.withColumn(SOURCE_FILE, F.col("_metadata.file_path"))  # Spark's, of file sources
    return df


def document_columns(settings: InputSettings, columns: list[str], path: str) -> dict[str, str]:
    """The id, text and title columns a run reads, by setting. A title column the user named
    must exist; the profile's default is used only where the source has it."""
    wanted = {"input.id_col": settings.id_col, "input.text_col": settings.text_col}
    if settings.title_col and (settings.title_required or settings.title_col in columns):
        wanted["input.title_col"] = settings.title_col
    elif settings.title_col:
        log.info("%s has no column %r (the profile's input.title_col): embedding the text "
                 "alone", path, settings.title_col)
    return wanted


def refuse_non_string_columns(df: DataFrame, wanted: dict[str, str], source: str) -> None:
    """Ids, texts and titles are strings: a number cast to text would be embedded ("12345"), a
    number cast to an id would silently key the table by its string form."""
    types = {field.name: field.dataType for field in df.schema.fields}
    wrong = [f"{key}={name!r} is {types[name].simpleString()}" for key, name in wanted.items()
             if name and not isinstance(types[name], StringType)]
    if wrong:
        raise InputError(f"{source}: {', '.join(wrong)}, not string; set input.cast_columns=true "
                         "(--cast-columns) to cast id, text and title columns to string")


def title_column(settings: InputSettings, columns: list[str]) -> str | None:
    """The title column to embed with the text, if any (see document_columns)."""
    return settings.title_col if settings.title_col and settings.title_col in columns else None


def read_error_reason(error: Exception) -> str:
    """One line that says why a read failed. A Py4J error's own first line only names the Java
    call; the reason is the message of its deepest cause."""
    messages = []
    cause = getattr(error, "java_exception", None)
    while cause is not None:
        if cause.getMessage():
            messages.append(f"{cause.getClass().getSimpleName()}: {cause.getMessage()}")
        cause = cause.getCause()
    text = messages[-1] if messages else f"{type(error).__name__}: {error}"
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


CSV_DEFAULTS = {"header": "true", "multiLine": "true", "escape": '"'}


def _read(spark: SparkSession, path: str, fmt: str, csv_options: dict[str, str]) -> DataFrame:
    if fmt == "table":
        return spark.table(path.removeprefix(TABLE_PREFIX))
    if fmt == "jsonl":
        return spark.read.json(path)
    if fmt == "csv":
        return spark.read.options(**{**CSV_DEFAULTS, **csv_options}).csv(path)
    return spark.read.format(fmt).load(path)


# Java regex twins of pipeline.text: control characters and BOM; Unicode whitespace.
_SQL_CONTROL_CHARS = "[\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\x7f\\x{feff}]"
_SQL_EDGE_SPACE = "(?U)^\\s+|\\s+$"
_SQL_ANY_SPACE = "(?U)\\s"


def is_blank(column: Column) -> Column:
    """True for a string of Unicode whitespace only (or empty); null for null."""
    return F.regexp_replace(column, _SQL_ANY_SPACE, "") == ""


def clean_column(column: Column) -> Column:
    return F.regexp_replace(column, _SQL_CONTROL_CHARS, " ")


def document_text_column(text: Column, title: Column) -> Column:
    """pipeline.text.document_text in Spark SQL: the planner hashes the same text the workers
    embed, without a Python UDF."""
    clean = clean_column
    # Blank once cleaned: U+001C..U+001F are whitespace to Python, not to Java's (?U)\s.
    blank_title = title.isNull() | is_blank(clean(title))
    joined = F.regexp_replace(clean(F.concat(title, F.lit(" "), text)), _SQL_EDGE_SPACE, "")
    return F.when(blank_title, clean(text)).otherwise(joined)


def documents(df: DataFrame, settings: InputSettings) -> DataFrame:
    """The source as (doc_id, text, order) plus the reason a row cannot be embedded; `text` is
    the document text to embed and `content_hash` its sha256. For the rejects table, a line
    Spark could not parse keeps its raw text in `raw_record`, and each row its `source_file`."""
    title_col = title_column(settings, df.columns)
    title: Column = (F.col(title_col).cast("string") if title_col
                     else F.lit(None).cast("string"))
    order = F.col(settings.order_col) if settings.order_col else F.lit(None)
    raw_text = F.col(settings.text_col).cast("string")
    docs = df.select(
        F.col(settings.id_col).cast("string").alias("doc_id"),
        raw_text.alias("raw_text"),
        document_text_column(raw_text, title).alias("text"),
        order.alias("order_key"),
        _column_or_null(df, CORRUPT_RECORD).alias("raw_record"),
        _column_or_null(df, SOURCE_FILE).alias("source_file"),
    )
    return (docs.withColumn("content_hash", F.sha2("text", 256))
            .withColumn("reject_reason", reject_reason(settings.max_text_bytes))
            .drop("raw_text"))


def _column_or_null(df: DataFrame, name: str) -> Column:
    return F.col(name) if name in df.columns else F.lit(None).cast("string")


def reject_reason(max_text_bytes: int) -> Column:
    """Why a document cannot be embedded, or null when it can."""
    return (F.when(F.col("raw_record").isNotNull(), F.lit("malformed record"))
            .when(F.col("doc_id").isNull(), F.lit("null id"))
            .when(F.col("raw_text").isNull(), F.lit("null text"))
            .when(is_blank(F.col("text")), F.lit("empty or whitespace-only text"))
            .when(F.octet_length("raw_text") > max_text_bytes,
                  F.lit(f"text over {max_text_bytes} bytes")))

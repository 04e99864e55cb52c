"""Storage benchmark: bytes per stored vector and retrieval quality for each vector format and
Matryoshka dimension, on a BEIR dataset whose float32 vectors table exists.

    python jobs/evaluate_retrieval.py --dataset ../shared/data/scifact --vectors /tmp/scifact
    python -m benchmarks.storage --dataset ../shared/data/scifact --vectors /tmp/scifact \\
        --json storage.json

Each variant table is derived from the float32 table with the pipeline's own packing
(`pipeline.vectors.stored_vectors`: truncate to the dimension, renormalise, pack), which is what
an embedding run with `output.vector_format` and `model.output_dim` writes (tests/test_storage.py
holds the two equal). Bytes are the vector columns' compressed Parquet sizes from the files of the
table's current version. Queries are embedded once, in float32, and truncated likewise; retrieval
is the exact distributed search, scored with pipeline.metrics."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import DeltaTable

from benchmarks.harness import jsonl_rows, markdown_table, parse_list, write_results
from pipeline.config import BatchSettings, add_profile_arguments, load_settings
from pipeline.evaluate import beir_files
from pipeline.logs import configure_job_logging, print_json_result
from pipeline.metrics import read_qrels, retrieval_scores
from pipeline.model.load import get_encoder
from pipeline.model.spec import resolve_model_spec
from pipeline.schema import VECTOR_SCHEMA, ddl
from pipeline.search import Queries, exact_search
from pipeline.spark.session import get_spark
from pipeline.store.delta import VECTOR_PROPERTIES, TableRef, check_same_model
from pipeline.vectors import VECTOR_FORMATS, arrow_matrix, stored_vectors, unit_rows

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

VARIANT_DDL = ddl(VECTOR_SCHEMA, ["doc_id", "chunk_index", "embedding", "embedding_packed",
                                  "embedding_scale"])
COLUMNS = [("format", "format", "{}"), ("dim", "dim", "{}"),
           ("vector_bytes", "bytes/vector", "{:.0f}"),
           ("size_vs_float32", "vs float32", "{:.3f}"), ("ndcg@10", "nDCG@10", "{:.4f}"),
           ("ndcg@10_delta", "delta", "{:+.4f}"), ("recall@100", "Recall@100", "{:.4f}")]


def repack(fmt: str, dim: int):
    """mapInArrow function: float32 vectors -> the variant's stored columns."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            matrix = unit_rows(arrow_matrix(batch.column("embedding"))[:, :dim])
            yield pa.RecordBatch.from_arrays(
                [batch.column("doc_id"), batch.column("chunk_index"),
                 *stored_vectors(matrix, fmt)],
                names=["doc_id", "chunk_index", "embedding", "embedding_packed",
                       "embedding_scale"])

    return run


def vector_bytes(path: str) -> tuple[float, float]:
    """(vector column bytes, whole-row bytes) per row, compressed, current version only."""
    files = DeltaTable(path).file_uris()
    vector = total = rows = 0
    for uri in files:
        metadata = pq.ParquetFile(uri.removeprefix("file://")).metadata
        rows += metadata.num_rows
        for group in range(metadata.num_row_groups):
            for column in range(metadata.num_columns):
                chunk = metadata.row_group(group).column(column)
                total += chunk.total_compressed_size
                if chunk.path_in_schema.startswith("embedding"):
                    vector += chunk.total_compressed_size
    return vector / rows, total / rows


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--vectors", required=True, help="the float32 vectors table")
    parser.add_argument("--dims", type=parse_list(int), default="384,256,128")
    parser.add_argument("--formats", type=parse_list(str, VECTOR_FORMATS),
                        default=",".join(VECTOR_FORMATS))
    parser.add_argument("--work", default="data/storage_benchmark")
    parser.add_argument("--json", metavar="PATH")
    add_profile_arguments(parser)
    return parser


def measure_variant(spark: SparkSession, source: DataFrame, queries: Queries, qrels: dict,
                    fmt: str, dim: int, work: str) -> dict[str, Any]:
    """Writes the variant table (`fmt` at `dim`) from the float32 vectors, searches it, and
    measures its bytes and retrieval scores."""
    path = str(Path(work).resolve() / f"{fmt}_{dim}")
    source.mapInArrow(repack(fmt, dim), VARIANT_DDL).write.format("delta").mode(
        "overwrite").save(path)
    frame = spark.read.format("delta").load(path)
    run: dict[str, dict[str, float]] = {}
    for hit in exact_search(spark, frame, queries, 100, by_document=True,
                            vector_format=fmt).collect():
        run.setdefault(hit.query_id, {})[hit.doc_id] = float(hit.score)
    per_vector, per_row = vector_bytes(path)
    return {"format": fmt, "dim": dim, "vector_bytes": round(per_vector, 1),
            "row_bytes": round(per_row, 1), **retrieval_scores(qrels, run)}


def add_changes_from_float32(rows: list[dict[str, Any]], dim: int) -> None:
    """Each row's size and nDCG@10 against float32 at the full dimension `dim`."""
    base = next(r for r in rows if r["format"] == "float32" and r["dim"] == dim)
    for row in rows:
        row["size_vs_float32"] = round(row["vector_bytes"] / base["vector_bytes"], 4)
        row["ndcg@10_delta"] = round(row["ndcg@10"] - base["ndcg@10"], 4)


def main(argv: list[str] | None = None) -> int:
    configure_job_logging()
    parser = argument_parser()
    args = parser.parse_args(argv)
    settings = load_settings(args.config, args.overrides, {"model.name": args.model},
                             require_io=False)
    spark = get_spark(settings.spark)
    spec = resolve_model_spec(settings.model)
    table = TableRef.parse(args.vectors)
    properties = table.properties(spark)
    check_same_model(table, properties, spec.table_properties(), VECTOR_PROPERTIES)
    if max(args.dims) > spec.dimension:
        parser.error(f"--dims: the table's vectors have {spec.dimension} dimensions")
    _, queries_path, qrels_path = beir_files(args.dataset, args.split)
    qrels = read_qrels(qrels_path)
    asked = [q for q in jsonl_rows(queries_path) if str(q["_id"]) in qrels]
    encoder = get_encoder(spec, BatchSettings(16384, 256, 0.0))
    query_matrix = encoder.embed([q["text"] for q in asked], "query")
    source = spark.read.format("delta").load(args.vectors).select("doc_id", "chunk_index",
                                                                  "embedding")
    rows = []
    for dim in args.dims:
        queries = Queries([str(q["_id"]) for q in asked], unit_rows(query_matrix[:, :dim]))
        for fmt in args.formats:
            rows.append(measure_variant(spark, source, queries, qrels, fmt, dim, args.work))
            print(json.dumps(rows[-1]), file=sys.stderr)
    add_changes_from_float32(rows, max(args.dims))
    print(markdown_table(rows, COLUMNS, right_aligned=[key for key, *_ in COLUMNS[1:]]))
    report = {"dataset": Path(args.dataset).name, "split": args.split, "queries": len(asked),
              "model_id": encoder.spec.model_id, "rows": rows}
    if args.json:
        write_results("benchmark_storage", report, args.json)
    print_json_result(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

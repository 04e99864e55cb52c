"""Search a vectors table: exact top-k by cosine (or dot), computed on the executors.

    spark-submit jobs/search.py --query "who painted the ceiling of the sistine chapel"
    spark-submit jobs/search.py --vectors ./data/sample_vectors --queries queries.jsonl \\
        --query-id-col _id --documents --k 100 --output ./data/results.jsonl
    spark-submit jobs/search.py --vectors ./data/sample_vectors --export-index ./data/index

Queries are embedded with the model that made the table (from `<table>_runs`), with its query
prompt; `--instruction` sets a Qwen3 task text. Results go to `--output` (JSON lines for a .jsonl
path, else a Delta table) or, without it, to stdout. The last stdout line is a JSON report."""

from __future__ import annotations

import argparse
import sys
import time

from pipeline.cli import job_entry
from pipeline.config import InputSettings, SettingsError, add_profile_arguments, load_settings
from pipeline.search import (
    METRICS,
    QueryTexts,
    SearchReport,
    import_encoder_in_background,
    query_frame,
    ranked_rows,
    result_counts,
    search_table,
)
from pipeline.spark.session import get_spark
from pipeline.store.outputs import write_output


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", help="the vectors table (default: the profile's output)")
    parser.add_argument("--query", action="append", default=[], help="a query text; repeatable")
    parser.add_argument("--queries", help="queries from a file or table (any input format)")
    parser.add_argument("--query-id-col", default="id")
    parser.add_argument("--query-text-col", default="text")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--documents", action="store_true",
                        help="rank documents by their best chunk instead of chunks")
    parser.add_argument("--metric", choices=METRICS, default="cosine")
    parser.add_argument("--instruction", help="the query task text (Qwen3-style instruction)")
    parser.add_argument("--output", help="results: a .jsonl file or a Delta table")
    parser.add_argument("--export-index", metavar="FOLDER",
                        help="build an ANN index (faiss HNSW) of the table for serving instead")
    add_profile_arguments(parser, "the query model (default: the table's own)")
    return parser.parse_args(argv)


@job_entry
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    settings = load_settings(args.config, args.overrides, {"model.name": args.model},
                             require_io=False)
    vectors = args.vectors or settings.output.path
    if not vectors:
        raise SettingsError("which table? --vectors (the profile sets no output.path)")
    # the command line's queries alone stay in this process: a local driver embeds them itself
    texts = (QueryTexts.numbered(args.query)
             if not args.queries and not args.export_index else None)
    spark = get_spark(settings.spark)
    if args.export_index:
        return export_index(spark, vectors, args)
    import_encoder_in_background()  # while this process mostly waits on Spark's reads
    # query ids are only labels: a numeric id column is read as text
    source = (InputSettings(path=args.queries, id_col=args.query_id_col,
                            text_col=args.query_text_col, cast_columns=True)
              if args.queries else None)
    queries = texts if texts is not None else query_frame(spark, args.query, source)
    results, spec = search_table(spark, settings, vectors, queries, args.k,
                                 by_document=args.documents, metric=args.metric,
                                 explicit_model=args.model is not None,
                                 instruction=args.instruction, with_text=not args.output)
    if args.output:
        results = results.cache()
        output = write_output(results.orderBy("query_id", "rank"), args.output)
        rows, asked = result_counts(results)
    else:
        output = None
        hits = ranked_rows(results)
        print_results(hits)
        rows, asked = len(hits), len({hit.query_id for hit in hits})
    report = SearchReport(vectors=vectors, model_id=spec.model_id,
                          queries=asked, k=args.k,
                          level="document" if args.documents else "chunk", metric=args.metric,
                          rows=rows, output=output,
                          seconds=round(time.perf_counter() - started, 2))
    return report.to_dict()


def print_results(hits: list) -> None:
    """Each query's ranked hits with the start of the chunk's text, for a person at a terminal."""
    for row in hits:
        snippet = " ".join((row.chunk_text or "").split())[:100]
        print(f"{row.query_id}\t{row.rank}\t{row.score:.4f}\t{row.doc_id}#{row.chunk_index}\t"
              f"{snippet}")


def export_index(spark, vectors: str, args: argparse.Namespace) -> dict:
    from pipeline.ann import build_index

    return build_index(spark, vectors, args.export_index, args.metric).to_dict()


if __name__ == "__main__":
    sys.exit(main())

"""Compact a vectors table: OPTIMIZE its small files, optionally Z-ordered by doc_id, and purge
the rows its deletion vectors mark as replaced.

    spark-submit jobs/compact_table.py --table ./data/vectors [--zorder] [--no-purge]

The last line on stdout is the compaction report as one JSON object; it is also a row, with
mode `compact`, in `<table>_runs`."""

from __future__ import annotations

import argparse
import sys

from pipeline.cli import job_entry
from pipeline.config import add_profile_arguments, load_settings
from pipeline.spark.session import get_spark
from pipeline.store.compact import compact
from pipeline.store.delta import TableRef


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_profile_arguments(parser, model_help=None)
    parser.add_argument("--table", help="the vectors table (default: the profile's output.path)")
    parser.add_argument("--zorder", action="store_true",
                        help="cluster the files by doc_id (ZORDER BY), for lookups by id")
    parser.add_argument("--purge", action=argparse.BooleanOptionalAction, default=True,
                        help="rewrite files with deletion vectors (default: yes)")
    return parser.parse_args(argv)


@job_entry
def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    settings = load_settings(args.config, args.overrides)
    spark = get_spark(settings.spark)
    table = TableRef.parse(args.table or settings.output.path)
    report = compact(spark, table, zorder_by_doc_id=args.zorder,
                     purge_deletion_vectors=args.purge, retries=settings.output.commit_retries)
    return report.to_json()


if __name__ == "__main__":
    sys.exit(main())

"""Embed a corpus into a Delta table.

    spark-submit jobs/embed_corpus.py                        # the local default profile
    python jobs/embed_corpus.py --config conf/qwen3-embedding-4b.yaml --input ... --output ...

The last line on stdout is the run summary as one JSON object."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from pyspark.sql import SparkSession

from pipeline.cli import job_entry
from pipeline.config import FLAG_KEYS, add_profile_arguments, load_settings
from pipeline.embed import interrupt_spark_jobs, run_embedding
from pipeline.spark.session import get_spark
from pipeline.store.compact import compact
from pipeline.store.delta import TableRef


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_profile_arguments(parser, model_help=None)
    for flag in FLAG_KEYS:
        if flag not in ("delete_missing", "cast_columns"):
            parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag,
                                help=f"sets {FLAG_KEYS[flag]}")
    parser.add_argument("--delete-missing", action=argparse.BooleanOptionalAction, default=None,
                        help="delete documents missing from the source (default: yes for "
                             "input.snapshot=full, no for partial)")
    parser.add_argument("--cast-columns", action=argparse.BooleanOptionalAction, default=None,
                        help="cast non-string id, text and title columns to string (default: "
                             "refuse them)")
    parser.add_argument("--summary-file", metavar="PATH",
                        help="also write the run summary JSON to this file (for schedulers)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (new, changed, unchanged, deleted) and write nothing")
    parser.add_argument("--compact", action="store_true",
                        help="after a successful run, compact the table (OPTIMIZE, purge "
                             "deletion vectors; as jobs/compact_table.py does)")
    return parser.parse_args(argv)


def exit_on_sigterm(spark: SparkSession) -> None:
    """Schedulers and cluster managers stop a driver with SIGTERM: cancel its Spark actions from
    another thread and end with an exception, so the run is recorded as failed with what it
    committed."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set there

    def stop(signum, frame) -> None:
        threading.Thread(target=interrupt_spark_jobs, args=(spark,), daemon=True).start()
        sys.exit("terminated by SIGTERM")

    signal.signal(signal.SIGTERM, stop)


@job_entry
def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    settings = load_settings(args.config, args.overrides,
                             {key: getattr(args, flag) for flag, key in FLAG_KEYS.items()})
    spark = get_spark(settings.spark)
    exit_on_sigterm(spark)
    summary = run_embedding(spark, settings, dry_run=args.dry_run)
    if args.compact and not args.dry_run:
        report = compact(spark, TableRef.parse(settings.output.path),
                         retries=settings.output.commit_retries)
        logging.getLogger("pipeline.embed").info("compacted: %s", report.to_json())
    if args.summary_file:
        Path(args.summary_file).write_text(summary.to_json() + "\n")
    return summary.to_json()


if __name__ == "__main__":
    sys.exit(main())

"""Embed a corpus into a Delta table.

    spark-submit jobs/embed_corpus.py                        # the local default profile
    python jobs/embed_corpus.py --config conf/qwen3-embedding-4b.yaml --input ... --output ...

The last line on stdout is the run summary as one JSON object."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from pipeline.config import FLAG_KEYS, SettingsError, add_profile_arguments, load_settings
from pipeline.embed import run_embedding
from pipeline.logs import configure_job_logging
from pipeline.model.spec import ModelSpecError
from pipeline.spark.io import InputError
from pipeline.spark.session import get_spark
from pipeline.store.delta import CommitConflictError, ModelMismatchError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_profile_arguments(parser, model_help=None)
    for flag in FLAG_KEYS:
        if flag != "delete_missing":
            parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag,
                                help=f"sets {FLAG_KEYS[flag]}")
    parser.add_argument("--delete-missing", action=argparse.BooleanOptionalAction, default=None,
                        help="delete documents missing from the source (default: yes for "
                             "input.snapshot=full, no for partial)")
    parser.add_argument("--summary-file", metavar="PATH",
                        help="also write the run summary JSON to this file (for schedulers)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (new, changed, unchanged, deleted) and write nothing")
    return parser.parse_args(argv)


def exit_on_sigterm() -> None:
    """Schedulers stop jobs with SIGTERM (an Airflow timeout, a YARN kill): turn it into an
    exception, so the run is recorded as failed with what it committed."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit("terminated by SIGTERM"))


def main(argv: list[str] | None = None) -> int:
    configure_job_logging()
    exit_on_sigterm()
    args = parse_args(argv)
    try:
        settings = load_settings(args.config, args.overrides,
                                 {key: getattr(args, flag) for flag, key in FLAG_KEYS.items()})
        spark = get_spark(settings.spark)
        summary = run_embedding(spark, settings, dry_run=args.dry_run)
    except (SettingsError, InputError, ModelSpecError, ModelMismatchError,
            CommitConflictError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.summary_file:
        Path(args.summary_file).write_text(summary.to_json() + "\n")
    print(summary.to_json(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

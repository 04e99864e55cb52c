"""Logging for the jobs: everything on stderr, so that a job's stdout ends with its JSON result
(`print_json_result`, the one way every job prints it)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping


def configure_job_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)


def print_json_result(result: Mapping | str) -> None:
    """A job's result (a mapping, or JSON text) as the last line of stdout, on a line of its own.

    The leading newline is for stdout and stderr in one file (`> run.log 2>&1`, Airflow's
    spark-submit hook): Spark's progress bar redraws itself on stderr with carriage returns and
    never ends its line, so the result would otherwise continue the bar's last line. With the
    streams apart it only adds an empty line before the result."""
    text = result if isinstance(result, str) else json.dumps(result, sort_keys=True)
    sys.stdout.write(f"\n{text}\n")
    sys.stdout.flush()

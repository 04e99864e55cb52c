"""Logging for the jobs: everything on stderr, so that a job's stdout ends with its JSON result."""

from __future__ import annotations

import logging
import sys


def configure_job_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)

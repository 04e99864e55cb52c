"""The one entry every job's `main` goes through (`@job_entry`): logging on stderr, the result as
the last stdout line, and the error family as one line with exit code 2."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping

from pipeline.errors import PipelineError, worker_errors
from pipeline.logs import configure_job_logging, print_json_result

# What a job returns: its result, a mapping or JSON text, printed as the last line of stdout.
JobResult = Mapping | str
EXIT_USER_ERROR = 2  # argparse's code for a command line it refuses, too


def job_entry(main: Callable[[list[str] | None], JobResult]) -> Callable[[list[str] | None], int]:
    """Wrap a job's main: it returns its result, which is printed (print_json_result) for exit
    code 0. A PipelineError, something the user can fix (raised here or in a Spark worker),
    prints `error: <message>` on stderr and returns 2; any other exception is a bug and
    propagates with its traceback."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        configure_job_logging()
        try:
            with worker_errors():  # a worker's PipelineError, raised as itself
                result = main(argv)
        except PipelineError as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_USER_ERROR
        print_json_result(result)
        return 0

    return run

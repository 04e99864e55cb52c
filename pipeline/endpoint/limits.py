"""Limits that hold across an executor, not per task: Spark runs each concurrent task of an
executor in a Python worker process of its own, all forked from the executor's one
`pyspark.daemon`. So the request slots and the rate bucket are files locked with flock(2) in a
folder named after that parent process and the endpoint: every task of the executor, in every
partition and job, takes from the same ones. (On the driver, a search's own queries take from
the driver's.)"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.endpoint.http import EndpointSpec

POLL_S = (0.002, 0.02)  # waits between tries for a slot: short, jittered


def executor_folder(url: str) -> Path:
    """The folder one executor's workers share for `url`: its daemon's pid, and the URL."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / "pipeline-endpoint" / f"{os.getppid()}-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class RequestSlots:
    """At most `count` requests in flight at once among all processes and threads that use the
    folder: each holds an exclusive flock on one of `count` slot files while its request runs."""

    def __init__(self, folder: Path, count: int) -> None:
        self.paths = [folder / f"slot-{index}" for index in range(count)]
        for path in self.paths:
            path.touch(exist_ok=True)

    @contextmanager
    def held(self) -> Iterator[None]:
        descriptor = self._acquire()
        try:
            yield
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
            os.close(descriptor)

    def _acquire(self) -> int:
        while True:
            for path in random.sample(self.paths, len(self.paths)):
                descriptor = os.open(path, os.O_RDWR)
                try:
                    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return descriptor
                except BlockingIOError:
                    os.close(descriptor)
            time.sleep(random.uniform(*POLL_S))


class RateBucket:
    """A token bucket of `per_minute` units shared through a locked file: a request takes its
    units (one per request, or its tokens), waiting while the bucket holds too few. A cost over
    the whole bucket waits for a full bucket and takes it."""

    def __init__(self, path: Path, per_minute: int) -> None:
        self.path = path
        self.per_minute = per_minute
        path.touch(exist_ok=True)

    def take(self, units: int) -> None:
        units = min(max(units, 1), self.per_minute)
        while True:
            wait = self._try_take(units)
            if wait <= 0:
                return
            time.sleep(min(wait, 1.0))

    def _try_take(self, units: int) -> float:
        """Take `units` now and return 0, or return how long to wait for them."""
        with self.path.open("r+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                state = json.loads(handle.read() or "{}")
                now = time.time()
                rate = self.per_minute / 60.0
                level = min(self.per_minute, state.get("level", self.per_minute)
                            + (now - state.get("at", now)) * rate)
                if level < units:
                    return (units - level) / rate
                handle.seek(0)
                handle.truncate()
                handle.write(json.dumps({"level": level - units, "at": now}))
                return 0.0
            finally:
                handle.flush()  # before the lock goes: the next holder reads it
                fcntl.flock(handle, fcntl.LOCK_UN)


class ExecutorLimits:
    """The slots and the optional requests- and tokens-per-minute buckets of one endpoint."""

    def __init__(self, folder: Path, concurrency: int, requests_per_minute: int | None = None,
                 tokens_per_minute: int | None = None) -> None:
        self.slots = RequestSlots(folder, concurrency)
        self.requests = (RateBucket(folder / "requests-per-minute", requests_per_minute)
                         if requests_per_minute else None)
        self.tokens = (RateBucket(folder / "tokens-per-minute", tokens_per_minute)
                       if tokens_per_minute else None)

    @classmethod
    def for_endpoint(cls, spec: EndpointSpec) -> ExecutorLimits:
        return cls(executor_folder(spec.url), spec.concurrency, spec.requests_per_minute,
                   spec.tokens_per_minute)

    @contextmanager
    def request(self, units: int) -> Iterator[None]:
        """Hold a slot for one request, after taking its share of each rate."""
        if self.requests is not None:
            self.requests.take(1)
        if self.tokens is not None:
            self.tokens.take(units)
        with self.slots.held():
            yield

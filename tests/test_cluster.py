"""A real Spark standalone cluster on 127.0.0.1: a master, two workers, `spark-submit --master`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, SAMPLE_CORPUS, delta_rows

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cluster_env() -> dict[str, str]:
    return {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_NO_DAEMONIZE": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def start(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as handle:
        return subprocess.Popen([str(BIN / "spark-class"), *args], stdout=handle,
                                stderr=subprocess.STDOUT, env=cluster_env(),
                                start_new_session=True)


def alive_workers(ui_port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/json/", timeout=2) as page:
            return len([w for w in json.load(page)["workers"] if w["state"] == "ALIVE"])
    except OSError:
        return 0


class Cluster:
    """Master and workers as process groups, stoppable once, from a test or the teardown."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.port, self.ui_port = free_port(), free_port()
        self.url = f"spark://127.0.0.1:{self.port}"
        self.processes = [start(["org.apache.spark.deploy.master.Master", "--host",
                                 "127.0.0.1", "--port", str(self.port), "--webui-port",
                                 str(self.ui_port)], logs / "master.log")]
        for index in range(2):
            self.processes.append(start(
                ["org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1", "--cores", "1",
                 "--memory", "3g", "--webui-port", str(free_port()), "--work-dir",
                 str(logs / f"work{index}"), self.url], logs / f"worker{index}.log"))

    def wait_for_workers(self, count: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while alive_workers(self.ui_port) < count and time.time() < deadline:
            time.sleep(1)
        assert alive_workers(self.ui_port) == count, (self.logs / "master.log").read_text()[-2000:]

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            process.wait(timeout=60)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    running = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        running.wait_for_workers(2)
        yield running
    finally:
        running.stop()


def test_spark_submit_to_a_standalone_cluster(cluster, tmp_path, minilm_encoder):
    master_url, processes = cluster.url, cluster.processes
    loads = tmp_path / "loads"
    done = subprocess.run(
        [str(BIN / "spark-submit"), "--master", master_url, "--total-executor-cores", "2",
         "--executor-cores", "1", "--executor-memory", "1500m",
         str(REPO / "jobs" / "embed_corpus.py"), "--output", str(tmp_path / "vectors"),
         "--set", "spark.partitions=6", "--set", f"run.load_log_dir={loads}"],
        cwd=tmp_path, env=cluster_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    documents = len(SAMPLE_CORPUS.read_text().splitlines())
    assert summary["documents_embedded"] == documents

    rows = delta_rows(str(tmp_path / "vectors"))
    assert len(rows) == summary["chunks_written"]
    assert not rows.duplicated(["doc_id", "chunk_index"]).any()
    sample = rows.sample(n=40, random_state=1)
    reference = minilm_encoder.embed(sample.chunk_text.tolist())
    assert np.abs(np.stack(sample.embedding.to_numpy()) - reference).max() <= 1e-5

    records = [json.loads(line) for path in loads.glob("*.jsonl")
               for line in path.read_text().splitlines()]
    per_worker = Counter(record["pid"] for record in records)
    assert len(per_worker) == 2, f"one Python worker per single-core executor: {per_worker}"
    assert set(per_worker.values()) == {1}, f"a worker loaded the model twice: {per_worker}"
    assert all(process.poll() is None for process in processes), "cluster still up during test"


def test_cluster_processes_stop_afterwards(cluster):
    cluster.stop()
    assert all(process.poll() is not None for process in cluster.processes)
    leftovers = subprocess.run(["pgrep", "-f", str(cluster.logs)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", "no master, worker or executor process is left"
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", cluster.port)) != 0, "the master port is closed"

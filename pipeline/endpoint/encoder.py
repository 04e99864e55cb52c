"""The encoder for a serving endpoint: the same chunks as the local model (cut by the model's
own tokenizer when it is here, else by a character budget), sent as texts in requests of a
bounded size, several in flight at once; an input the server refuses is found by halving its
request and reported per chunk, not raised.

Another encoder, the same shape: `chunk`, `embed`, `content_capacity`, and the two stages
`prepare_slice` and `embed_slice` that pipeline.model.stream runs overlapped."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from pipeline.config import BatchSettings
from pipeline.endpoint.http import EndpointClient, EndpointError, InputRefused
from pipeline.model.spec import ModelSpec, TextKind, worker_model_folder
from pipeline.model.stream import Chunking, EmbeddedSlice
from pipeline.model.tokens import ChunkTokenizer, EncodedChunk
from pipeline.text import chunk_text, text_word_starts

P = TypeVar("P")
CHARS_PER_TOKEN = 4  # a token estimate without the tokenizer, for tokens_per_minute


@dataclass
class PreparedRequests(Generic[P]):
    """A slice of documents chunked, its chunks grouped into requests."""

    payload: P
    chunks: list[EncodedChunk]
    owners: list[int]
    inputs: list[str]  # what is sent for each chunk: the prompt, then the chunk's text
    units: list[int]  # each input's tokens (characters without a tokenizer)
    requests: list[list[int]]  # chunk indices per request


def request_groups(units: Sequence[int], max_inputs: int, max_units: int) -> list[list[int]]:
    """Consecutive indices grouped so that a group holds at most `max_inputs` inputs and
    `max_units` units; an input over the budget goes alone."""
    groups: list[list[int]] = []
    current: list[int] = []
    total = 0
    for index, size in enumerate(units):
        if current and (len(current) >= max_inputs or total + size > max_units):
            groups.append(current)
            current, total = [], 0
        current.append(index)
        total += size
    if current:
        groups.append(current)
    return groups


def character_chunks(text: str, window: int, overlap: int, truncate: bool
                     ) -> list[EncodedChunk]:
    """Chunks of a text by characters (each character a "token"), cut after whitespace where
    one lies within a quarter window: for an endpoint whose tokenizer is not here."""
    offsets = [(i, i + 1) for i in range(len(text))]
    chunks = chunk_text(text, offsets, window, window, overlap, truncate,
                        text_word_starts(offsets, text))
    return [EncodedChunk(c.index, c.text, c.char_start, c.char_end, c.token_start, c.token_end,
                         c.clean_cut) for c in chunks]


class EndpointEncoder:
    """Chunks and vectors through an endpoint, under one model spec."""

    def __init__(self, spec: ModelSpec, budget: BatchSettings, client: EndpointClient,
                 tokens: ChunkTokenizer | None, pool: ThreadPoolExecutor) -> None:
        self.spec = spec
        self.budget = budget
        self.client = client
        self.tokens = tokens
        self.pool = pool

    def with_budget(self, budget: BatchSettings) -> EndpointEncoder:
        return EndpointEncoder(self.spec, budget, self.client, self.tokens, self.pool)

    @property
    def content_capacity(self) -> int:
        """Tokens of text per input (characters without a tokenizer)."""
        return self.tokens.capacity if self.tokens is not None else self.spec.max_length

    def chunk(self, texts: Sequence[str], window: int, overlap: int, truncate: bool
              ) -> list[list[EncodedChunk]]:
        if self.tokens is not None:
            return self.tokens.chunk(texts, window, overlap, truncate)
        window = min(window, self.content_capacity)
        return [character_chunks(text, window, overlap, truncate) for text in texts]

    def embed(self, texts: Sequence[str], kind: TextKind = "document") -> np.ndarray:
        """Vectors for texts embedded whole (queries, scored pairs): each cut to what one input
        holds, with the prompt of its kind. A refused input is an error here."""
        cut = [chunks[0] for chunks in self.chunk(texts, self.content_capacity, 0, True)]
        prepared = self._prepared(None, cut, list(range(len(cut))), self.spec.prompt(kind))
        embedded = self.embed_slice(prepared)
        refused = [(texts[i], message) for i, message in enumerate(embedded.refusals or [])
                   if message is not None]
        if refused:
            text, message = refused[0]
            raise EndpointError(f"endpoint {self.client.spec.url} refused {len(refused)} of "
                                f"{len(texts)} texts, first {text[:80]!r}: {message}")
        return embedded.vectors

    # -- the two stages of pipeline.model.stream ------------------------------------------------

    def prepare_slice(self, chunking: Chunking, payload: P, texts: Sequence[str]
                      ) -> PreparedRequests[P]:
        per_doc = self.chunk(texts, chunking.window, chunking.overlap, chunking.truncate)
        owners = [doc for doc, chunks in enumerate(per_doc) for _ in chunks]
        chunks = [chunk for doc_chunks in per_doc for chunk in doc_chunks]
        return self._prepared(payload, chunks, owners, self.spec.document_prompt)

    def _prepared(self, payload: P, chunks: list[EncodedChunk], owners: list[int],
                  prompt: str) -> PreparedRequests[P]:
        inputs = [prompt + chunk.text for chunk in chunks]
        units = ([len(chunk.ids) for chunk in chunks] if self.tokens is not None
                 else [len(text) for text in inputs])
        endpoint = self.client.spec
        requests = request_groups(units, endpoint.max_request_inputs, endpoint.max_request_units)
        return PreparedRequests(payload, chunks, owners, inputs, units, requests)

    def embed_slice(self, prepared: PreparedRequests[P]) -> EmbeddedSlice[P]:
        """Every request of the slice, up to `concurrency` at once; refused inputs are found
        by halving their request, and keep the server's message."""
        chunks = prepared.chunks
        vectors = np.zeros((len(chunks), self.spec.dimension), dtype=np.float32)
        refusals: list[str | None] = [None] * len(chunks)
        retries_before = self.client.retries
        futures = [self.pool.submit(self._embed_group, prepared, group, vectors, refusals)
                   for group in prepared.requests]
        try:
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:  # the slice failed: its requests not yet sent are not sent
                future.cancel()
            raise
        if self.spec.normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.where(norms == 0, 1, norms)
        counts = np.asarray(prepared.units, dtype=np.int32)
        return EmbeddedSlice(prepared.payload, chunks, prepared.owners, counts, vectors,
                             counts.copy(), refusals=refusals,
                             retries=self.client.retries - retries_before)

    def _embed_group(self, prepared: PreparedRequests, group: list[int], vectors: np.ndarray,
                     refusals: list[str | None]) -> None:
        texts = [prepared.inputs[i] for i in group]
        units = sum(prepared.units[i] for i in group)
        if self.tokens is None:
            units = -(-units // CHARS_PER_TOKEN)  # the tokens-per-minute limit counts tokens
        try:
            vectors[group] = self._checked(self.client.embed(texts, units))
        except InputRefused as refused:
            if len(group) == 1:
                message = f"refused by the endpoint ({refused.status}): {refused.message}"
                refusals[group[0]] = message[:1000]
                return
            half = len(group) // 2
            self._embed_group(prepared, group[:half], vectors, refusals)
            self._embed_group(prepared, group[half:], vectors, refusals)

    def _checked(self, vectors: np.ndarray) -> np.ndarray:
        if vectors.ndim != 2 or vectors.shape[1] != self.spec.dimension:
            raise EndpointError(f"endpoint {self.client.spec.url} returned vectors of shape "
                                f"{vectors.shape}; the run expects dimension "
                                f"{self.spec.dimension}")
        return vectors


_resident: tuple[ModelSpec, EndpointEncoder] | None = None
_lock = threading.Lock()


def endpoint_encoder(spec: ModelSpec, budget: BatchSettings) -> EndpointEncoder:
    """The process's encoder for an endpoint spec: one client (connections, counters) and one
    request pool per process, as a local model is loaded once per process."""
    global _resident
    key = dataclasses.replace(spec, probe_vectors="")  # each run's probe differs a little
    with _lock:
        if _resident is not None and _resident[0] != key:
            _resident[1].pool.shutdown(wait=False, cancel_futures=True)
            _resident[1].client.close()
            _resident = None
        if _resident is None:
            endpoint = spec.endpoint
            tokens = None
            if spec.path:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(worker_model_folder(spec))
                tokens = ChunkTokenizer(tokenizer, spec.max_length, spec.document_prompt, None)
            pool = ThreadPoolExecutor(max_workers=endpoint.concurrency,
                                      thread_name_prefix="endpoint")
            _resident = (key, EndpointEncoder(spec, budget, EndpointClient(endpoint), tokens,
                                              pool))
        encoder = _resident[1]
        encoder.client.consecutive_failures = 0  # a run of failures is counted per task
        return encoder.with_budget(budget)

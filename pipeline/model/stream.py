"""Documents in, embedded chunks out, with the accelerator kept busy: while it runs one slice of
documents, a thread tokenizes, chunks and pads the next, and the caller's thread turns the
previous one into output. No Spark here: the Spark task (pipeline.spark.udf) feeds it Arrow
slices, a benchmark feeds it lists."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import torch

from pipeline.model.encode import Encoder
from pipeline.model.tokens import EncodedChunk

P = TypeVar("P")


@dataclass(frozen=True)
class Chunking:
    window: int
    overlap: int
    truncate: bool


@dataclass
class PreparedSlice(Generic[P]):
    """A slice of documents tokenized and chunked, its model batches padded."""

    payload: P
    chunks: list[EncodedChunk]
    owners: list[int]  # the document (index within the slice) of each chunk
    batches: list[tuple[list[int], torch.Tensor, torch.Tensor]]  # (chunk indices, ids, mask)


@dataclass
class EmbeddedSlice(Generic[P]):
    payload: P
    chunks: list[EncodedChunk]
    owners: list[int]
    token_counts: np.ndarray
    vectors: np.ndarray
    padded: np.ndarray  # each chunk's padded length: the longest row of its model batch
    # An endpoint's answers: each chunk's refusal (the server's message; None when embedded),
    # and the retries its requests took.
    refusals: list[str | None] | None = None
    retries: int = 0


def prepare_slice(encoder: Encoder, chunking: Chunking, payload: P, texts: Sequence[str]
                  ) -> PreparedSlice[P]:
    per_doc = encoder.chunk(texts, chunking.window, chunking.overlap, chunking.truncate)
    owners = [doc for doc, chunks in enumerate(per_doc) for _ in chunks]
    chunks = [chunk for doc_chunks in per_doc for chunk in doc_chunks]
    ids = [chunk.ids for chunk in chunks]
    batches = [(batch, *encoder.padded([ids[i] for i in batch])) for batch in encoder.plan(ids)]
    return PreparedSlice(payload, chunks, owners, batches)


def embed_slice(encoder: Encoder, prepared: PreparedSlice[P]) -> EmbeddedSlice[P]:
    """Launch every model batch of the slice, then wait once for their vectors."""
    chunks = prepared.chunks
    token_counts = np.fromiter((len(chunk.ids) for chunk in chunks), np.int32, len(chunks))
    vectors = np.empty((len(chunks), encoder.spec.dimension), dtype=np.float32)
    padded = np.zeros(len(chunks), dtype=np.int32)
    launched = [(batch, encoder.launch([chunks[i].ids for i in batch], input_ids, mask))
                for batch, input_ids, mask in prepared.batches]
    encoder.landed()
    for batch, host in launched:
        vectors[batch] = host.numpy()
        padded[batch] = token_counts[batch].max()
    return EmbeddedSlice(prepared.payload, chunks, prepared.owners, token_counts, vectors, padded)


def embed_stream(encoder: Encoder | SliceEncoder, slices: Iterable[tuple[P, Sequence[str]]],
                 chunking: Chunking, overlap: bool = True) -> Iterator[EmbeddedSlice[P]]:
    """Each slice's chunks and vectors, in order. With `overlap`, preparing runs one slice ahead
    of the model in a thread of its own, and the model one slice ahead of the caller. An
    encoder of another kind (an endpoint's) brings its own two stages."""
    def prepare(item: tuple[P, Sequence[str]]) -> Any:
        if isinstance(encoder, Encoder):
            return prepare_slice(encoder, chunking, *item)
        return encoder.prepare_slice(chunking, *item)

    def embed(prepared: Any) -> EmbeddedSlice[P]:
        if isinstance(encoder, Encoder):
            return embed_slice(encoder, prepared)
        return encoder.embed_slice(prepared)

    if not overlap:
        return (embed(prepare(item)) for item in slices)
    return overlapped(slices, [prepare, embed])


class SliceEncoder(Protocol):
    """An encoder that is not a local model: it prepares and embeds slices its own way."""

    def prepare_slice(self, chunking: Chunking, payload: Any, texts: Sequence[str]) -> Any: ...

    def embed_slice(self, prepared: Any) -> EmbeddedSlice: ...


_DONE = object()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def overlapped(items: Iterable[Any], stages: Sequence[Callable[[Any], Any]], depth: int = 1
               ) -> Iterator[Any]:
    """Items through `stages`, each stage in a thread of its own, at most `depth` items waiting
    between two stages; results in order in the caller's thread. A stage's error is raised here;
    closing the iterator stops the threads."""
    stop = threading.Event()
    queues = [queue.Queue(maxsize=depth) for _ in stages]

    def put(target: queue.Queue, item: Any) -> bool:
        while not stop.is_set():
            try:
                target.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run(stage: Callable[[Any], Any] | None, source: Iterable[Any], target: queue.Queue
            ) -> None:
        try:
            for item in source:
                if isinstance(item, _Failed):
                    put(target, item)
                    return
                if not put(target, stage(item) if stage else item):
                    return
            put(target, _DONE)
        except BaseException as error:  # handed to the caller's thread, raised there
            put(target, _Failed(error))

    def drain(source: queue.Queue) -> Iterator[Any]:
        while not stop.is_set():
            try:
                item = source.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is _DONE:
                return
            yield item

    threads = [threading.Thread(target=run, args=(stages[0], items, queues[0]), daemon=True,
                                name="embed-stage-0")]
    threads += [threading.Thread(target=run, args=(stage, drain(queues[index]),
                                                   queues[index + 1]),
                                 daemon=True, name=f"embed-stage-{index + 1}")
                for index, stage in enumerate(stages[1:])]
    for thread in threads:
        thread.start()
    try:
        for item in drain(queues[-1]):
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=5)

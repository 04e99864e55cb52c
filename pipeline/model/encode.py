"""The numerical core: tokenize -> token-budget batches -> forward -> pool -> truncate -> normalise.

No Spark here: the same Encoder runs in a Spark worker, in a benchmark, or in a notebook cell."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import BatchSettings
from pipeline.model.spec import ModelSpec, TextKind
from pipeline.model.tokens import ChunkTokenizer, EncodedChunk


@dataclass
class EncodeStats:
    """Token accounting: padding efficiency = real / padded tokens."""

    rows: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0

    def add(self, token_counts: np.ndarray, padded_lengths: np.ndarray) -> None:
        self.rows += len(token_counts)
        self.real_tokens += int(token_counts.sum())
        self.padded_tokens += int(padded_lengths.sum())

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.padded_tokens if self.padded_tokens else 1.0


def plan_batches(
    lengths: Sequence[int], max_tokens: int, max_rows: int, min_fill: float = 0.0
) -> list[list[int]]:
    """Group row indices into batches, longest first, so that rows x longest length stays within
    `max_tokens` and rows within `max_rows`. A row shorter than `min_fill` x the batch's longest
    starts a new batch, which bounds padding per row. A row longer than the budget runs alone."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        if current:
            longest = lengths[current[0]]
            full = (len(current) + 1) * longest > max_tokens or len(current) >= max_rows
            if full or lengths[index] < min_fill * longest:
                batches.append(current)
                current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool token states [rows, length, dim] under an attention mask [rows, length]."""
    if mode == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        masked = hidden.masked_fill(~mask.bool().unsqueeze(-1), torch.finfo(hidden.dtype).min)
        return masked.max(1).values
    if mode == "lasttoken":
        length = mask.shape[1]
        last = length - 1 - mask.flip(1).to(torch.int64).argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling mode {mode!r}")


def finish_vectors(pooled: torch.Tensor, output_dim: int | None, normalize: bool) -> torch.Tensor:
    """Matryoshka cut first, then L2-normalise, so a cut vector is a unit vector again."""
    vectors = pooled.float()
    if output_dim is not None:
        vectors = vectors[:, :output_dim]
    return F.normalize(vectors, p=2, dim=-1) if normalize else vectors


def split_on_oom(
    rows: list[list[int]], run: Callable[[list[list[int]]], torch.Tensor]
) -> torch.Tensor:
    """Run a batch; on out-of-memory, halve it and retry each half. Only a single row that does
    not fit is an error."""
    try:
        return run(rows)
    except torch.OutOfMemoryError as error:
        if len(rows) == 1:
            raise RuntimeError(
                f"a single text of {len(rows[0])} tokens does not fit in accelerator memory; "
                "lower model.max_length or chunking.chunk_tokens"
            ) from error
    # Retry only after the handler: until then the error's traceback keeps the failed pass's
    # activations alive, and the halves would run out of memory too.
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    half = len(rows) // 2
    return torch.cat([split_on_oom(rows[:half], run), split_on_oom(rows[half:], run)])


DEFAULT_BUDGET = BatchSettings()


class Encoder:
    """A loaded model and tokenizer, the spec that says how to use them, and the batch budget
    of this view. The model and tokenizer are shared between views (`with_budget`); a view
    never changes, so callers in one process do not share each other's limits."""

    def __init__(
        self,
        spec: ModelSpec,
        model: torch.nn.Module,
        tokenizer,
        device: torch.device,
        budget: BatchSettings = DEFAULT_BUDGET,
        tokens: ChunkTokenizer | None = None,
    ) -> None:
        self.spec = spec
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.budget = budget
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.tokens = tokens or ChunkTokenizer(tokenizer, spec.max_length, spec.document_prompt,
                                               _missing_last_token(spec, tokenizer))

    def with_budget(self, budget: BatchSettings) -> Encoder:
        """The same model and tokenizer under another batch budget."""
        return Encoder(self.spec, self.model, self.tokenizer, self.device, budget, self.tokens)

    @property
    def content_capacity(self) -> int:
        """Document tokens that fit in one sequence next to the special tokens and the document
        prompt, so a chunk's text is exactly what gets embedded."""
        return self.tokens.capacity

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids with special tokens, truncated to the max length, unpadded."""
        return self.tokens.tokenize(texts)

    def chunk(self, texts: Sequence[str], window: int, overlap: int, truncate: bool
              ) -> list[list[EncodedChunk]]:
        """Chunks of each text, by token windows of its content tokens, with their ids."""
        return self.tokens.chunk(texts, window, overlap, truncate)

    def embed(self, texts: Sequence[str], kind: TextKind = "document") -> np.ndarray:
        """Vectors [rows, dimension] for texts of one kind (`query` or `document`)."""
        prompt = self.spec.prompt(kind)
        vectors, _ = self.embed_ids(self.tokenize([prompt + text for text in texts]))
        return vectors

    def embed_ids(self, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Vectors in input order for token id rows, batched by the token budget, and each row's
        padded length (the longest row of its batch), for padding accounting."""
        vectors = np.empty((len(ids), self.spec.dimension), dtype=np.float32)
        padded = np.zeros(len(ids), dtype=np.int64)
        for batch in self.plan(ids):
            rows = [ids[i] for i in batch]
            vectors[batch] = split_on_oom(rows, self._forward).cpu().numpy()
            padded[batch] = len(rows[0])
        return vectors, padded

    def plan(self, ids: list[list[int]]) -> list[list[int]]:
        """Row indices of `ids` grouped into model batches under this view's budget."""
        return plan_batches([len(row) for row in ids], self.budget.max_batch_tokens,
                            self.budget.max_batch_rows, self.budget.min_fill)

    def launch(self, rows: list[list[int]], input_ids: torch.Tensor, mask: torch.Tensor
               ) -> torch.Tensor:
        """Start one model batch from padded inputs (pinned when the device is a GPU) and
        return its vectors on the host; on a GPU the copy is still in flight (see `landed`).
        Out of memory falls back to halving the rows, synchronously."""
        try:
            vectors = self._forward_padded(input_ids, mask)
        except torch.OutOfMemoryError:
            return split_on_oom(rows, self._forward).cpu()
        if self.device.type != "cuda":
            return vectors.cpu()
        host = torch.empty(vectors.shape, dtype=vectors.dtype, pin_memory=True)
        return host.copy_(vectors, non_blocking=True)

    def landed(self) -> None:
        """Wait until every launched batch's vectors are on the host."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Input ids and mask for rows, in pinned memory when they go to a GPU."""
        input_ids, mask = pad_rows(rows, self.pad_id, self.spec.padding_side)
        if self.device.type == "cuda":
            return input_ids.pin_memory(), mask.pin_memory()
        return input_ids, mask

    def _forward(self, rows: list[list[int]]) -> torch.Tensor:
        return self._forward_padded(*pad_rows(rows, self.pad_id, self.spec.padding_side))

    def _forward_padded(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            mask = mask.to(self.device, non_blocking=True)
            output = self.model(input_ids=input_ids.to(self.device, non_blocking=True),
                                attention_mask=mask)
            hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
            pooled = pool(hidden, mask, self.spec.pooling)
            return finish_vectors(pooled, self.spec.output_dim, self.spec.normalize)


def pad_rows(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask, padded on `side` to the longest row."""
    longest = max(len(row) for row in rows)
    input_ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), longest), dtype=np.int64)
    for i, row in enumerate(rows):
        span = slice(longest - len(row), longest) if side == "left" else slice(0, len(row))
        input_ids[i, span] = row
        mask[i, span] = 1
    return torch.from_numpy(input_ids), torch.from_numpy(mask)


def _missing_last_token(spec: ModelSpec, tokenizer) -> int | None:
    """Last-token pooling reads the token a decoder's tokenizer appends (Qwen3: <|endoftext|>).
    Older tokenizer files do not append it; then we do, once."""
    if spec.pooling != "lasttoken":
        return None
    probe = tokenizer("a")["input_ids"]
    if probe and probe[-1] in tokenizer.all_special_ids:
        return None
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(endoftext, int) and endoftext != tokenizer.unk_token_id:
        return endoftext
    return tokenizer.eos_token_id

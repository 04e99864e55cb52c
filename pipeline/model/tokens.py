"""Text -> the token ids a model embeds, tokenizing each document once.

A document is tokenized once, without special tokens, by the fast tokenizer's Rust core; its
chunks are slices of those ids, cut at the tokenizer's word starts, so each chunk's text,
tokenized again, gives exactly the ids that were embedded (what sentence-transformers or TEI
would embed for `chunk_text`). Where a cut has to fall inside a word, or the tokenizer fails the
self-check below, that chunk's text is tokenized again and its ids taken from there."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from pipeline.model.spec import ModelSpecError
from pipeline.text import Chunk, chunk_text, word_starts

log = logging.getLogger("pipeline.model")

# A text this short per token of the limit is tokenized without offsets first (_encodings).
SHORT_CHARS_PER_TOKEN = 3
# Words of many scripts, cut at each word start by the self-check.
CUT_PROBE = ("Hello  world, (test) don't 12345 e\u0301x naïve 中文字符 ไทย العربية "
             "👨\u200d👩\u200d👧 x\n\ny  end.")


@dataclass(frozen=True)
class EncodedChunk(Chunk):
    """A chunk with the sequence the model embeds for it: special tokens, document prompt, the
    chunk's tokens."""

    ids: list[int] = field(default_factory=list)


def with_ids(chunk: Chunk, ids: list[int]) -> EncodedChunk:
    return EncodedChunk(chunk.index, chunk.text, chunk.char_start, chunk.char_end,
                        chunk.token_start, chunk.token_end, chunk.clean_cut, ids)


class ChunkTokenizer:
    """The tokenizer side of an encoder, for one model spec (max length, prompts, pooling)."""

    def __init__(self, tokenizer, max_length: int, document_prompt: str,
                 append_token: int | None) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ModelSpecError("the model folder needs a fast tokenizer (tokenizer.json): "
                                 "chunk offsets come from it")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.append_token = append_token
        self.backend = copy.deepcopy(tokenizer.backend_tokenizer)
        self.backend.no_padding()
        self.backend.no_truncation()
        self.prefix, self.suffix = _special_template(tokenizer)
        if append_token is not None and self.suffix[-1:] != [append_token]:
            self.suffix = [*self.suffix, append_token]
        self.prompt_ids = self._ids([document_prompt])[0] if document_prompt else []
        self.capacity = max_length - len(self.prefix) - len(self.suffix) - len(self.prompt_ids)
        if self.capacity < 1:
            raise ModelSpecError(f"model.max_length {max_length} leaves no room for text next "
                                 "to the special tokens and the document prompt")
        if document_prompt and self._ids([document_prompt + " word"])[0] != [
                *self.prompt_ids, *self._ids([" word"])[0]]:
            log.warning("the document prompt %r merges with the text after it: a chunk's ids "
                        "are the prompt's then the text's, which tokenizing them together "
                        "would not give exactly", document_prompt)
        self.cuts_exact = self._cuts_are_exact(CUT_PROBE)
        if not self.cuts_exact:
            log.info("this tokenizer's pieces depend on what precedes a word; chunk texts are "
                     "tokenized again so that each reproduces its embedded ids")

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids with special tokens, truncated to the max length, unpadded (for queries and
        texts embedded whole)."""
        limit = self.max_length - (self.append_token is not None)
        ids = self.tokenizer(
            list(texts), truncation=True, max_length=limit, padding=False,
            return_attention_mask=False, return_token_type_ids=False,
        )["input_ids"]
        if self.append_token is not None:
            ids = [row if row and row[-1] == self.append_token else [*row, self.append_token]
                   for row in ids]
        return ids

    def chunk(self, texts: Sequence[str], window: int, overlap: int, truncate: bool
              ) -> list[list[EncodedChunk]]:
        """Each text's chunks with their embedded ids, from one tokenization of the texts."""
        window = min(window, self.capacity)
        limit = self.capacity if truncate else window
        documents = []
        for text, encoding in zip(texts, self._encodings(texts, limit), strict=True):
            ids = encoding.ids
            if len(ids) <= limit:
                documents.append([EncodedChunk(0, text, 0, len(text), 0, len(ids), True,
                                               self.wrap(ids))])
                continue
            offsets = encoding.offsets
            starts = word_starts(offsets, encoding.word_ids)
            chunks = chunk_text(text, offsets, self.capacity, window, overlap, truncate, starts)
            documents.append([self._encoded(chunk, ids, offsets, text) for chunk in chunks])
        return documents

    def _encodings(self, texts: Sequence[str], limit: int) -> list:
        """One encoding per text. A text of at most SHORT_CHARS_PER_TOKEN characters per token
        of the limit is tokenized without offsets (a sixth less CPU; it nearly always fits);
        longer ones, and a short one that does not fit after all, with the offsets that cutting
        needs."""
        short = [i for i, text in enumerate(texts) if len(text) <= limit * SHORT_CHARS_PER_TOKEN]
        encodings: list = [None] * len(texts)
        for i, encoding in zip(short, self._fast([texts[i] for i in short]), strict=True):
            encodings[i] = encoding if len(encoding) <= limit else None
        cut = [i for i, encoding in enumerate(encodings) if encoding is None]
        full = self.backend.encode_batch([texts[i] for i in cut], add_special_tokens=False)
        for i, encoding in zip(cut, full, strict=True):
            encodings[i] = encoding
        return encodings

    def _fast(self, texts: list[str]) -> list:
        fast = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return fast(texts, add_special_tokens=False)

    def wrap(self, content: list[int]) -> list[int]:
        return [*self.prefix, *self.prompt_ids, *content, *self.suffix]

    def _encoded(self, chunk: Chunk, ids: list[int], offsets: Sequence[tuple[int, int]],
                 text: str) -> EncodedChunk:
        if chunk.clean_cut and self.cuts_exact:
            return with_ids(chunk, self.wrap(ids[chunk.token_start:chunk.token_end]))
        return self._retokenized(chunk, offsets, text)

    def _retokenized(self, chunk: Chunk, offsets: Sequence[tuple[int, int]], text: str
                     ) -> EncodedChunk:
        """A chunk cut inside a word: its text's own ids, dropping tokens from its end until
        they fit (a cut word can take more tokens than its pieces did)."""
        end = chunk.token_end
        while True:
            char_end = max(offsets[end - 1][1], chunk.char_start)
            piece = text[chunk.char_start:char_end]
            ids = self._ids([piece])[0]
            if len(ids) <= self.capacity or end - chunk.token_start <= 1:
                return EncodedChunk(chunk.index, piece, chunk.char_start, char_end,
                                    chunk.token_start, end, False, self.wrap(ids[:self.capacity]))
            end -= 1

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in
                self.backend.encode_batch(texts, add_special_tokens=False)]

    def _cuts_are_exact(self, probe: str) -> bool:
        """Does cutting the probe at each word start give, side by side, the ids of the whole?"""
        encoding = self.backend.encode(probe, add_special_tokens=False)
        starts = word_starts(encoding.offsets, encoding.word_ids)
        for index in (i for i, start in enumerate(starts) if start and i):
            cut = encoding.offsets[index][0]
            left, right = self._ids([probe[:cut], probe[cut:]])
            if left + right != encoding.ids:
                return False
        return True


def _special_template(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a single text ([CLS] .. [SEP] for BERT;
    nothing before and <|endoftext|> after for Qwen3)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return [], []

"""The MTEB bridge on the packaged all-MiniLM-L6-v2: its vectors are the pipeline's, mteb accepts
it as an encoder, and mteb scores it like the same model run through sentence-transformers, on
small tasks built here from local data (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import mteb
import numpy as np
import pytest
from datasets import Dataset
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.sts import AbsTaskSTS
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.models import EncoderProtocol, SearchProtocol
from mteb.types import PromptType
from sentence_transformers import SentenceTransformer
from torch.utils.data import DataLoader

from pipeline import mteb_bridge
from pipeline.config import BatchSettings, ModelSettings
from pipeline.model.encode import Encoder
from pipeline.mteb_bridge import MtebEncoder, text_kind

REPO = Path(__file__).resolve().parent.parent
SAMPLE_CORPUS = REPO / "pipeline" / "data" / "sample_corpus.jsonl"
# As the session's minilm_encoder fixture batches, so that sharing the resident model changes
# nothing for other tests.
TEST_BATCH = BatchSettings(max_batch_tokens=4096, max_batch_rows=64, min_fill=0.0)
INSTRUCTION = "Given a question, retrieve passages that answer it"
TEXTS = [
    "What is the capital of France?",
    "Paris is the capital and largest city of France.",
    "Honey bees make honey from the nectar of flowers. " * 8,
    "Ünïcödé, emoji 🚀 and CJK 中文字符",
    "x",
]
TASK_FIELDS = {
    "description": "A small task built in the test from local data.",
    "reference": "https://example.org/local",
    "dataset": {"path": "local/none", "revision": "local"},
    "category": "t2t",
    "eval_splits": ["test"],
    "eval_langs": ["eng-Latn"],
    "date": ("2024-01-01", "2024-01-01"),
    "dialect": ["Written"],
    "domains": [],
    "task_subtypes": [],
    "license": "cc-by-4.0",
    "annotations_creators": "derived",
    "modalities": ["text"],
    "sample_creation": "found",
    "bibtex_citation": "",
}


class TitleToPassageRetrieval(AbsTaskRetrieval):
    """Queries are Wikipedia article titles; the relevant documents are that article's passages
    (without their titles, first 400 characters) from the shipped sample corpus, 30 in all."""

    metadata = TaskMetadata(type="Retrieval", name="LocalTitleToPassageRetrieval",
                            main_score="ndcg_at_10", **TASK_FIELDS)

    def load_data(self, num_proc: int | None = None, **kwargs) -> None:
        rows = [json.loads(line) for line in SAMPLE_CORPUS.read_text().splitlines()][:30]
        titles = list(dict.fromkeys(row["title"] for row in rows))
        queries = [{"id": f"q{i}", "text": title} for i, title in enumerate(titles)]
        relevant = {f"q{i}": {row["_id"]: 1 for row in rows if row["title"] == title}
                    for i, title in enumerate(titles)}
        corpus = [{"id": row["_id"], "title": "", "text": row["text"][:400]} for row in rows]
        self.dataset = {"default": {"test": RetrievalSplitData(
            queries=Dataset.from_list(queries), corpus=Dataset.from_list(corpus),
            relevant_docs=relevant, top_ranked=None)}}
        self.data_loaded = True


class SentencePairSTS(AbsTaskSTS):
    """Sentence pairs with hand-set similarity scores (0 to 5)."""

    metadata = TaskMetadata(type="STS", name="LocalSentencePairSTS",
                            main_score="cosine_spearman", **TASK_FIELDS)
    min_score = 0
    max_score = 5

    def load_data(self, num_proc: int | None = None, **kwargs) -> None:
        pairs = [
            ("A man is playing a guitar.", "A man plays the guitar.", 5.0),
            ("A child is riding a horse.", "A kid rides a pony.", 4.2),
            ("The cat sleeps on the sofa.", "A cat is napping on a couch.", 4.5),
            ("Stocks fell sharply on Monday.", "Markets dropped at the start of the week.", 3.8),
            ("A woman is slicing an onion.", "Someone is cutting vegetables.", 3.0),
            ("The train arrived late.", "She bought a new laptop.", 0.2),
            ("He is reading a book in the park.", "Rain is expected tomorrow.", 0.4),
            ("Two dogs run across the field.", "Dogs are running on the grass.", 4.0),
            ("The chef is cooking pasta.", "A pilot lands the plane.", 0.1),
            ("Solar panels convert sunlight to power.", "Sunlight is turned into electricity.",
             4.6),
        ]
        self.dataset = {"test": Dataset.from_dict({
            "sentence1": [a for a, _, _ in pairs],
            "sentence2": [b for _, b, _ in pairs],
            "score": [s for _, _, s in pairs],
        })}
        self.data_loaded = True


def text_batches(texts: list[str], batch_size: int = 2) -> DataLoader:
    """What mteb hands an encoder for plain texts: batches of {"text": [...]}."""
    return DataLoader(Dataset.from_dict({"text": texts}), batch_size=batch_size)


def max_abs_diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.fixture(scope="module")
def bridge(minilm_path) -> MtebEncoder:
    return MtebEncoder(str(minilm_path), batch=TEST_BATCH)


@pytest.fixture(scope="module")
def encoder(bridge) -> Encoder:
    """The pipeline's encoder the bridge runs (the process's resident all-MiniLM-L6-v2)."""
    return bridge.encoder


@pytest.fixture(scope="module")
def reference(minilm_path) -> SentenceTransformer:
    return SentenceTransformer(str(minilm_path), device="cpu")


def test_bridge_reuses_the_resident_encoder(minilm_path, encoder):
    from pipeline.model import load

    loads = load.load_count
    again = MtebEncoder(str(minilm_path), batch=TEST_BATCH).encoder
    assert again.model is encoder.model and load.load_count == loads, "no second load"
    assert again.budget == TEST_BATCH
    assert MtebEncoder(encoder).encoder is encoder
    with pytest.raises(TypeError, match="already loaded"):
        MtebEncoder(encoder, output_dim=64)


def test_queries_and_documents_are_the_pipelines_vectors(bridge, encoder, reference):
    metadata = TitleToPassageRetrieval.metadata
    queries = bridge.encode(text_batches(TEXTS), task_metadata=metadata, hf_split="test",
                            hf_subset="default", prompt_type=PromptType.query)
    documents = bridge.encode(text_batches(TEXTS), task_metadata=metadata, hf_split="test",
                              hf_subset="default", prompt_type=PromptType.document)
    unprompted = bridge.encode(text_batches(TEXTS, 3), task_metadata=metadata, hf_split="test",
                               hf_subset="default")
    assert queries.dtype == np.float32 and queries.shape == (len(TEXTS), 384)
    assert max_abs_diff(queries, encoder.embed(TEXTS, "query")) <= 1e-6
    assert max_abs_diff(documents, encoder.embed(TEXTS, "document")) <= 1e-6
    assert max_abs_diff(unprompted, documents) <= 1e-6
    expected = reference.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    assert max_abs_diff(queries, expected) <= 1e-5  # this model's prompts are empty
    assert max_abs_diff(documents, expected) <= 1e-5


def test_a_plain_list_of_texts_is_encoded_as_mteb_1x_passes_it(bridge, encoder, monkeypatch):
    vectors = bridge.encode(TEXTS, task_name="SomeTask", prompt_type="passage")
    assert max_abs_diff(vectors, encoder.embed(TEXTS, "document")) <= 1e-6
    monkeypatch.setattr(mteb_bridge, "TEXTS_PER_PASS", 2)
    assert max_abs_diff(bridge.encode(TEXTS), vectors) <= 1e-5, "texts in slices, in order"
    assert bridge.encode([], prompt_type=PromptType.query).shape == (0, 384)
    assert [text_kind(t) for t in (PromptType.query, "query", PromptType.document, "passage",
                                   None)] == ["query", "query", "document", "document", "document"]
    with pytest.raises(TypeError, match="text only"):
        bridge.encode([{"image": [1]}])


def test_query_prompt_from_settings_prefixes_queries_only(minilm_path, encoder, reference):
    instructed = MtebEncoder(ModelSettings(name=str(minilm_path), query_instruction=INSTRUCTION),
                             batch=TEST_BATCH)
    prompt = f"Instruct: {INSTRUCTION}\nQuery:"
    assert instructed.spec.query_prompt == prompt, "not the resident spec with an empty prompt"
    assert instructed.encoder.model is encoder.model, "no second load"
    queries = instructed.encode(text_batches(TEXTS), prompt_type=PromptType.query)
    documents = instructed.encode(text_batches(TEXTS), prompt_type=PromptType.document)
    expected = reference.encode(TEXTS, prompt=prompt, normalize_embeddings=True)
    assert max_abs_diff(queries, expected) <= 1e-5
    assert max_abs_diff(documents, encoder.embed(TEXTS, "document")) <= 1e-6
    meta = instructed.mteb_model_meta
    assert meta.revision == encoder.spec.fingerprint
    assert set(meta.experiment_kwargs) == {"query_prompt_sha"}, "own cache namespace"
    assert meta.use_instructions is True


def test_task_instructions_follow_mteb_task_prompts(bridge, encoder):
    with_instructions = MtebEncoder(encoder, task_instructions=True)
    custom = TaskMetadata(type="Retrieval", name="LocalPromptedRetrieval",
                          main_score="ndcg_at_10", prompt={"query": "Find the answer"},
                          **TASK_FIELDS)
    assert with_instructions.prompt(custom, PromptType.query) == (
        "Instruct: Find the answer\nQuery:")
    assert with_instructions.prompt(custom, PromptType.document) == ""
    # No task prompt: the default of the task type, as mteb's own Qwen3 runs use.
    default = TitleToPassageRetrieval.metadata
    assert with_instructions.prompt(default, PromptType.query) == (
        "Instruct: Retrieve text based on user query.\nQuery:")
    assert with_instructions.prompt(SentencePairSTS.metadata, None) == (
        "Instruct: Retrieve semantically similar text.\nQuery:")
    assert bridge.prompt(custom, PromptType.query) == ""
    vectors = with_instructions.encode(TEXTS, task_metadata=custom, prompt_type=PromptType.query)
    ids = encoder.tokenize(["Instruct: Find the answer\nQuery:" + t for t in TEXTS])
    assert max_abs_diff(vectors, encoder.embed_ids(ids)[0]) <= 1e-6
    assert with_instructions.mteb_model_meta.experiment_kwargs == {"task_instructions": True}


def test_satisfies_mteb_encoder_protocol_with_model_meta(bridge, encoder):
    assert isinstance(bridge, EncoderProtocol)
    assert not isinstance(bridge, SearchProtocol), "mteb wraps it for retrieval itself"
    meta = bridge.mteb_model_meta
    assert meta.name == f"local/{encoder.spec.model_id}"
    assert meta.revision == encoder.spec.fingerprint
    assert meta.embed_dim == 384 and meta.max_tokens == 256
    assert meta.similarity_fn_name.value == "cosine"
    assert meta.n_parameters == sum(p.numel() for p in encoder.model.parameters())
    assert meta.experiment_kwargs is None
    assert meta.use_instructions is False


def test_similarity_is_cosine(bridge):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 8)).astype(np.float32), rng.normal(size=(4, 8)).astype(np.float32)
    unit_a = a / np.linalg.norm(a, axis=1, keepdims=True)
    unit_b = b / np.linalg.norm(b, axis=1, keepdims=True)
    assert max_abs_diff(bridge.similarity(a, b), unit_a @ unit_b.T) <= 1e-6
    pairwise = bridge.similarity_pairwise(a, b[:3])
    assert max_abs_diff(pairwise, np.sum(unit_a * unit_b[:3], axis=1)) <= 1e-6


def test_from_profile_uses_the_profile_model_and_batch_settings(encoder):
    model = MtebEncoder.from_profile("local", ["batch.max_batch_tokens=4096",
                                               "batch.max_batch_rows=64", "batch.min_fill=0"])
    assert model.encoder.model is encoder.model
    assert model.encoder.budget == BatchSettings(4096, 64, 0.0)
    assert model.mteb_model_meta.name == "sentence-transformers/all-MiniLM-L6-v2"


def test_mteb_evaluates_the_bridge_like_sentence_transformers(bridge, reference):
    tasks = [TitleToPassageRetrieval(), SentencePairSTS()]
    ours = mteb.evaluate(bridge, tasks, cache=None, show_progress_bar=False)
    theirs = mteb.evaluate(reference, [TitleToPassageRetrieval(), SentencePairSTS()],
                           cache=None, show_progress_bar=False)
    ours_by_task = {result.task_name: result.scores["test"][0] for result in ours.task_results}
    theirs_by_task = {result.task_name: result.scores["test"][0]
                      for result in theirs.task_results}
    assert set(ours_by_task) == {"LocalTitleToPassageRetrieval", "LocalSentencePairSTS"}
    retrieval = ours_by_task["LocalTitleToPassageRetrieval"]
    assert 0.6 < retrieval["ndcg_at_10"] <= 1.0, "titles find their passages"
    assert ours_by_task["LocalSentencePairSTS"]["cosine_spearman"] > 0.8
    for name, scores in ours_by_task.items():
        numbers = {key: value for key, value in scores.items()
                   if isinstance(value, float) and not np.isnan(value)}
        assert len(numbers) > 5
        for key, value in numbers.items():
            assert value == pytest.approx(theirs_by_task[name][key], abs=1e-4), (name, key)

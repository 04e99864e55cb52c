"""Token-budget batching, pooling, Matryoshka cut + normalisation, OOM splitting and padding."""

from __future__ import annotations

import itertools
import random
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.model.encode import (
    EncodeStats,
    finish_vectors,
    pad_rows,
    plan_batches,
    pool,
    split_on_oom,
)

SEEDS = [0, 1, 2, 3, 7, 42]
BUDGETS = [(512, 8), (1024, 4), (2048, 64), (4096, 256), (300, 1000)]


def random_lengths(seed: int, count: int = 400) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(1, 512) for _ in range(count)]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("max_tokens", "max_rows"), BUDGETS)
@pytest.mark.parametrize("min_fill", [0.0, 0.9])
def test_plan_batches_respects_budgets_and_keeps_every_row_once(
    seed: int, max_tokens: int, max_rows: int, min_fill: float
) -> None:
    lengths = random_lengths(seed)
    batches = plan_batches(lengths, max_tokens, max_rows, min_fill)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(lengths)))
    for batch in batches:
        sizes = [lengths[i] for i in batch]
        assert batch
        assert len(batch) <= max_rows
        assert sizes == sorted(sizes, reverse=True), "rows are not longest first"
        assert len(batch) == 1 or len(batch) * sizes[0] <= max_tokens
        assert all(size >= min_fill * sizes[0] for size in sizes)


@pytest.mark.parametrize("seed", SEEDS)
def test_plan_batches_fills_batches_when_min_fill_is_zero(seed: int) -> None:
    lengths = random_lengths(seed)
    max_tokens, max_rows = 4096, 64
    batches = plan_batches(lengths, max_tokens, max_rows)
    # Longest first, so the next batch's first row would have fitted if a batch closed early.
    for batch, following in itertools.pairwise(batches):
        longest = lengths[batch[0]]
        assert len(batch) == max_rows or (len(batch) + 1) * longest > max_tokens
        assert lengths[following[0]] <= longest


def test_min_fill_starts_a_new_batch_for_much_shorter_rows() -> None:
    lengths = [100, 95, 91, 89, 50, 45]
    assert plan_batches(lengths, 10_000, 100, 0.9) == [[0, 1, 2], [3], [4, 5]]
    assert plan_batches(lengths, 10_000, 100, 0.0) == [[0, 1, 2, 3, 4, 5]]


def test_row_longer_than_the_budget_runs_alone() -> None:
    lengths = [10, 900, 12, 1000, 11]
    batches = plan_batches(lengths, 256, 16)
    assert batches[:2] == [[3], [1]]
    assert sorted(batches[2]) == [0, 2, 4]


def test_row_exactly_at_the_budget_runs_alone_and_max_rows_one_is_one_per_batch() -> None:
    assert plan_batches([64, 64, 32], 64, 8) == [[0], [1], [2]]
    assert plan_batches([5, 3, 4], 1000, 1) == [[0], [2], [1]]


def test_plan_batches_of_nothing_is_no_batches() -> None:
    assert plan_batches([], 1024, 8) == []


@pytest.mark.parametrize("seed", SEEDS)
def test_scattering_batch_results_by_index_restores_input_order(seed: int) -> None:
    lengths = random_lengths(seed, 257)
    batches = plan_batches(lengths, 2048, 32, 0.9)
    results = np.concatenate([np.array([lengths[i] for i in batch]) for batch in batches])
    order = np.concatenate([np.array(batch) for batch in batches])
    restored = np.empty(len(lengths), dtype=np.int64)
    restored[order] = results
    assert restored.tolist() == lengths


def test_mean_pool_averages_only_unmasked_tokens() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    expected = torch.stack([hidden[0].mean(0), hidden[1, :2].mean(0), hidden[2, 0]])
    torch.testing.assert_close(pool(hidden, mask, "mean"), expected)


def test_mean_pool_is_unchanged_by_garbage_in_padded_positions() -> None:
    torch.manual_seed(1)
    hidden = torch.randn(2, 6, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    noisy = hidden.clone()
    noisy[mask == 0] = 1e6
    torch.testing.assert_close(pool(noisy, mask, "mean"), pool(hidden, mask, "mean"))


def test_lasttoken_pool_picks_the_last_real_token_for_right_padding() -> None:
    hidden = torch.arange(2 * 4 * 2, dtype=torch.float32).reshape(2, 4, 2)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(
        pool(hidden, mask, "lasttoken"), torch.stack([hidden[0, 1], hidden[1, 3]])
    )


def test_lasttoken_pool_picks_the_final_position_for_left_padding() -> None:
    hidden = torch.arange(3 * 4 * 2, dtype=torch.float32).reshape(3, 4, 2)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    torch.testing.assert_close(pool(hidden, mask, "lasttoken"), hidden[:, 3])


def test_cls_pool_takes_position_zero() -> None:
    torch.manual_seed(2)
    hidden = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    torch.testing.assert_close(pool(hidden, mask, "cls"), hidden[:, 0])


def test_max_pool_ignores_padded_positions() -> None:
    hidden = torch.tensor(
        [[[1.0, -5.0], [2.0, -3.0], [100.0, 100.0]], [[-1.0, -2.0], [-4.0, -0.5], [-3.0, 7.0]]]
    )
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    expected = torch.tensor([[2.0, -3.0], [-1.0, 7.0]])
    torch.testing.assert_close(pool(hidden, mask, "max"), expected)


def test_pool_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="sum"):
        pool(torch.zeros(1, 2, 3), torch.ones(1, 2), "sum")


@pytest.mark.parametrize("output_dim", [1, 4, 16, 32])
def test_finish_vectors_cuts_then_normalises_to_unit_norm(output_dim: int) -> None:
    torch.manual_seed(3)
    full = torch.randn(5, 32) * 10
    vectors = finish_vectors(full, output_dim, normalize=True)
    expected = full[:, :output_dim] / full[:, :output_dim].norm(dim=-1, keepdim=True)
    assert vectors.shape == (5, output_dim)
    torch.testing.assert_close(vectors, expected)
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(5))


def test_finish_vectors_without_normalize_returns_the_raw_cut() -> None:
    torch.manual_seed(4)
    full = torch.randn(3, 16, dtype=torch.bfloat16)
    vectors = finish_vectors(full, 8, normalize=False)
    assert vectors.dtype == torch.float32
    torch.testing.assert_close(vectors, full[:, :8].float())
    torch.testing.assert_close(finish_vectors(full, None, normalize=False), full.float())


def test_finish_vectors_without_output_dim_keeps_the_full_width() -> None:
    full = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    expected = F.normalize(full, dim=-1)
    torch.testing.assert_close(finish_vectors(full, None, normalize=True), expected)
    torch.testing.assert_close(expected, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))


def encode_rows(rows: list[list[int]]) -> torch.Tensor:
    """A stand-in forward pass: row i becomes [first id, length]."""
    return torch.tensor([[row[0], len(row)] for row in rows], dtype=torch.float32)


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8, 13])
def test_split_on_oom_halves_until_batches_fit_and_keeps_order(count: int) -> None:
    rows = [[i] * (i + 1) for i in range(count)]
    calls: list[int] = []

    def run(batch: list[list[int]]) -> torch.Tensor:
        calls.append(len(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return encode_rows(batch)

    result = split_on_oom(rows, run)
    torch.testing.assert_close(result, encode_rows(rows))
    assert sum(size for size in calls if size <= 2) == count
    assert max(calls) == count


def test_split_on_oom_single_row_that_never_fits_raises_with_token_count() -> None:
    def run(batch: list[list[int]]) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="777 tokens") as info:
        split_on_oom([[1] * 777, [2] * 10], run)
    assert type(info.value) is RuntimeError
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)


def test_split_on_oom_frees_the_failed_batch_before_retrying() -> None:
    failed: list[weakref.ref] = []
    alive_at_retry: list[bool] = []

    def run(batch: list[list[int]]) -> torch.Tensor:
        alive_at_retry.extend(ref() is not None for ref in failed)
        activations = torch.zeros(len(batch), 1024)
        if len(batch) > 1:
            failed.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory")
        return encode_rows(batch)

    split_on_oom([[1], [2], [3], [4]], run)
    assert alive_at_retry and not any(alive_at_retry)


def test_split_on_oom_does_not_swallow_other_errors() -> None:
    def run(batch: list[list[int]]) -> torch.Tensor:
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        split_on_oom([[1], [2], [3]], run)


def test_pad_rows_right_puts_ids_first_and_pads_after() -> None:
    input_ids, mask = pad_rows([[5, 6, 7], [8], [9, 10]], pad_id=0, side="right")
    assert input_ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert input_ids.dtype == mask.dtype == torch.int64


def test_pad_rows_left_pads_before_so_rows_end_at_the_last_position() -> None:
    input_ids, mask = pad_rows([[5, 6, 7], [8], [9, 10]], pad_id=-1, side="left")
    assert input_ids.tolist() == [[5, 6, 7], [-1, -1, 8], [-1, 9, 10]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_pool_back_to_their_last_token(side: str) -> None:
    rows = [[3, 4, 5, 6], [7], [8, 9]]
    input_ids, mask = pad_rows(rows, pad_id=0, side=side)
    hidden = input_ids.unsqueeze(-1).float()
    assert pool(hidden, mask, "lasttoken").squeeze(-1).tolist() == [6.0, 7.0, 9.0]
    assert pool(hidden, mask, "mean").squeeze(-1).tolist() == [4.5, 7.0, 8.5]


def test_encode_stats_padding_efficiency_is_real_over_padded_tokens() -> None:
    stats = EncodeStats()
    assert stats.padding_efficiency == 1.0
    stats.add(np.array([10, 8, 6]), np.array([10, 10, 10]))
    stats.add(np.array([4]), np.array([4]))
    assert (stats.rows, stats.real_tokens, stats.padded_tokens) == (4, 28, 34)
    assert stats.padding_efficiency == pytest.approx(28 / 34)

"""The first-order tables' fast path (issue 13, wordfast): lookups grouped by one numpy sort shared by
the in-batch replay and the optimiser step, padding left out, one autograd leaf per example."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from livectr.learner.sparse import RowOptimizer, SparseTable, group_lookups

PAD = 50


def _lookups(seed: int = 0, batch: int = 64, width: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, W] rows of a 51-row table (row 50 is padding, trailing in each example) and their
    values 1/√n, as the featurizer builds them; few rows, so that rows repeat across examples."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, PAD, (batch, width))
    words = rng.integers(1, width + 1, batch)
    present = np.arange(width)[None, :] < words[:, None]
    rows[~present] = PAD
    values = present / np.sqrt(words[:, None])
    return torch.from_numpy(rows), torch.from_numpy(values.astype(np.float32))


def test_groups_are_the_stable_sort_of_the_rows_without_padding() -> None:
    idx, _ = _lookups()
    flat = idx.reshape(-1)
    for bound in (PAD + 1, None, 1 << 62):  # packed keys, bound from the data, the argsort fallback
        groups = group_lookups(idx, PAD, bound)
        kept = torch.nonzero(flat != PAD).squeeze(1)
        expected = kept[torch.argsort(flat[kept], stable=True)]
        assert torch.equal(groups.order, expected)
        assert torch.equal(groups.rows, flat[expected])
        assert torch.equal(groups.example, expected // idx.shape[1])
        assert torch.equal(groups.unique, torch.unique(flat[kept]))
        assert torch.equal(groups.unique[groups.segment], groups.rows)
        assert torch.equal(groups.rows[groups.start], groups.rows)
        assert bool((groups.start <= torch.arange(groups.order.numel())).all())
    empty = group_lookups(torch.full((3, 2), PAD), PAD, PAD + 1)
    assert empty.order.numel() == 0 and empty.unique.numel() == 0


def test_weighted_sum_is_the_sum_of_lookups_with_their_gradients() -> None:
    idx, values = _lookups(1)
    table = SparseTable(PAD + 1, 0, padding_row=PAD)
    table.weight.data[:PAD, 0] = torch.randn(PAD)
    table.train()
    upstream = torch.randn(idx.shape[0])
    summed = table.weighted_sum(idx, values)
    (summed * upstream).sum().backward()
    ((idx_, values_, grad),) = table.take_gradients()
    looked_up = table(idx)  # the same sum through per-lookup autograd leaves
    reference = (looked_up[..., 0] * values).sum(dim=1)
    (reference * upstream).sum().backward()
    ((_, none, lookup_grad),) = table.take_gradients()
    assert torch.equal(summed.detach(), reference.detach())
    assert idx_ is idx and values_ is values and none is None
    assert torch.equal(grad.unsqueeze(1) * values, lookup_grad[..., 0])


def _reference_step(weight: np.ndarray, precision: np.ndarray, idx, values, grad, curvature, max_step: float) -> None:
    """The optimiser's step, in float64, one row at a time: every lookup (padding too) adds its
    example's curvature to its row's precision, and the row moves by −Σg / precision."""
    rows = idx.numpy().reshape(-1)
    g = (grad.numpy()[:, None] * values.numpy()).reshape(-1)
    h = np.repeat(curvature.numpy(), idx.shape[1])
    for row in np.unique(rows):
        at = rows == row
        precision[row] += h[at].sum()
        weight[row] += np.clip(-g[at].sum() / precision[row], -max_step, max_step)


def _reference_replay(precision: np.ndarray, idx, values, grad, curvature) -> np.ndarray:
    """Each example's logit shift from the Newton steps of the earlier lookups of its rows, in
    lookup order (an example's second lookup of a row sees its first, as in the replay)."""
    seen_g: dict[int, float] = {}
    seen_h: dict[int, float] = {}
    out = np.zeros(idx.shape[0])
    for b in range(idx.shape[0]):
        for w in range(idx.shape[1]):
            row, v = int(idx[b, w]), float(values[b, w])
            if v:
                out[b] += v * -seen_g.get(row, 0.0) / (precision[row] + seen_h.get(row, 0.0))
                seen_g[row] = seen_g.get(row, 0.0) + float(grad[b]) * v
                seen_h[row] = seen_h.get(row, 0.0) + float(curvature[b])
    return out


@pytest.mark.parametrize("max_step", [0.0, 0.05])
def test_first_order_step_and_replay_match_a_row_by_row_reference(max_step: float) -> None:
    idx, values = _lookups(2)
    table = SparseTable(PAD + 1, 0, padding_row=PAD)
    table.train()
    opt = RowOptimizer({"words": table}, lr=0.02, initial_accumulator=0.1, wide_prior=2.0, wide_max_step=max_step)
    torch.manual_seed(3)
    table.weight.data[:PAD, 0] = torch.randn(PAD) * 0.1
    opt.accum["words"][:PAD, 0] += torch.rand(PAD)
    weight, precision = (
        table.weight.detach().double().numpy()[:, 0].copy(),
        opt.accum["words"].double().numpy()[:, 0].copy(),
    )
    grad, curvature = torch.randn(idx.shape[0]) * 0.5, torch.rand(idx.shape[0]) * 0.25

    shift = opt.in_batch_multi_shift("words", idx, values, grad, curvature)
    if not max_step:  # (the replay clamps each lookup's step; the reference does not)
        expected = _reference_replay(precision, idx, values, grad, curvature)
        np.testing.assert_allclose(shift.numpy(), expected, rtol=1e-4, atol=1e-6)

    (table.weighted_sum(idx, values) * grad).sum().backward()
    opt.step(curvature)
    _reference_step(weight, precision, idx, values, grad, curvature, max_step or np.inf)
    np.testing.assert_allclose(table.weight.detach().numpy()[:PAD, 0], weight[:PAD], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(opt.accum["words"].numpy()[:PAD, 0], precision[:PAD], rtol=1e-5)
    assert float(table.weight[PAD, 0]) == 0.0  # padding never moves

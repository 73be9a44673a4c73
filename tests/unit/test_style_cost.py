"""The seed's style-transfer cost on tiny tensors, against values computed by hand."""

from __future__ import annotations

import pytest
import torch

from models.errors import StyleError
from models.style.cost import (
    CostWeights,
    StyleCost,
    StyleTarget,
    calibrate,
    content_cost,
    gram,
    layer_style_cost,
    style_cost,
    style_targets,
    total_variation,
)

# n_C = 2 channels, n_H = 1, n_W = 2: channel 0 = [1, 2], channel 1 = [3, 4]
A = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])
ONES = torch.ones(1, 2, 1, 2)


def test_content_cost_is_the_seeds_normalised_squared_difference():
    # (1 + 4 + 9 + 16) / (4 * n_H * n_W * n_C) = 30 / 16
    assert content_cost(A, torch.zeros_like(A)).item() == pytest.approx(1.875)
    assert content_cost(A, A).item() == 0.0


def test_gram_sums_products_over_positions():
    assert gram(A)[0].tolist() == [[5.0, 11.0], [11.0, 25.0]]


def test_layer_style_cost_by_hand():
    # G(S) = [[5, 11], [11, 25]], G(G) = [[2, 2], [2, 2]]: (9 + 81 + 81 + 529) / (2 * 1 * 2 * 2)^2 = 700 / 64
    target = style_targets({"l": A})["l"]
    assert target.positions == 2
    assert layer_style_cost(target, ONES).item() == pytest.approx(700 / 64)
    assert layer_style_cost(target, A).item() == 0.0


def test_style_image_of_another_size_is_rescaled_to_the_generated_positions():
    tiled = torch.cat([A, A], dim=3)  # the same texture over 4 positions: Gram doubles, positions double
    target = style_targets({"l": tiled})["l"]
    assert target.positions == 4
    assert layer_style_cost(target, ONES).item() == pytest.approx(700 / 64)


def test_multi_layer_style_cost_weights_each_layer():
    targets = {"a": StyleTarget(gram(A)[0], 2), "b": StyleTarget(gram(ONES)[0], 2)}
    acts = {"a": ONES, "b": A}
    # layer b: G(S) = [[2,2],[2,2]], G(G) = [[5,11],[11,25]] -> the same 700 / 64
    assert style_cost(targets, acts, {"a": 0.5, "b": 2.0}).item() == pytest.approx(2.5 * 700 / 64)


def test_batches_average_over_images():
    batch = torch.cat([A, ONES])
    target = style_targets({"l": A})["l"]
    assert layer_style_cost(target, batch).item() == pytest.approx(700 / 64 / 2)
    assert content_cost(torch.cat([A, A]), torch.cat([A, torch.zeros_like(A)])).item() == pytest.approx(1.875 / 2)


def test_total_variation_by_hand():
    x = torch.tensor([[[[0.0, 1.0], [3.0, 5.0]]]])
    # vertical (3-0)^2, (5-1)^2 -> mean 12.5; horizontal (1-0)^2, (5-3)^2 -> mean 2.5
    assert total_variation(x).item() == pytest.approx(15.0)


def test_calibration_makes_style_start_at_one_and_content_relative():
    s = {"a": A * 2, "b": A + 1}
    ref = {"a": ONES, "b": A}
    targets = style_targets(s)
    w = calibrate(targets, ref, "b", strength=3.0, tv=0.5)
    assert (w.beta, w.tv) == (3.0, 0.5)
    per_layer = {name: lam * layer_style_cost(targets[name], ref[name]).item() for name, lam in w.layer_weights}
    assert per_layer == pytest.approx({"a": 0.5, "b": 0.5})  # equal shares by default
    assert w.alpha * content_cost(A, torch.zeros_like(A)).item() == pytest.approx(1.0)  # relative to ref's energy
    cost = StyleCost(targets, "b", w)
    terms = cost(ref, torch.zeros_like(A), torch.zeros(1, 3, 4, 4))
    assert terms.style.item() == pytest.approx(1.0)
    assert terms.content.item() == pytest.approx(1.0)
    assert terms.total.item() == pytest.approx(1.0 + 3.0 * 1.0 + 0.5 * 0.0)
    lopsided = calibrate(targets, ref, "b", strength=1.0, lambdas=[3, 1])
    shares = {n: lam * layer_style_cost(targets[n], ref[n]).item() for n, lam in lopsided.layer_weights}
    assert shares == pytest.approx({"a": 0.75, "b": 0.25})


def test_cost_weights_round_trip_and_bad_values():
    w = CostWeights(alpha=2.0, beta=10.0, tv=0.0, layer_weights=(("a", 0.25), ("b", 4.0)))
    assert CostWeights.from_json(w.to_json()) == w
    with pytest.raises(StyleError, match="malformed"):
        CostWeights.from_json({"alpha": 1})
    targets = style_targets({"a": A})
    with pytest.raises(StyleError, match="positive"):
        calibrate(targets, {"a": A}, "a", strength=0)
    with pytest.raises(StyleError, match="layer weights"):
        calibrate(targets, {"a": A}, "a", strength=1, lambdas=[1, 2])
    with pytest.raises(StyleError, match="no layer weight"):
        StyleCost(targets, "a", CostWeights(1, 1, 0, ()))


def test_lbfgs_restarts_when_its_line_search_stalls_and_keeps_the_best():
    from tqdm import tqdm

    from models.style.cost import CostTerms
    from models.style.optimize import _lbfgs, _Run

    def cost(acts, _content, _image):  # a kink at the minimum: curvature pairs go stale, the line search stalls
        total = (acts["a"] - 3).abs().sum() + 0.1 * ((acts["a"] - 3) ** 2).sum()
        zero = torch.zeros(())
        return CostTerms(total, zero, zero, zero)

    x = torch.zeros(1, 3, 2, 2, requires_grad=True)
    with tqdm(disable=True) as bar:
        run = _Run(lambda t: {"a": t}, cost, torch.zeros(()), bar)
        restarts = _lbfgs(run, x, budget=400)
    best, end, start = run.outcome()
    assert restarts >= 1
    assert start.total.item() == pytest.approx(12 * 3 + 0.1 * 12 * 9)
    assert end.total.item() < 1e-2 * start.total.item() and end.total.item() == pytest.approx(min(run.history))
    assert torch.allclose(best, torch.full_like(best, 3.0), atol=0.05)
    assert len(run.history) <= 400 + 25  # the budget, give or take the last line search

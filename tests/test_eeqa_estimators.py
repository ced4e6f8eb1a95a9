"""EEQA's per-token estimators against independent float64 references and the float32 forms
they replaced: odd sizes, T=0, zero rows, non-contiguous views, half precision, the per-expert
scale, and the regimes where ``1 - cos`` cancels (small, nearly parallel and cancelling
contributions)."""

import pytest
import torch

from smartfed.eeqa import cosine_importance, gradient_importance, magnitude_importance
from smartfed.eeqa import importance as importance_module

TINY = torch.finfo(torch.float32).tiny
EPS32 = torch.finfo(torch.float32).eps


def unit_difference_cosine(y0, delta):
    """The float32 form the fused estimator replaced: ``||u - v||^2 / 2`` on the unit vectors."""
    base = y0.reshape(-1, y0.shape[-1]).float()
    out = base + delta.reshape(-1, delta.shape[-1]).float()
    unit_base = base / base.norm(dim=-1, keepdim=True).clamp_min(TINY)
    unit_out = out / out.norm(dim=-1, keepdim=True).clamp_min(TINY)
    return 0.5 * (unit_base - unit_out).pow(2).sum(dim=-1)


def projected_cosine(y0, delta, scale=1.0):
    """``1 - cos(b, b + d)`` in float64 from the part of d perpendicular to b (an explicit
    projection, not the estimator's Gram identity): ``sin = |p| / |o|``, then
    ``1 - cos = sin^2 / (1 + cos)`` where cos > 0. Zero vectors as in the estimator's docstring."""
    b = y0.reshape(-1, y0.shape[-1]).double()
    d = delta.reshape(-1, delta.shape[-1]).double() * scale
    o = b + d
    base_sq = (b * b).sum(-1)
    perpendicular = d - ((b * d).sum(-1) / base_sq.clamp_min(1e-300))[:, None] * b
    out_norm, base_norm = o.norm(dim=-1), base_sq.sqrt()
    cos = (b * o).sum(-1) / (base_norm * out_norm)
    sin_sq = (perpendicular.norm(dim=-1) / out_norm) ** 2
    value = torch.where(cos > 0, sin_sq / (1 + cos), 1 - cos)
    one_zero = 0.5 * ((base_norm > 0).double() + (out_norm > 0).double())
    return torch.where((base_norm > 0) & (out_norm > 0), value, one_zero)


def random_pair(generator, shape, scale):
    return torch.randn(*shape, generator=generator), torch.randn(*shape, generator=generator) * scale


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (2, 9, 37), (3, 1, 576), (913, 17)])
@pytest.mark.parametrize("size", [1e-3, 0.3, 3.0])
def test_cosine_matches_a_float64_reference_to_float32_rounding(shape, size):
    y0, delta = random_pair(torch.Generator().manual_seed(shape[-1]), shape, size)
    expected = projected_cosine(y0, delta)
    measured = cosine_importance(y0, delta)
    assert measured.dtype == torch.float32 and measured.shape == (expected.numel(),)
    torch.testing.assert_close(measured.double(), expected, rtol=4 * EPS32, atol=0)
    # and the float32 form it replaced agrees to that form's own precision
    torch.testing.assert_close(unit_difference_cosine(y0, delta).double(), expected, rtol=1e-4, atol=1e-7)


def test_cosine_is_at_least_as_precise_as_the_unit_vector_form_where_it_cancels():
    generator = torch.Generator().manual_seed(1)
    rows, width = 300, 577
    base = torch.randn(rows, width, generator=generator)
    noise = torch.randn(rows, width, generator=generator)
    cases = {
        "small": (base, noise * 1e-4),
        "nearly parallel, large": (base, base * torch.logspace(-3, 1, rows)[:, None] + noise * 1e-5),
        "nearly parallel, small": (base, base * 1e-3 + noise * 1e-7),
        "nearly cancelling": (base, -base * (1 - torch.logspace(-4, -1, rows)[:, None]) + noise * 1e-3),
        "turned back": (base, -2 * base + noise * 0.1),
    }
    for name, (y0, delta) in cases.items():
        expected = projected_cosine(y0, delta)
        fused_error = (cosine_importance(y0, delta).double() - expected).abs()
        unit_error = (unit_difference_cosine(y0, delta).double() - expected).abs()
        # The docstring's bound: float32 rounding plus ~1e-15 (|d| / |o|)^2 from float64 sums.
        ratio_sq = (delta.double().norm(dim=-1) / (y0.double() + delta.double()).norm(dim=-1)) ** 2
        assert bool((fused_error <= 2 * EPS32 * expected + 1e-15 * ratio_sq).all()), name
        assert fused_error.max() <= unit_error.max(), name
        assert bool((cosine_importance(y0, delta) > 0).all()), name


def test_cosine_zero_rows_and_empty_inputs():
    generator = torch.Generator().manual_seed(2)
    y0, delta = random_pair(generator, (6, 11), 0.5)
    y0[1] = 0              # zero base, some output: one unit vector is zero
    delta[2] = -y0[2]      # output cancels exactly
    y0[3], delta[3] = 0, 0  # both zero
    delta[4] = 0           # no contribution
    measured = cosine_importance(y0, delta)
    torch.testing.assert_close(measured[1:5], torch.tensor([0.5, 0.5, 0.0, 0.0]), rtol=0, atol=0)
    torch.testing.assert_close(measured, unit_difference_cosine(y0, delta), rtol=1e-5, atol=1e-7)
    for estimator in (cosine_importance, magnitude_importance, gradient_importance):
        empty = estimator(torch.randn(0, 11), torch.randn(0, 11))
        assert empty.shape == (0,) and empty.dtype == torch.float32
        assert estimator(torch.randn(2, 0, 5), torch.randn(2, 0, 5)).shape == (0,)


def test_estimators_read_non_contiguous_views():
    generator = torch.Generator().manual_seed(3)
    wide_y0, wide_delta = random_pair(generator, (9, 5, 40), 0.2)
    y0, delta = wide_y0.transpose(0, 1)[..., ::2], wide_delta.transpose(0, 1)[..., 1::2]
    assert not y0.is_contiguous() and not delta.is_contiguous()
    for estimator in (cosine_importance, magnitude_importance, gradient_importance):
        torch.testing.assert_close(estimator(y0, delta), estimator(y0.contiguous(), delta.contiguous()),
                                   rtol=1e-6, atol=0)
    torch.testing.assert_close(cosine_importance(y0, delta).double(), projected_cosine(y0, delta),
                               rtol=4 * EPS32, atol=0)


@pytest.mark.parametrize("scale", [1.0, 0.25, 1 / 3])
def test_scale_measures_the_scaled_contribution_without_forming_it(scale):
    generator = torch.Generator().manual_seed(4)
    y0, delta = random_pair(generator, (4, 7, 23), 0.8)
    grad = torch.randn(4, 7, 23, generator=generator)
    scaled = delta * scale
    torch.testing.assert_close(cosine_importance(y0, delta, scale=scale), cosine_importance(y0, scaled),
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(cosine_importance(y0, delta, scale=scale).double(),
                               projected_cosine(y0, delta, scale), rtol=4 * EPS32, atol=0)
    b, d, g = y0.reshape(-1, 23).double(), scaled.reshape(-1, 23).double(), grad.reshape(-1, 23).double()
    torch.testing.assert_close(magnitude_importance(y0, delta, scale=scale).double(),
                               d.norm(dim=-1) / b.norm(dim=-1), rtol=1e-6, atol=0)
    torch.testing.assert_close(gradient_importance(grad, delta, scale=scale).double(),
                               (g * d).sum(-1).abs(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_estimators_take_any_float_dtype_and_answer_float32(dtype):
    generator = torch.Generator().manual_seed(5)
    y0, delta = (t.to(dtype) for t in random_pair(generator, (5, 19), 0.4))
    grad = torch.randn(5, 19, generator=generator).to(dtype)
    for estimator, first in ((cosine_importance, y0), (magnitude_importance, y0), (gradient_importance, grad)):
        measured = estimator(first, delta)
        assert measured.dtype == torch.float32
        expected = estimator(first.double(), delta.double())
        torch.testing.assert_close(measured, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(cosine_importance(y0, delta).double(), projected_cosine(y0, delta),
                               rtol=4 * EPS32, atol=0)


def test_cosine_blocks_agree_with_one_block(monkeypatch):
    y0, delta = random_pair(torch.Generator().manual_seed(6), (101, 13), 0.5)
    whole = cosine_importance(y0, delta)
    monkeypatch.setattr(importance_module, "_BLOCK_BYTES", 16 * 13 * 7)  # 15 blocks of 7 or 6 rows
    torch.testing.assert_close(cosine_importance(y0, delta), whole, rtol=0, atol=0)


def test_estimators_do_not_touch_autograd():
    generator = torch.Generator().manual_seed(7)
    y0 = torch.randn(3, 8, generator=generator, requires_grad=True)
    delta = torch.randn(3, 8, generator=generator, requires_grad=True)
    for estimator in (cosine_importance, magnitude_importance, gradient_importance):
        measured = estimator(y0, delta)
        assert measured.grad_fn is None and not measured.requires_grad
    assert y0.grad is None and delta.grad is None


def test_estimators_name_mismatched_shapes():
    with pytest.raises(ValueError, match=r"y0 and delta must have the same shape, got \(2, 3\) and \(2, 4\)"):
        cosine_importance(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"grad_output and delta must have the same shape"):
        gradient_importance(torch.randn(2, 3), torch.randn(3, 3))

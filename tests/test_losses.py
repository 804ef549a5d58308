"""Each distillation loss against its formula: the value, and the gradient autograd gives
against the closed form derived by hand."""

from __future__ import annotations

import math

import pytest
import torch

from distkd.objectives.losses import hint_mse, listwise_kl, logit_mse, masked_bce, soft_bce

pytestmark = pytest.mark.unit

torch.manual_seed(0)
B, T = 12, 2


def _student():
    return torch.randn(B, T, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_soft_bce_gradient_is_tau_times_probability_gap(tau):
    s, t = _student(), torch.randn(B, T, dtype=torch.float64) * 2
    loss = soft_bce(s, t, tau)
    p_t = torch.sigmoid(t / tau)
    direct = -(p_t * torch.log(torch.sigmoid(s / tau)) + (1 - p_t) * torch.log(1 - torch.sigmoid(s / tau)))
    torch.testing.assert_close(loss, (direct * tau**2).mean(0))
    loss.sum().backward()
    expected = tau * (torch.sigmoid(s / tau) - p_t) / B
    torch.testing.assert_close(s.grad, expected.detach())


def test_soft_bce_is_minimized_at_the_teacher():
    t = torch.randn(B, T, dtype=torch.float64)
    s = t.clone().requires_grad_(True)
    soft_bce(s, t, 2.0).sum().backward()
    assert s.grad.abs().max() < 1e-12


def test_logit_mse_gradient():
    s, t = _student(), torch.randn(B, T, dtype=torch.float64)
    logit_mse(s, t).sum().backward()
    torch.testing.assert_close(s.grad, (2 * (s - t) / B).detach())


def test_masked_rows_get_no_gradient():
    s, t = _student(), torch.randn(B, T, dtype=torch.float64)
    mask = torch.arange(B) % 3 != 0
    soft_bce(s, t, 1.0, mask).sum().backward()
    assert (s.grad[~mask] == 0).all()
    expected = (torch.sigmoid(s) - torch.sigmoid(t)) / mask.sum()
    torch.testing.assert_close(s.grad[mask], expected[mask].detach())


def test_hard_bce_skips_missing_labels():
    s = _student()
    y = torch.randint(0, 2, (B, T)).double()
    y[::4, 0] = float("nan")
    loss = masked_bce(s, y)
    keep = ~torch.isnan(y[:, 0])
    direct0 = torch.nn.functional.binary_cross_entropy_with_logits(s[keep, 0], y[keep, 0])
    torch.testing.assert_close(loss[0], direct0)
    loss.sum().backward()
    assert (s.grad[~keep, 0] == 0).all()
    torch.testing.assert_close(s.grad[keep, 0], ((torch.sigmoid(s[keep, 0]) - y[keep, 0]) / keep.sum()).detach())


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_listwise_kl_matches_per_request_softmax(tau):
    s, t = _student(), torch.randn(B, T, dtype=torch.float64)
    # Requests of sizes 4, 1, 3, 4 — not contiguous, to show grouping is by id, not position.
    groups = torch.tensor([7, 7, 3, 9, 9, 7, 9, 7, 5, 5, 5, 5])[torch.randperm(B)]
    loss = listwise_kl(s, t, groups, tau)
    # Direct: for every request with >= 2 rows, KL(softmax(t/tau) || softmax(s/tau)) per task.
    kls = []
    for g in groups.unique():
        rows = groups == g
        if rows.sum() < 2:
            continue
        p = torch.softmax(t[rows] / tau, 0)
        kls.append((p * (torch.log(p) - torch.log_softmax(s[rows] / tau, 0))).sum(0))
    direct = torch.stack(kls).mean(0) * tau**2
    torch.testing.assert_close(loss, direct)
    loss.sum().backward()
    # d/ds of tau² KL = tau (softmax(s/tau) - softmax(t/tau)) within each request, / n_requests.
    expected = torch.zeros_like(s)
    for g in groups.unique():
        rows = groups == g
        if rows.sum() < 2:
            continue
        expected[rows] = tau * (torch.softmax(s[rows] / tau, 0) - torch.softmax(t[rows] / tau, 0)) / len(kls)
    torch.testing.assert_close(s.grad, expected.detach())


def test_listwise_is_shift_invariant_within_a_request():
    s, t = _student(), torch.randn(B, T, dtype=torch.float64)
    groups = torch.arange(B) // 4
    a = listwise_kl(s, t, groups, 1.0)
    b = listwise_kl(s + 5.0, t - 3.0, groups, 1.0)
    torch.testing.assert_close(a, b)


def test_hint_mse_gradient_reaches_the_projection():
    proj = torch.nn.Linear(5, 3).double()
    h = torch.randn(B, 5, dtype=torch.float64)
    target = torch.randn(B, 3, dtype=torch.float64)
    loss = hint_mse(proj(h), target)
    direct = ((proj(h) - target) ** 2).mean()
    torch.testing.assert_close(loss, direct)
    loss.backward()
    err = (proj(h) - target).detach()
    torch.testing.assert_close(proj.weight.grad, 2 * err.T @ h / (B * 3))


def test_temperature_scaling_keeps_gradient_size():
    """With tau² scaling the soft-label gradient stays O(1) as tau grows (without it, it
    would vanish like 1/tau): tau * (sigmoid(0) - sigmoid(1/tau)) -> -1/4."""
    s, t = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True), torch.ones(1, 1, dtype=torch.float64)
    soft_bce(s, t, 100.0).sum().backward()
    assert math.isclose(s.grad.item(), -0.25, rel_tol=1e-3)

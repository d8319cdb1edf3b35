"""EMD and the multi-patch losses against METHOD.md's formulas, scipy, and autograd.

Distances are checked against independent computations (scipy's Wasserstein distance, hand
arithmetic, a direct NumPy transcription of METHOD.md); gradients with float64 ``gradcheck``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.stats import wasserstein_distance

from model.losses import emd, mpemd_loss, nima_loss, patch_certainty

N = 10
BINS = np.arange(1, N + 1, dtype=np.float64)
HYPOTHESIS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def distributions(draw: st.DrawFn, n: int = N) -> np.ndarray:
    """A probability vector over ``n`` bins, with zeros allowed (one-hot included)."""
    weights = draw(arrays(np.float64, n, elements=st.floats(0.0, 1.0, allow_subnormal=False)))
    if weights.sum() <= 1e-6:
        weights[draw(st.integers(0, n - 1))] = 1.0
    return weights / weights.sum()


def t64(x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def emd_ref(p: np.ndarray, q: np.ndarray, r: float = 2.0) -> np.ndarray:
    """METHOD.md verbatim: ((1/N) * sum_k |F(k) - G(k)|^r)^(1/r)."""
    cdf_p, cdf_q = np.cumsum(p, axis=-1), np.cumsum(q, axis=-1)
    return (np.sum(np.abs(cdf_p - cdf_q) ** r, axis=-1) / p.shape[-1]) ** (1.0 / r)


def mpemd_ref(patch_probs: np.ndarray, target: np.ndarray, k: float = 1.2, gamma: float = 0.4,
              eps: float = 1e-6, adaptive: bool = True) -> float:
    """METHOD.md's MPEMD_ada / MPEMD_avg, one loop per image and patch, averaged over the batch."""
    per_image = []
    for probs, p in zip(patch_probs, target, strict=True):
        terms = []
        for p_hat in probs:
            emd_j = emd_ref(p, p_hat, 2.0)
            emdc_j = max(eps, 1.0 - k * emd_j)
            w_j = 1.0 - emdc_j ** gamma
            terms.append((w_j if adaptive else 1.0) * math.log(emdc_j))
        per_image.append(-sum(terms) / len(terms))
    return float(np.mean(per_image))


def one_hot(index: int) -> np.ndarray:
    v = np.zeros(N)
    v[index] = 1.0
    return v


# ---- emd: metric properties ---------------------------------------------------------------------

@HYPOTHESIS
@given(distributions(), distributions(), st.sampled_from([1.0, 2.0]))
def test_emd_zero_iff_equal(p, q, r):
    assert float(emd(t64(p), t64(p), r=r)) == 0.0
    d = float(emd(t64(p), t64(q), r=r))
    cdf_gap = np.abs(np.cumsum(p) - np.cumsum(q)).max()
    if cdf_gap > 1e-9:
        assert d > 0.0
    else:
        assert d <= 1e-9


@HYPOTHESIS
@given(distributions(), distributions(), st.sampled_from([1.0, 2.0, 3.0]))
def test_emd_symmetric(p, q, r):
    assert float(emd(t64(p), t64(q), r=r)) == pytest.approx(float(emd(t64(q), t64(p), r=r)), abs=1e-12)


@HYPOTHESIS
@given(distributions(), distributions(), distributions(), st.sampled_from([1.0, 2.0]))
def test_emd_triangle_inequality(p, q, s, r):
    d = lambda a, b: float(emd(t64(a), t64(b), r=r))  # noqa: E731
    assert d(p, s) <= d(p, q) + d(q, s) + 1e-12


@HYPOTHESIS
@given(distributions(), distributions())
def test_emd1_equals_scipy_wasserstein_over_n(p, q):
    # scipy integrates |F - G| over the rating axis (unit spacing): sum_k |F(k) - G(k)|.
    # METHOD.md puts 1/N in front, so EMD_1 = wasserstein / N.
    expected = wasserstein_distance(BINS, BINS, u_weights=p, v_weights=q) / N
    assert float(emd(t64(p), t64(q), r=1)) == pytest.approx(expected, abs=1e-12)


@HYPOTHESIS
@given(distributions(), distributions(), st.sampled_from([1.0, 2.0, 3.0]))
def test_emd_matches_method_formula(p, q, r):
    assert float(emd(t64(p), t64(q), r=r)) == pytest.approx(float(emd_ref(p, q, r)), abs=1e-12)


def test_emd2_hand_computed_examples():
    # One-hot at rating 1 vs rating 10: |F - G| = 1 at k = 1..9, 0 at k = 10.
    assert float(emd(t64(one_hot(0)), t64(one_hot(9)))) == pytest.approx(math.sqrt(9 / 10))
    assert float(emd(t64(one_hot(0)), t64(one_hot(9)), r=1)) == pytest.approx(9 / 10)
    # Neighbouring ratings: a single unit CDF gap.
    assert float(emd(t64(one_hot(3)), t64(one_hot(4)))) == pytest.approx(math.sqrt(1 / 10))
    # Half the mass moved by one bin: |F - G| = 0.5 once -> sqrt(0.25 / 10) = 0.158113...
    p = one_hot(4)
    q = 0.5 * one_hot(4) + 0.5 * one_hot(5)
    assert float(emd(t64(p), t64(q))) == pytest.approx(0.15811388300841897)
    # Uniform vs one-hot at 1: F = 1 everywhere, G(k) = k/10 -> sum (1 - k/10)^2 = 2.85.
    assert float(emd(t64(one_hot(0)), t64(np.full(N, 0.1)))) == pytest.approx(math.sqrt(2.85 / 10))


def test_emd_is_batched_over_leading_dims():
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(3, 4, N, generator=gen, dtype=torch.float64), -1)
    q = torch.softmax(torch.randn(3, 4, N, generator=gen, dtype=torch.float64), -1)
    out = emd(p, q)
    assert out.shape == (3, 4)
    np.testing.assert_allclose(out.numpy(), emd_ref(p.numpy(), q.numpy()), atol=1e-12)


def test_emd_rejects_r_below_one():
    with pytest.raises(ValueError):
        emd(t64(one_hot(0)), t64(one_hot(1)), r=0.5)


def test_nima_loss_is_batch_mean_of_emd():
    gen = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(5, N, generator=gen, dtype=torch.float64), -1)
    q = torch.softmax(torch.randn(5, N, generator=gen, dtype=torch.float64), -1)
    assert float(nima_loss(q, p)) == pytest.approx(float(emd_ref(p.numpy(), q.numpy()).mean()), abs=1e-12)


# ---- mpemd_loss against a direct transcription -------------------------------------------------

@HYPOTHESIS
@given(
    st.integers(1, 3).flatmap(lambda b: st.tuples(
        st.lists(st.lists(distributions(), min_size=1, max_size=4).map(np.stack), min_size=b, max_size=b),
        st.lists(distributions(), min_size=b, max_size=b),
    )),
    st.booleans(),
    st.sampled_from([(1.2, 0.4), (1.0, 1.0), (2.0, 0.1), (3.0, 2.5)]),
)
def test_mpemd_loss_matches_numpy_transcription(batch, adaptive, k_gamma):
    patch_lists, targets = batch
    n_patches = min(len(x) for x in patch_lists)  # a rectangular (B, P, N) batch
    patch_probs = np.stack([x[:n_patches] for x in patch_lists])
    target = np.stack(targets)
    k, gamma = k_gamma
    expected = mpemd_ref(patch_probs, target, k=k, gamma=gamma, adaptive=adaptive)
    got = mpemd_loss(t64(patch_probs), t64(target), k=k, gamma=gamma, adaptive=adaptive)
    assert float(got) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # detaching the weight changes gradients, never the value
    detached = mpemd_loss(t64(patch_probs), t64(target), k=k, gamma=gamma, adaptive=adaptive, detach_weight=True)
    assert float(detached) == pytest.approx(float(got), abs=1e-15)


def test_mpemd_defaults_are_methods():
    """Defaults k=1.2, gamma=0.4, eps=1e-6, adaptive (METHOD.md) on a fixed example."""
    gen = torch.Generator().manual_seed(2)
    probs = torch.softmax(torch.randn(2, 8, N, generator=gen, dtype=torch.float64), -1)
    target = torch.softmax(torch.randn(2, N, generator=gen, dtype=torch.float64), -1)
    expected = mpemd_ref(probs.numpy(), target.numpy(), k=1.2, gamma=0.4, eps=1e-6, adaptive=True)
    assert float(mpemd_loss(probs, target)) == pytest.approx(expected, rel=1e-12)


def test_mpemd_adaptive_weights_hard_patches_more():
    """A badly predicted patch gets a bigger weight w_j than a good one, and ada <= avg."""
    target = t64(one_hot(4))[None]
    good, bad = t64(0.8 * one_hot(4) + 0.2 * one_hot(5)), t64(0.5 * one_hot(1) + 0.5 * one_hot(7))
    probs = torch.stack([good, bad])[None]
    ada, avg = mpemd_loss(probs, target), mpemd_loss(probs, target, adaptive=False)
    assert 0 < float(ada) < float(avg)
    emds = emd(target.expand(2, N), probs[0])
    weights = 1 - patch_certainty(emds).pow(0.4)
    assert float(weights[1]) > float(weights[0]) > 0


def test_mpemd_clamped_certainty_value():
    """EMD beyond 1/k clamps the certainty at eps: loss = -(1 - eps^gamma) * log(eps)."""
    eps, gamma = 1e-6, 0.4
    target, pred = t64(one_hot(0))[None], t64(one_hot(9))[None, None]  # EMD_2 = 0.949, k*EMD > 1
    expected_ada = -(1 - eps ** gamma) * math.log(eps)
    assert float(mpemd_loss(pred, target)) == pytest.approx(expected_ada)
    assert float(mpemd_loss(pred, target, adaptive=False)) == pytest.approx(-math.log(eps))


def test_mpemd_rejects_bad_shapes():
    with pytest.raises(ValueError):
        mpemd_loss(torch.rand(2, N), torch.rand(2, N))
    with pytest.raises(ValueError):
        mpemd_loss(torch.rand(2, 3, N), torch.rand(3, N))


# ---- gradients ------------------------------------------------------------------------------------

def _generic(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(*shape, generator=gen, dtype=torch.float64), -1).requires_grad_()


@pytest.mark.parametrize("r", [2.0, 3.0])
def test_gradcheck_emd(r):
    p, q = _generic((3, N), 10), _generic((3, N), 11)
    assert torch.autograd.gradcheck(lambda a, b: emd(a, b, r=r), (p, q))


@pytest.mark.parametrize("r", [1.0, 2.0, 3.0])
def test_gradcheck_emd_through_softmax(r):
    # On the simplex the last CDF gap is always 0, where |x| has a kink; finite differences on raw
    # probabilities leave the simplex, so r=1 is checked through logits (as in training).
    gen = torch.Generator().manual_seed(16)
    a, b = (torch.randn(3, N, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(2))
    assert torch.autograd.gradcheck(lambda x, y: emd(torch.softmax(x, -1), torch.softmax(y, -1), r=r), (a, b),
                                     fast_mode=True)  # a random projection of the Jacobian: 20x faster


def test_gradcheck_nima_loss():
    assert torch.autograd.gradcheck(nima_loss, (_generic((4, N), 12), _generic((4, N), 13)))


@pytest.mark.parametrize("adaptive, detach_weight", [(True, False), (True, True), (False, False)])
def test_gradcheck_mpemd_loss(adaptive, detach_weight):
    probs, target = _generic((2, 3, N), 14), _generic((2, N), 15)
    # a generic point: no patch at the clamp, none at EMD = 0
    emds = emd(target.detach()[:, None].expand(2, 3, N), probs.detach())
    assert bool(((emds > 1e-3) & (1.2 * emds < 0.99)).all())

    def loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return mpemd_loss(a, b, adaptive=adaptive, detach_weight=detach_weight)

    if detach_weight:
        # gradcheck's finite differences see w_j move; compare instead with w_j frozen by hand.
        frozen_w = 1 - patch_certainty(emds).pow(0.4)

        def frozen(a: torch.Tensor) -> torch.Tensor:
            c = patch_certainty(emd(target.detach()[:, None].expand_as(a), a))
            return -(frozen_w * torch.log(c)).mean(1).mean()

        assert torch.autograd.gradcheck(frozen, (probs,))
        (analytic,) = torch.autograd.grad(loss(probs, target.detach()), probs)
        (reference,) = torch.autograd.grad(frozen(probs), probs)
        torch.testing.assert_close(analytic, reference)
        (flowing,) = torch.autograd.grad(mpemd_loss(probs, target.detach()), probs)
        assert not torch.allclose(analytic, flowing)  # the option really changes the gradient
    else:
        assert torch.autograd.gradcheck(loss, (probs, target))


# ---- numerical safety -----------------------------------------------------------------------------

SAFETY_CASES = {
    "one-hot vs one-hot (clamped)": (one_hot(0), one_hot(9)),
    "one-hot vs its neighbour": (one_hot(4), one_hot(5)),
    "uniform vs uniform (EMD 0)": (np.full(N, 0.1), np.full(N, 0.1)),
    "uniform vs one-hot": (np.full(N, 0.1), one_hot(0)),
    "prediction equals one-hot target": (one_hot(7), one_hot(7)),
    "prediction equals generic target": (np.linspace(1, 2, N) / np.linspace(1, 2, N).sum(),) * 2,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(SAFETY_CASES))
def test_no_nan_or_inf_in_values_or_gradients(case, dtype):
    target_np, pred_np = SAFETY_CASES[case]
    target = torch.as_tensor(target_np, dtype=dtype)
    pred = torch.as_tensor(pred_np, dtype=dtype)
    losses = {
        "emd2": lambda x: emd(target, x).sum(),
        "emd1": lambda x: emd(target, x, r=1).sum(),
        "nima": lambda x: nima_loss(x[None], target[None]),
        "mpemd_ada": lambda x: mpemd_loss(x[None, None], target[None]),
        "mpemd_ada_detached": lambda x: mpemd_loss(x[None, None], target[None], detach_weight=True),
        "mpemd_avg": lambda x: mpemd_loss(x[None, None], target[None], adaptive=False),
    }
    for name, fn in losses.items():
        x = pred.clone().requires_grad_()
        value = fn(x)
        (grad,) = torch.autograd.grad(value, x)
        assert torch.isfinite(value), (name, value)
        assert torch.isfinite(grad).all(), (name, grad)
    # and through a softmax head, as in training
    logits = torch.log(pred.clamp_min(1e-12)).requires_grad_()
    loss = mpemd_loss(torch.softmax(logits, -1)[None, None], target[None])
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_emd_is_zero_with_zero_gradient_at_equality():
    p = t64(np.linspace(1, 3, N) / np.linspace(1, 3, N).sum()).requires_grad_()
    value = emd(p.detach(), p)
    (grad,) = torch.autograd.grad(value, p)
    assert value.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


@HYPOTHESIS
@given(st.lists(distributions(), min_size=2, max_size=4), distributions(),
       st.floats(0.05, 3.0), st.floats(0.05, 3.0), st.booleans())
def test_mpemd_finite_for_any_valid_input(patches, target, k, gamma, adaptive):
    probs = torch.as_tensor(np.stack(patches), dtype=torch.float32)[None].requires_grad_()
    loss = mpemd_loss(probs, torch.as_tensor(target, dtype=torch.float32)[None], k=k, gamma=gamma, adaptive=adaptive)
    (grad,) = torch.autograd.grad(loss, probs)
    assert torch.isfinite(loss) and loss.item() >= 0
    assert loss.item() <= -math.log(1e-6) + 1e-3  # bounded by the clamp
    assert torch.isfinite(grad).all()


def test_reduction_none_gives_each_images_loss() -> None:
    torch.manual_seed(0)
    target = torch.softmax(torch.randn(5, 10), dim=-1)
    probs = torch.softmax(torch.randn(5, 10), dim=-1)
    patches = torch.softmax(torch.randn(5, 3, 10), dim=-1)
    per_image = nima_loss(probs, target, reduction="none")
    assert per_image.shape == (5,)
    for i in range(5):
        assert float(per_image[i]) == pytest.approx(float(nima_loss(probs[i:i + 1], target[i:i + 1])), rel=1e-6)
    for adaptive in (True, False):
        each = mpemd_loss(patches, target, adaptive=adaptive, reduction="none")
        assert each.shape == (5,)
        assert float(each.mean()) == pytest.approx(float(mpemd_loss(patches, target, adaptive=adaptive)), rel=1e-6)
        assert float(each[2]) == pytest.approx(float(mpemd_loss(patches[2:3], target[2:3], adaptive=adaptive)),
                                               rel=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        nima_loss(probs, target, reduction="sum")

"""Each merge method against an independent float64 formula (numpy) and hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from exme.errors import ExmeError
from exme.merge import methods as M


def rand(shape, seed, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def f64(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def assert_close_f32(actual: torch.Tensor, expected: np.ndarray, rtol=1e-5, atol=1e-6):
    assert actual.dtype == torch.float32
    np.testing.assert_allclose(f64(actual), expected, rtol=rtol, atol=atol)


def one_step_bf16(actual: torch.Tensor, expected: np.ndarray):
    """bf16 result equals the float64 formula rounded once to bf16 (at most one step off at ties)."""
    assert actual.dtype == torch.bfloat16
    ref = torch.from_numpy(expected).to(torch.bfloat16).double().numpy()
    step = np.abs(ref) * 2.0**-7 + 1e-30
    assert np.all(np.abs(f64(actual) - ref) <= step)


# ------------------------------------------------------------------------------ extrapolate / exme


@settings(max_examples=25, deadline=None)
@given(alpha=st.floats(0, 5), seed=st.integers(0, 10_000))
def test_extrapolate_matches_formula(alpha, seed):
    theta, base = rand((7, 5), seed), rand((7, 5), seed + 1)
    expected = f64(theta) + alpha * (f64(theta) - f64(base))
    assert_close_f32(M.extrapolate(theta, base, alpha), expected, rtol=1e-5, atol=1e-5)


def test_extrapolate_alpha_zero_returns_theta_exactly():
    theta, base = rand((4, 4), 0, torch.bfloat16), rand((4, 4), 1, torch.bfloat16)
    assert torch.equal(M.extrapolate(theta, base, 0.0), theta)


def test_extrapolate_bf16_casts_once_from_float32():
    theta, base = rand((64, 64), 3, torch.bfloat16), rand((64, 64), 4, torch.bfloat16)
    out = M.extrapolate(theta, base, 0.7)
    one_step_bf16(out, f64(theta) + 0.7 * (f64(theta) - f64(base)))


def test_extrapolate_float64_on_request():
    theta, base = rand((5,), 0, torch.float64), rand((5,), 1, torch.float64)
    out = M.extrapolate(theta, base, 0.3, compute_dtype=torch.float64)
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), theta.numpy() + 0.3 * (theta.numpy() - base.numpy()), rtol=1e-15)


def test_extrapolate_negative_alpha_rejected():
    with pytest.raises(ExmeError, match="alpha must be >= 0"):
        M.extrapolate(rand((2,), 0), rand((2,), 1), -0.1)


@settings(max_examples=25, deadline=None)
@given(beta=st.floats(0, 1), a1=st.floats(0, 3), a2=st.floats(0, 3), seed=st.integers(0, 10_000))
def test_exme_two_models_matches_paper_equation(beta, a1, a2, seed):
    base, t1, t2 = rand((6, 3), seed), rand((6, 3), seed + 1), rand((6, 3), seed + 2)
    b, d1, d2 = f64(base), f64(t1) - f64(base), f64(t2) - f64(base)
    expected = b + beta * (1 + a1) * d1 + (1 - beta) * (1 + a2) * d2
    out = M.exme(base, [t1, t2], [beta, 1 - beta], [a1, a2])
    assert_close_f32(out, expected, rtol=1e-5, atol=1e-5)


def test_exme_equals_convex_combination_of_extrapolations():
    base, t1, t2, t3 = (rand((9,), s, torch.float64) for s in range(4))
    ws, als = [0.2, 0.5, 0.3], [0.1, 0.0, 1.5]
    expected = sum(w * (f64(t) + a * (f64(t) - f64(base))) for w, t, a in zip(ws, [t1, t2, t3], als))
    out = M.exme(base, [t1, t2, t3], ws, als, compute_dtype=torch.float64)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize(
    "weights, alphas, message",
    [([0.5, 0.6], [0, 0], "sum to 1"), ([1.2, -0.2], [0, 0], "sum to 1"), ([0.5, 0.5], [0, -1], "alphas must be >= 0")],
)
def test_exme_rejects_bad_weights_and_alphas(weights, alphas, message):
    base, t1, t2 = rand((3,), 0), rand((3,), 1), rand((3,), 2)
    with pytest.raises(ExmeError, match=message):
        M.exme(base, [t1, t2], weights, alphas)


# ------------------------------------------------------------------------------ linear / task arithmetic


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_formula(normalize):
    models = [rand((11, 4), s) for s in range(3)]
    ws = [0.5, 1.0, 2.5]
    num = sum(w * f64(m) for w, m in zip(ws, models))
    expected = num / sum(ws) if normalize else num
    assert_close_f32(M.linear(models, ws, normalize=normalize), expected, atol=1e-5)


def test_linear_output_dtype_defaults_to_first_input():
    models = [rand((8,), 0, torch.float16), rand((8,), 1, torch.bfloat16)]
    assert M.linear(models, [1, 1]).dtype == torch.float16
    assert M.linear(models, [1, 1], out_dtype=torch.float32).dtype == torch.float32


def test_linear_zero_weight_sum_rejected_when_normalizing():
    with pytest.raises(ExmeError, match="sum to 0"):
        M.linear([rand((2,), 0), rand((2,), 1)], [1.0, -1.0])


@settings(max_examples=20, deadline=None)
@given(
    w1=st.floats(-2, 2), w2=st.floats(-2, 2), lam=st.floats(0, 3), normalize=st.booleans(), seed=st.integers(0, 999)
)
def test_task_arithmetic_matches_formula(w1, w2, lam, normalize, seed):
    base, t1, t2 = rand((5, 5), seed), rand((5, 5), seed + 1), rand((5, 5), seed + 2)
    d = w1 * (f64(t1) - f64(base)) + w2 * (f64(t2) - f64(base))
    div = (w1 + w2) if normalize and abs(w1 + w2) >= 1e-8 else 1.0
    expected = f64(base) + lam * d / div
    out = M.task_arithmetic(base, [t1, t2], [w1, w2], lam, normalize=normalize)
    np.testing.assert_allclose(f64(out), expected, rtol=1e-4, atol=1e-4 * (1 + abs(lam / div) * 4))


def test_task_arithmetic_bf16_is_one_rounding_of_the_exact_result():
    base = rand((128, 64), 0, torch.bfloat16)
    t1 = (base.float() + rand((128, 64), 1, scale=0.01)).bfloat16()
    t2 = (base.float() + rand((128, 64), 2, scale=0.01)).bfloat16()
    expected = f64(base) + 0.7 * (f64(t1) - f64(base)) + 0.4 * (f64(t2) - f64(base))
    one_step_bf16(M.task_arithmetic(base, [t1, t2], [0.7, 0.4]), expected)


def test_inputs_are_never_modified():
    base, t1, t2 = rand((50,), 0), rand((50,), 1), rand((50,), 2)
    copies = [x.clone() for x in (base, t1, t2)]
    gen = M.tensor_generator(0, "w", "cpu")
    M.task_arithmetic(base, [t1, t2], [1, 1])
    M.ties(base, [t1, t2], [1, 1], 0.5)
    M.dare_ties(base, [t1, t2], [1, 1], 0.5, gen)
    M.extrapolate(t1, base, 0.5)
    M.exme(base, [t1, t2], [0.5, 0.5], [0.2, 0.2])
    M.slerp(t1, t2, 0.3)
    for x, c in zip((base, t1, t2), copies):
        assert torch.equal(x, c)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ExmeError, match="different shapes"):
        M.task_arithmetic(rand((2, 3), 0), [rand((3, 2), 1)], [1.0])


# ------------------------------------------------------------------------------ TIES


def ties_reference(base, models, weights, density, method="sum", normalize=True, lam=1.0):
    """TIES in float64 numpy with a full stable argsort (lowest flat index wins ties)."""
    b = f64(base).ravel()
    deltas = []
    for m, d in zip(models, density):
        delta = f64(m).ravel() - b
        k = max(1, int(d * delta.size))
        keep = np.zeros(delta.size, bool)
        if d >= 1:
            keep[:] = True
        elif k > 0:
            order = np.argsort(-np.abs(delta), kind="stable")
            keep[order[:k]] = True
        deltas.append(np.where(keep, delta, 0.0))
    wd = np.stack([w * d for w, d in zip(weights, deltas)])
    vote = wd.sum(0) if method == "sum" else np.sign(wd).sum(0)
    sign = np.where(vote >= 0, 1.0, -1.0)
    agree = np.sign(wd) == sign
    mixed = (wd * agree).sum(0)
    if normalize:
        div = (np.array(weights)[:, None] * agree).sum(0)
        div[div == 0] = 1
        mixed = mixed / div
    return (b + lam * mixed).reshape(base.shape)


@pytest.mark.usefixtures("both_paths")
def test_ties_hand_worked_case():
    # base 0; Δ1 = [3, -1, 0.5, -4], Δ2 = [-2, -2, 1, 1]; density 0.5 → keep 2 per model:
    # Δ1' = [3, 0, 0, -4], Δ2' = [-2, -2, 0, 0] (|−2| ties at index 0 and 1: both kept, k=2).
    # weights 1, 1: sum vote = [1, -2, 0, -4] → sign [+, -, +, -]
    # agree: entry0: Δ1 (3) only → 3 / 1; entry1: Δ2 (-2) → -2; entry2: none → 0; entry3: Δ1 → -4.
    base = torch.zeros(4)
    t1 = torch.tensor([3.0, -1.0, 0.5, -4.0])
    t2 = torch.tensor([-2.0, -2.0, 1.0, 1.0])
    out = M.ties(base, [t1, t2], [1.0, 1.0], 0.5)
    assert out.tolist() == [3.0, -2.0, 0.0, -4.0]
    # weights (2, 1), normalize off: wΔ1' = [6, 0, 0, -8], wΔ2' = [-2, -2, 0, 0] → [6, -2, 0, -8].
    out_w = M.ties(base, [t1, t2], [2.0, 1.0], 0.5, normalize=False)
    assert out_w.tolist() == [6.0, -2.0, 0.0, -8.0]


@pytest.mark.usefixtures("both_paths")
def test_ties_count_differs_from_sum_where_mass_and_votes_disagree():
    base = torch.zeros(1)
    models = [torch.tensor([-10.0]), torch.tensor([1.0]), torch.tensor([1.0])]
    assert M.ties(base, models, [1, 1, 1], 1.0, "sum").item() == -10.0
    assert M.ties(base, models, [1, 1, 1], 1.0, "count").item() == 1.0


@pytest.mark.usefixtures("both_paths")
@pytest.mark.parametrize("method", ["sum", "count"])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_float64_reference(method, normalize):
    base = rand((37, 29), 0)
    models = [base + rand((37, 29), s, scale=0.1) for s in (1, 2, 3)]
    ws, ds = [0.6, 1.0, 0.3], [0.3, 0.5, 1.0]
    out = M.ties(base, models, ws, ds, method, normalize, 0.9)
    expected = ties_reference(base, models, ws, ds, method, normalize, 0.9)
    np.testing.assert_allclose(f64(out), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("both_paths")
def test_ties_large_tensor_uses_sampled_threshold_and_matches_reference():
    shape = (700, 500)  # 350k entries: above the direct-selection size, so the band path runs
    base = rand(shape, 0)
    models = [base + rand(shape, s, scale=0.05) for s in (1, 2)]
    out = M.ties(base, models, [1.0, 1.0], 0.2)
    np.testing.assert_allclose(f64(out), ties_reference(base, models, [1, 1], [0.2, 0.2]), rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 400_000),
    density=st.floats(0.001, 0.999),
    seed=st.integers(0, 1000),
    kind=st.sampled_from(["normal", "heavy", "discrete", "constant"]),
)
def test_kth_largest_equals_full_sort(n, density, seed, kind):
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        v = torch.randn(n, generator=g).abs()
    elif kind == "heavy":
        v = torch.randn(n, generator=g).abs() ** 6
    elif kind == "discrete":
        v = torch.randint(0, 7, (n,), generator=g).float()
    else:
        v = torch.full((n,), 0.25)
    k = max(1, int(density * n))
    expected = torch.sort(v, descending=True).values[k - 1]
    assert M.kth_largest(v, k).item() == expected.item()


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 300_000), density=st.floats(0.01, 0.99), seed=st.integers(0, 1000))
def test_magnitude_mask_is_exact_topk(n, density, seed):
    g = torch.Generator().manual_seed(seed)
    delta = (torch.randn(n, generator=g) * 100).round() / 100  # many exact ties in magnitude
    mask = M.magnitude_mask(delta, density)
    k = max(1, int(density * n))
    assert int(mask.sum()) == k
    if 0 < k < n:
        mag = delta.abs()
        kept_min, dropped_max = mag[mask].min(), mag[~mask].max()
        assert kept_min >= dropped_max
        # same multiset of kept magnitudes as a full sort (ties aside, the selection is the same)
        assert torch.equal(mag[mask].sort().values, mag.sort(descending=True).values[:k].sort().values)


def test_ties_density_out_of_range_rejected():
    with pytest.raises(ExmeError, match="density must be in"):
        M.ties(rand((3,), 0), [rand((3,), 1)], [1.0], 0.0)
    with pytest.raises(ExmeError, match="density must be in"):
        M.ties(rand((3,), 0), [rand((3,), 1)], [1.0], 1.5)


def test_ties_bad_sign_method_rejected():
    with pytest.raises(ExmeError, match="majority_sign_method"):
        M.ties(rand((3,), 0), [rand((3,), 1)], [1.0], 0.5, "median")


# ------------------------------------------------------------------------------ DARE


def test_tensor_generator_depends_on_seed_and_name_only():
    a = torch.rand(5, generator=M.tensor_generator(7, "layers.0.w"))
    b = torch.rand(5, generator=M.tensor_generator(7, "layers.0.w"))
    c = torch.rand(5, generator=M.tensor_generator(7, "layers.1.w"))
    d = torch.rand(5, generator=M.tensor_generator(8, "layers.0.w"))
    torch.manual_seed(123)  # global RNG state must not matter
    e = torch.rand(5, generator=M.tensor_generator(7, "layers.0.w"))
    assert torch.equal(a, b) and torch.equal(a, e)
    assert not torch.equal(a, c) and not torch.equal(a, d)


def test_dare_linear_hand_worked_mask_reproducible_from_seed():
    base = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    t1 = torch.tensor([2.0, 0.0, 3.0, 1.5, -1.0, 1.0])  # Δ1 = [1, -1, 2, 0.5, -2, 0]
    t2 = torch.tensor([1.0, 2.0, 1.0, 1.0, 0.0, 5.0])  # Δ2 = [0, 1, 0, 0, -1, 4]
    # Re-draw the masks by hand from the same seed: uniform u < density keeps, model order.
    g = M.tensor_generator(42, "model.w", "cpu")
    u1 = torch.rand(6, generator=g)
    u2 = torch.rand(6, generator=g)
    d1, d2 = np.array([1, -1, 2, 0.5, -2, 0]), np.array([0, 1, 0, 0, -1, 4])
    m1, m2 = (u1 < 0.5).numpy(), (u2 < 0.5).numpy()
    expected = 1.0 + 0.8 * d1 * m1 / 0.5 + 0.3 * d2 * m2 / 0.5
    out = M.dare_linear(base, [t1, t2], [0.8, 0.3], 0.5, M.tensor_generator(42, "model.w", "cpu"))
    np.testing.assert_allclose(f64(out), expected, rtol=1e-6)
    no_rescale = M.dare_linear(base, [t1, t2], [0.8, 0.3], 0.5, M.tensor_generator(42, "model.w"), rescale=False)
    np.testing.assert_allclose(f64(no_rescale), 1.0 + 0.8 * d1 * m1 + 0.3 * d2 * m2, rtol=1e-6)
    assert 0 < m1.sum() < 6 or 0 < m2.sum() < 6  # the masks really drop something here


def test_dare_keeps_about_density_and_preserves_expectation():
    base = torch.zeros(200_000)
    t = torch.ones(200_000)
    out = M.dare_linear(base, [t], [1.0], 0.3, M.tensor_generator(0, "x"))
    kept = (out != 0).double().mean().item()
    assert abs(kept - 0.3) < 0.005
    assert abs(out.double().mean().item() - 1.0) < 0.02  # E[m/d] = 1
    values = torch.unique(out).tolist()
    assert values[0] == 0.0 and values[1] == pytest.approx(1 / 0.3) and len(values) == 2


@pytest.mark.usefixtures("both_paths")
def test_dare_ties_equals_ties_merge_of_the_dare_pruned_deltas():
    base = rand((40, 30), 0)
    models = [base + rand((40, 30), s, scale=0.1) for s in (1, 2)]
    g = M.tensor_generator(3, "t")
    masks = [(torch.rand(40, 30, generator=g) < 0.4).numpy() for _ in models]
    pruned = [torch.from_numpy(f64(base) + (f64(m) - f64(base)) * k / 0.4) for m, k in zip(models, masks)]
    expected = ties_reference(base.double(), pruned, [0.7, 0.5], [1.0, 1.0], "sum", normalize=False)
    out = M.dare_ties(base, models, [0.7, 0.5], 0.4, M.tensor_generator(3, "t"))
    np.testing.assert_allclose(f64(out), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("both_paths")
def test_dare_ties_with_a_workspace_draws_the_same_masks_tensor_after_tensor():
    # One workspace across tensors of changing size (larger, smaller, larger again, another shape):
    # each result equals the call without one, which the float64 test above checks.
    ws = M.Workspace()
    for i, shape in enumerate([(70, 50), (40, 30), (90, 60), (3, 1000)]):
        base = rand(shape, 10 + i)
        models = [base + rand(shape, 20 + i + s, scale=0.1) for s in (0, 1)]
        args = (base, models, [0.7, 0.5], [0.4, 0.6])
        plain = M.dare_ties(*args, M.tensor_generator(5, f"t{i}"), out_dtype=torch.float32)
        reused = M.dare_ties(*args, M.tensor_generator(5, f"t{i}"), out_dtype=torch.float32, workspace=ws)
        assert torch.equal(plain, reused)


# ------------------------------------------------------------------------------ SLERP


def slerp_reference(a, b, t):
    a64, b64 = f64(a).ravel(), f64(b).ravel()
    dot = np.dot(a64 / np.linalg.norm(a64), b64 / np.linalg.norm(b64))
    if abs(dot) > 0.9995:
        return ((1 - t) * a64 + t * b64).reshape(a.shape)
    om = np.arccos(dot)
    return ((np.sin((1 - t) * om) * a64 + np.sin(t * om) * b64) / np.sin(om)).reshape(a.shape)


@settings(max_examples=25, deadline=None)
@given(t=st.floats(0, 1), seed=st.integers(0, 999))
def test_slerp_matches_formula(t, seed):
    a, b = rand((8, 6), seed), rand((8, 6), seed + 1)
    assert_close_f32(M.slerp(a, b, t), slerp_reference(a, b, t), rtol=1e-4, atol=1e-5)


def test_slerp_keeps_norm_of_orthogonal_unit_vectors():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = M.slerp(a, b, 0.5)
    np.testing.assert_allclose(out.numpy(), [np.sqrt(0.5), np.sqrt(0.5)], rtol=1e-6)


def test_slerp_falls_back_to_lerp_for_nearly_parallel_tensors():
    a = rand((100,), 0)
    b = a * 1.5 + rand((100,), 1, scale=1e-4)
    out = M.slerp(a, b, 0.25)
    assert_close_f32(out, 0.75 * f64(a) + 0.25 * f64(b), rtol=1e-5, atol=1e-6)


def test_slerp_endpoints():
    a, b = rand((10,), 0), rand((10,), 1)
    assert torch.allclose(M.slerp(a, b, 0.0), a, atol=1e-6)
    assert torch.allclose(M.slerp(a, b, 1.0), b, atol=1e-6)


# ------------------------------------------------------------------------------ float-only TIES kernel


@pytest.mark.usefixtures("both_paths")
@pytest.mark.parametrize("sign_method", ["sum", "count"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("n_models", [1, 3])
def test_float_only_ties_and_dare_ties_equal_the_boolean_disjoint_merge_bitwise(sign_method, normalize, n_models):
    # Values on a coarse grid: many magnitudes tie at the threshold (the tie quota splits a block)
    # and many votes are exactly 0; 70k entries span several kernel blocks.
    g = torch.Generator().manual_seed(11)
    base = torch.randn(70_000, generator=g).bfloat16()
    models = [(base.float() + torch.randint(-3, 4, (70_000,), generator=g) * 0.125).bfloat16() for _ in range(n_models)]
    ws, ds = [0.6, 0.4, 0.3][:n_models], [0.5, 0.3, 1.0][:n_models]
    base_c = base.float()
    pruned = [M._task_vector(m, base_c) * M.magnitude_mask(M._task_vector(m, base_c), d) for m, d in zip(models, ds)]
    expected = M._sign_consensus_merge(base, pruned, ws, sign_method, normalize, 0.7, torch.float32)
    got = M.ties(base, models, ws, ds, sign_method, normalize, 0.7, out_dtype=torch.float32)
    assert torch.equal(got, expected)
    gen = lambda: M.tensor_generator(3, "w")  # noqa: E731
    expected = M._sign_consensus_merge(base, M._dare_deltas(base_c, models, ds, gen(), True), ws, sign_method,
                                       normalize, 0.7, torch.float32)
    got = M.dare_ties(base, models, ws, ds, gen(), True, sign_method, normalize, 0.7, out_dtype=torch.float32)
    assert torch.equal(got, expected)


@pytest.mark.usefixtures("both_paths")
@pytest.mark.parametrize("kind", ["grid", "noise"])
def test_magnitude_pass_then_chunked_ties_on_its_deltas_is_the_exact_top_k(kind):
    # Above the direct-selection size, so the coarse histogram of the magnitude pass picks the
    # threshold. "grid": task vectors on a coarse grid (most magnitudes tie at the threshold, the
    # quota splits mid-tensor); "noise": bf16 base + small noise, as the merge benchmark's models.
    n, chunk = 300_007, 65_536
    g = torch.Generator().manual_seed(23)
    base = (torch.randn(n, generator=g) * 0.02).bfloat16()
    if kind == "grid":
        models = [(base.float() + torch.randint(-3, 4, (n,), generator=g) * 0.125).bfloat16() for _ in range(2)]
    else:
        models = [(base.float() + torch.randn(n, generator=g) * 0.002).bfloat16() for _ in range(2)]
    # weights that scale exactly: wΔ and the vote are exact in float32, so votes that cancel (frequent
    # with bf16 task vectors) elect the same sign as in the float64 reference
    ws, ds = [1.0, 0.5], [0.5, 0.3]
    mp = M.MagnitudePass()
    mp.start(n, 2)
    for s in range(0, n, chunk):
        for j, m in enumerate(models):
            mp.add(j, s, m[s : s + chunk], base[s : s + chunk].float())
    selectors = mp.selectors(ds)
    for j, (m, d) in enumerate(zip(models, ds)):
        delta = m.double() - base.double()  # exact: bf16 differences fit in float64
        k = max(1, int(d * n))
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.sort(-delta.abs(), stable=True).indices[:k]] = True  # lowest flat index wins ties
        trimmed = delta.float().clone()
        selectors[j].trim_(trimmed, 0)
        assert torch.equal(trimmed != 0, keep & (delta != 0))
    parts = [
        M.ties(base[s : s + chunk], [mp.chunk(j, s, min(n, s + chunk)) for j in range(2)], ws, ds,
               selectors=selectors, deltas=True, out_dtype=torch.float32)
        for s in range(0, n, chunk)
    ]
    got = torch.cat(parts)
    assert torch.equal(got, M.ties(base, models, ws, ds, out_dtype=torch.float32))  # the sampled-band path
    np.testing.assert_allclose(f64(got), ties_reference(base, models, ws, ds), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ fused kernels (exme.merge.native)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in float32 steps between two float32 tensors (±0 count as equal)."""
    ia, ib = a.view(torch.int32).long(), b.view(torch.int32).long()
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)  # the bits as a monotone integer line
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int((ia - ib).abs().max())


@pytest.mark.skipif(not M.native._HAVE_NUMBA, reason="numba is not installed")
@pytest.mark.parametrize("sign_method", ["sum", "count"])
@pytest.mark.parametrize("normalize", [True, False])
def test_native_kernels_give_the_torch_paths_floats(monkeypatch, sign_method, normalize):
    # Task vectors on a coarse grid (ties at the threshold and votes of exactly 0), bf16 and float32
    # inputs, one model at density 1, negative weights where normalize is off. The torch path is the
    # one the float64 tests above check; the kernels must give its floats (the same operations in the
    # same order; only a CPU without FMA could round the final b + λ·m differently, by one step).
    g = torch.Generator().manual_seed(4)
    n = 150_001  # above the direct-selection size: TIES' threshold from the magnitude pass's histogram
    base = (torch.randn(n, generator=g) * 0.02).bfloat16()
    grid = [(base.float() + torch.randint(-3, 4, (n,), generator=g) * 0.0078125) for _ in range(3)]
    cases = [
        ([m.bfloat16() for m in grid], [0.5, 0.3, 1.0]),
        ([grid[0], grid[1].bfloat16()], [0.4, 0.6]),  # mixed input dtypes
        ([grid[2]], [0.25]),
    ]
    for models, ds in cases:
        ws = [0.7, 0.5, 0.2][: len(models)] if normalize else [0.7, -0.5, 1.3][: len(models)]
        outs = {}
        for on in (True, False):
            monkeypatch.setattr(M.native, "ENABLED", on)
            t = M.ties(base, models, ws, ds, sign_method, normalize, 0.8, out_dtype=torch.float32)
            mp = M.MagnitudePass()  # the engine's way: magnitude pass, then chunks of the kept Δ
            mp.start(n, len(models))
            for s in range(0, n, 40_000):
                for j, m in enumerate(models):
                    mp.add(j, s, m[s : s + 40_000], base[s : s + 40_000].float())
            sels = mp.selectors(ds)
            chunked = torch.cat([
                M.ties(base[s : s + 40_000], [mp.chunk(j, s, min(n, s + 40_000)) for j in range(len(models))], ws, ds,
                       sign_method, normalize, 0.8, selectors=sels, deltas=True, out_dtype=torch.float32)
                for s in range(0, n, 40_000)
            ])
            dare = M.dare_ties(base, models, ws, ds, M.tensor_generator(9, "w"), sign_method != "sum", sign_method,
                               normalize, 0.8, out_dtype=torch.float32)
            outs[on] = (t, chunked, dare, [(float(s.threshold), s.all_ties, s.last_tie) for s in sels if s.threshold is not None])
        assert outs[True][3] == outs[False][3]  # the same thresholds and last kept ties
        for a, b in zip(outs[True][:3], outs[False][:3]):
            assert _ulps(a, b) <= 1
        assert torch.equal(outs[True][0], outs[True][1])  # chunked with global selectors = whole tensor


@pytest.mark.usefixtures("both_paths")
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_magnitude_pass_sees_a_non_finite_task_vector(bad):
    n, chunk = 300_000, 65_536
    base = torch.zeros(n)
    model = torch.full((n,), 0.5)
    model[200_000] = bad  # in the fourth chunk, after three clean ones
    mp = M.MagnitudePass()
    mp.start(n, 1)
    seen = []
    for s in range(0, n, chunk):
        seen.append(mp.finite(0, mp.add(0, s, model[s : s + chunk], base[s : s + chunk])))
    assert seen == [True, True, True, False, False]


@pytest.mark.usefixtures("both_paths")
@pytest.mark.parametrize("density", [0.5, 0.05])
def test_magnitude_pass_threshold_is_exact_when_a_sample_would_mislead(density):
    # Every 8th entry large, the rest small, with many exact ties: a sample of every 8th entry
    # (the fused pass's) sees only the large ones, so its band misses and the counting must widen.
    n, chunk = 200_000, 40_000
    g = torch.Generator().manual_seed(8)
    delta = torch.randint(1, 50, (n,), generator=g).float() * 2.0**-10 * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    delta[::8] *= 1000.0
    base = torch.zeros(n)
    mp = M.MagnitudePass()
    mp.start(n, 1)
    for s in range(0, n, chunk):
        mp.add(0, s, delta[s : s + chunk], base[s : s + chunk])
    sel = mp.selectors([density])[0]
    k = max(1, int(density * n))
    order = torch.sort(-delta.double().abs(), stable=True).indices  # lowest flat index wins ties
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[:k]] = True
    assert float(sel.threshold) == float(delta.abs()[order[k - 1]])
    trimmed = delta.clone()
    sel.trim_(trimmed, 0)
    assert torch.equal(trimmed != 0, keep)


@pytest.mark.usefixtures("both_paths")
def test_ties_and_dare_ties_round_to_bfloat16_as_torch_casts():
    # θ_b + λ·0 = θ_b exactly, so the bf16 output must be θ_b's float32 → bf16 cast: values whose
    # low 16 bits are exactly half a step (ties to even, both parities), subnormals, values near
    # bf16's largest (some round to Inf), negative values.
    g = torch.Generator().manual_seed(2)
    bits = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=g, dtype=torch.int64)
    bits[::3] = (bits[::3] & ~0xFFFF) | 0x8000
    bits[1::7] &= 0x800FFFFF  # subnormals
    bits[2::11] = 0x7F7F7FFF + torch.arange(len(bits[2::11])) % 3 * 0x4000  # around bf16's max
    base = bits.to(torch.int32).view(torch.float32)
    base = torch.where(base.isnan(), torch.zeros(()), base)
    models = [base.clone(), base.clone()]
    want = base.to(torch.bfloat16)
    got = M.ties(base, models, [0.5, 0.5], 0.5, out_dtype=torch.bfloat16)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    got = M.dare_ties(base, models, [0.5, 0.5], 0.5, M.tensor_generator(1, "w"), out_dtype=torch.bfloat16)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))

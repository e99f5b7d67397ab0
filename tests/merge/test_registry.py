"""The method registry: each method's declared linearity, parameters and baseline settings are true."""

from __future__ import annotations

import pytest
import torch

from exme.errors import ExmeError
from exme.merge.config import MergeConfig
from exme.merge.registry import BASELINE_METHODS, REGISTRY, baseline_kwargs, baseline_space, get_method, methods_reading


def _inputs(k: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(7, 5, generator=g, dtype=torch.float64)
    models = [base + 0.1 * torch.randn(7, 5, generator=g, dtype=torch.float64) for _ in range(k)]
    return base, models


LINEAR_SETTINGS = [
    ("linear", {"weights": [0.3, 0.7], "normalize": True}),
    ("linear", {"weights": [2.0, 6.0], "normalize": True}),
    ("linear", {"weights": [0.25, 0.75], "normalize": False}),
    ("task_arithmetic", {"weights": [0.5, 1.5], "lambda_": 0.8, "normalize": False}),
    ("task_arithmetic", {"weights": [0.5, 1.5], "lambda_": 0.8, "normalize": True}),
    ("extrapolate", {"alpha": 0.6}),
    ("exme", {"weights": [0.4, 0.6], "alphas": [0.3, 1.2]}),
]


@pytest.mark.parametrize("name,kwargs", LINEAR_SETTINGS)
def test_linear_methods_equal_base_plus_their_coefficients_times_task_vectors(name, kwargs):
    method = get_method(name)
    assert method.linear
    k = 1 if name == "extrapolate" else 2
    base, models = _inputs(k)
    got = method.merge(base if method.needs_base else None, models, **kwargs, compute_dtype=torch.float64)
    coeffs = method.coefficients(kwargs)
    expected = base.clone()
    for c, m in zip(coeffs, models):
        expected += c * (m - base)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_unnormalised_linear_whose_weights_do_not_sum_to_one_has_no_coefficients():
    # Σ wᵢθᵢ with Σ w = 2 is 2θ_b + Σ wᵢΔᵢ: not a function of the task vectors alone.
    assert get_method("linear").coefficients({"weights": [1.0, 1.0], "normalize": False}) is None


@pytest.mark.parametrize("name", ["ties", "dare_linear", "dare_ties", "slerp"])
def test_nonlinear_methods_say_so(name):
    assert not get_method(name).linear
    assert get_method(name).coefficients({"weights": [1.0, 1.0], "density": 0.5, "t": 0.5}) is None


def test_baseline_grids_and_settings():
    assert BASELINE_METHODS == ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")
    assert baseline_space("linear", 2) == {"weight_1": [0.3, 0.5, 0.7]}
    assert baseline_space("linear", 3) == {}  # one weight per model does not fit a 1-D grid: uniform
    assert baseline_space("task_arithmetic", 3) == {"lambda": [0.3, 0.5, 0.7, 1.0]}
    assert baseline_kwargs("linear", {"weight_1": 0.3}, 2) == {"weights": [0.3, 0.7], "normalize": True}
    assert baseline_kwargs("linear", {}, 4) == {"weights": [0.25] * 4, "normalize": True}
    assert baseline_kwargs("task_arithmetic", {"lambda": 0.5}, 3) == {"weights": [1.0] * 3, "lambda_": 0.5}
    assert baseline_kwargs("dare_ties", {"density": 0.7}, 2) == {"weights": [1.0, 1.0], "density": 0.7, "normalize": True}
    with pytest.raises(ExmeError, match="not a pipeline baseline"):
        baseline_space("exme", 2)


@pytest.mark.parametrize("name", BASELINE_METHODS)
def test_every_baseline_setting_runs_through_its_method(name):
    method = get_method(name)
    base, models = _inputs(3, seed=4)
    for values in zip(*baseline_space(name, 3).values()) if baseline_space(name, 3) else [()]:
        params = dict(zip(baseline_space(name, 3), values))
        out = method.merge(base if method.needs_base else None, models, **baseline_kwargs(name, params, 3),
                           generator=torch.Generator().manual_seed(0))
        assert out.shape == base.shape and torch.isfinite(out).all()


def test_config_refuses_parameters_the_method_does_not_declare(tmp_path):
    assert methods_reading("t") == ("slerp",)
    for name, method in REGISTRY.items():
        unread = [key for key in ("t", "beta", "density", "lambda") if key not in method.params]
        for key in unread:
            data = {"merge_method": name, "base_model": "b", "models": [{"model": "m", "parameters": {"weight": 1.0, "alpha": 0.1}}],
                    "parameters": {key: 0.5}}
            with pytest.raises(ExmeError, match=f"parameters.{key} has no meaning for merge_method {name}"):
                MergeConfig.from_dict(data)


def test_model_card_parameters_come_from_the_method():
    config = MergeConfig.from_dict({"merge_method": "ties", "base_model": "b",
                                    "models": [{"model": "m1", "parameters": {"weight": 1.0}}, {"model": "m2", "parameters": {"weight": 2.0}}],
                                    "parameters": {"density": 0.4}})
    assert config.merge_parameters() == {
        "merge_method": "ties", "weights": [1.0, 2.0], "normalize": True, "lambda": 1.0, "densities": [0.4, 0.4],
        "majority_sign_method": "sum",
    }


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ExmeError, match="use one of linear, task_arithmetic"):
        get_method("model_soup")

"""The weight-sparsity method registry: each method is one registered unit that the pipeline runs by what it needs."""

from __future__ import annotations

import pytest
import torch

from tiny_models import tiny_causal_lm

from llmprune.calibration.calibrate import CalibrationError, InputStats
from llmprune.sparsity import (METHODS, SparsityConfig, available_sparsity_methods, get_sparsity_method,
                               register_sparsity_method, sparsify)
from llmprune.sparsity import registry


def test_methods_is_the_registry():
    assert METHODS == available_sparsity_methods() == tuple(sorted(METHODS))
    assert set(METHODS) == {"magnitude", "wanda", "sparsegpt", "alps", "ria"}
    needs = {m: get_sparsity_method(m).needs for m in METHODS}
    assert needs == {"magnitude": "weights", "wanda": "norms", "ria": "norms", "sparsegpt": "hessian",
                     "alps": "hessian"}
    assert [m for m in METHODS if get_sparsity_method(m).prune_group is not None] == ["sparsegpt"]
    for m in METHODS:
        method = get_sparsity_method(m)
        assert method.name == m and method.description and method.streams
        assert method.needs_calibration == (method.needs != "weights")


def test_unknown_method_names_the_available_ones():
    with pytest.raises(ValueError, match="unknown sparsity method 'obs'; choose one of alps, magnitude"):
        get_sparsity_method("obs")
    with pytest.raises(ValueError, match="method='obs'; choose one of"):
        SparsityConfig(method="obs")


def test_registration_is_checked(monkeypatch):
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    with pytest.raises(ValueError, match="already registered"):
        register_sparsity_method("wanda", "again", needs="norms", prune=lambda *a: None)
    with pytest.raises(ValueError, match="needs='gradients'"):
        register_sparsity_method("grad", "x", needs="gradients", prune=lambda *a: None)
    with pytest.raises(ValueError, match="non-empty name"):
        register_sparsity_method("", "x", needs="weights", prune=lambda *a: None)


@pytest.mark.parametrize("needs", ["weights", "norms", "hessian"])
def test_a_new_method_is_one_registration(monkeypatch, needs):
    """A method registered from outside runs through ``sparsify`` with the statistics it declares."""
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    seen = []

    @torch.no_grad()
    def prune(weight, stats, sparsity, config):  # zero the first columns
        seen.append(type(stats).__name__)
        weight[:, : int(sparsity * weight.shape[1])] = 0

    register_sparsity_method("first-columns", "zero the first columns", needs=needs, prune=prune)
    model = tiny_causal_lm("llama")
    g = torch.Generator().manual_seed(0)
    calibration = list(torch.randint(0, 128, (4, 16), generator=g).split(2)) if needs != "weights" else None
    report = sparsify(model, SparsityConfig(method="first-columns", sparsity=0.5), calibration=calibration,
                      progress=False)
    assert report.overall_sparsity == pytest.approx(0.5, abs=0.02)
    expected = {"weights": "NoneType", "norms": "InputStats", "hessian": "HessianAccumulator"}[needs]
    assert set(seen) == {expected} and len(seen) == len(report.layers)


def test_norm_methods_refuse_layers_no_input_reached():
    w = torch.randn(8, 16)
    for name in ("wanda", "ria"):
        with pytest.raises(CalibrationError, match="no calibration inputs reached"):
            get_sparsity_method(name).prune(w, InputStats(), 0.5, SparsityConfig(method=name))

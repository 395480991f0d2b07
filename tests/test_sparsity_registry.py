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


def test_allocations_and_activation_methods_are_registered_once():
    from llmprune.sparsity import (ALLOCATIONS, available_activation_methods, available_sparsity_allocations,
                                   calibrate_activation_thresholds, get_activation_method, get_sparsity_allocation)

    assert ALLOCATIONS == available_sparsity_allocations() == ("owl", "uniform")
    owl, uniform = get_sparsity_allocation("owl"), get_sparsity_allocation("uniform")
    assert (owl.needs, owl.needs_calibration, owl.nm, owl.streams) == ("norms", True, False, False)
    assert (uniform.needs, uniform.needs_calibration, uniform.nm, uniform.streams) == ("weights", False, True, True)
    assert owl.description and uniform.description
    assert available_activation_methods() == ("teal",)
    teal = get_activation_method("teal")
    assert teal.calibrate is calibrate_activation_thresholds
    assert (teal.needs, teal.sequential, teal.streams, teal.needs_calibration) == ("input_histograms", True, True, True)


def test_unknown_allocation_or_activation_method_names_the_available_ones():
    from llmprune.sparsity import get_activation_method, get_sparsity_allocation

    with pytest.raises(ValueError, match="unknown sparsity allocation 'global'; choose one of owl, uniform"):
        get_sparsity_allocation("global")
    with pytest.raises(ValueError, match="allocation='global'; choose one of owl, uniform"):
        SparsityConfig(allocation="global")
    with pytest.raises(ValueError, match="unknown activation-sparsity method 'cats'; choose one of teal"):
        get_activation_method("cats")
    # an allocation that varies the sparsity per layer refuses N:M (declared, not named)
    with pytest.raises(ValueError, match="allocation 'owl' varies the sparsity per layer"):
        SparsityConfig(allocation="owl", pattern="2:4")


def test_allocation_registration_is_checked(monkeypatch):
    from llmprune.sparsity import register_activation_method, register_sparsity_allocation

    monkeypatch.setattr(registry, "_ALLOCATIONS", dict(registry._ALLOCATIONS))
    monkeypatch.setattr(registry, "_ACTIVATION", dict(registry._ACTIVATION))
    with pytest.raises(ValueError, match="already registered"):
        register_sparsity_allocation("owl", "again", needs="norms", layer_ratios=lambda *a: [])
    with pytest.raises(ValueError, match="needs='hessian'; choose weights or norms"):
        register_sparsity_allocation("gram", "x", needs="hessian", layer_ratios=lambda *a: [])
    with pytest.raises(ValueError, match="already registered"):
        register_activation_method("teal", "again", calibrate=lambda *a, **k: {})
    with pytest.raises(ValueError, match="needs='norms'; choose input_histograms"):
        register_activation_method("x", "x", calibrate=lambda *a, **k: {}, needs="norms")


def test_a_new_allocation_is_one_registration(monkeypatch):
    """An allocation registered from outside is a CLI choice and runs through ``sparsify`` (its declared needs
    decide whether calibration is asked for)."""
    from llmprune.cli import build_parser
    from llmprune.sparsity import register_sparsity_allocation

    monkeypatch.setattr(registry, "_ALLOCATIONS", dict(registry._ALLOCATIONS))
    register_sparsity_allocation("first-half", "the first half of the layers at 2x sparsity, the rest dense",
                                 needs="weights", layer_ratios=lambda model, adapter, targets, batches, config,
                                 device: [min(0.99, 2 * config.sparsity) if i < len(targets) // 2 else 0.0
                                          for i in range(len(targets))])
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["sparsify"]
    action = next(a for a in sub._actions if a.dest == "allocation")
    assert "first-half" in action.choices and "the first half of the layers" in action.help
    cfg = SparsityConfig(method="magnitude", sparsity=0.25, allocation="first-half")
    assert not cfg.needs_calibration
    model = tiny_causal_lm("llama")
    report = sparsify(model, cfg, progress=False)
    n = len(model.model.layers)
    for name, s in report.layers.items():
        layer = int(name.split(".layers.")[1].split(".")[0])
        assert s == pytest.approx(0.5 if layer < n // 2 else 0.0, abs=0.02), name


def test_streaming_refuses_what_is_declared_not_streamed(tmp_path, monkeypatch):
    from llmprune.sparsity import register_sparsity_allocation
    from llmprune.streaming import StreamingError, sparsify_streaming

    monkeypatch.setattr(registry, "_ALLOCATIONS", dict(registry._ALLOCATIONS))
    register_sparsity_allocation("whole", "x", needs="weights", layer_ratios=lambda *a: [], streams=False)
    model = tiny_causal_lm("llama")
    for allocation in ("owl", "whole"):
        with pytest.raises(StreamingError, match=f"allocation '{allocation}' is not streamed"):
            sparsify_streaming(model, SparsityConfig(method="magnitude", allocation=allocation), tmp_path / "o",
                               progress=False)
    with pytest.raises(ValueError, match="unknown activation-sparsity method 'cats'"):
        sparsify_streaming(model, SparsityConfig(method="magnitude"), tmp_path / "o", progress=False,
                           activation_sparsity=0.4, activation_method="cats")
    assert not (tmp_path / "o").exists()

"""The structured method registries: heads / neurons methods (``Criterion``) and the hidden-channel, layer and
expert criteria (``UnitCriterion``), each registered once with what it needs and whether it streams; and no
method is chosen by comparing its name outside the registries."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llmprune.core.config import PruneConfig
from llmprune.structured.criteria import (available_criteria, available_unit_criteria, get_criterion,
                                          get_unit_criterion, register_unit_criterion)
from llmprune.structured.criteria import units

ROOT = Path(__file__).resolve().parents[1] / "llmprune"


def test_every_structured_method_is_registered_once_with_its_needs():
    assert set(available_criteria()) >= {"obs", "wanda", "flap", "magnitude", "magnitude_l1", "taylor",
                                         "single-unit"}
    obs = get_criterion("obs")
    assert obs.run is not None and obs.needs_calibration and obs.streams and obs.default_allocation == "fisher"
    for name in ("taylor", "single-unit"):  # their own whole-model (gradient) pass: not streamed
        assert get_criterion(name).prepare is not None and not get_criterion(name).streams
    assert not get_criterion("magnitude").needs_calibration and get_criterion("wanda").needs_calibration


def test_unit_criteria_are_registered_once_with_needs_and_streams():
    expected = {"hidden": {"minitron": ("required", ("norm_outputs",)),
                           "rms": ("required", ("norm_outputs", "norm_samples"))},
                "layers": {"block_influence": ("required", ("block_influence",))},
                "experts": {"routing_mass": ("optional", ("router_mass", "weights"))},
                "vocab": {"frequency": ("required", ("token_counts",))}}
    for kind, names in expected.items():
        assert available_unit_criteria(kind) == sorted(names)
        for name, (calibration, needs) in names.items():
            c = get_unit_criterion(kind, name)
            assert (c.kind, c.name, c.calibration, c.needs, c.streams) == (kind, name, calibration, needs, False)
            assert c.description and set(c.needs) <= set(units.NEEDS)
    assert get_unit_criterion("layers").name == "block_influence" and get_unit_criterion("layers").needs_calibration
    experts = get_unit_criterion("experts")
    assert experts.name == "routing_mass" and experts.uses_calibration and not experts.needs_calibration
    assert get_unit_criterion("vocab").name == "frequency"
    # the hidden criterion is named by the config: no default of the registry's own
    with pytest.raises(ValueError, match="no default; available: minitron, rms"):
        get_unit_criterion("hidden")


def test_unknown_names_list_the_available_ones():
    with pytest.raises(ValueError, match="unknown hidden criterion 'pca'; available: minitron, rms"):
        get_unit_criterion("hidden", "pca")
    with pytest.raises(ValueError, match="unknown pruning method 'sparsegpt'; available: .*obs"):
        get_criterion("sparsegpt")
    with pytest.raises(ValueError, match="unit kind 'heads'"):
        get_unit_criterion("heads")


def test_hidden_method_is_checked_against_the_registry():
    import torch

    from tiny_models import tiny_causal_lm

    from llmprune.arch import get_adapter
    from llmprune.structured.pipeline import prune
    from llmprune.structured.select import resolve_config

    cfg = PruneConfig(hidden=0.25, hidden_method="pca")  # a plain string: the registry decides
    model = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match="unknown hidden criterion 'pca'; available: minitron, rms"):
        resolve_config(model, get_adapter(model), cfg)
    with pytest.raises(ValueError, match="unknown hidden criterion 'pca'"):
        prune(model, cfg, calibration=torch.randint(0, 128, (2, 16)), progress=False)
    with pytest.raises(ValueError, match="hidden_method"):
        PruneConfig(hidden_method="")


def test_registration_is_checked(monkeypatch):
    monkeypatch.setattr(units, "_UNIT_CRITERIA", {k: dict(v) for k, v in units._UNIT_CRITERIA.items()})
    with pytest.raises(ValueError, match="already registered"):
        register_unit_criterion("hidden", "rms", "again", lambda s, n: None, "required", ("norm_outputs",))
    with pytest.raises(ValueError, match="unknown needs gradients"):
        register_unit_criterion("hidden", "grad", "x", lambda s, n: None, "required", ("gradients",))
    with pytest.raises(ValueError, match="calibration='sometimes'"):
        register_unit_criterion("hidden", "x", "x", lambda s, n: None, "sometimes", ())
    with pytest.raises(ValueError, match="already has a default"):
        register_unit_criterion("layers", "last", "x", lambda bi, n: [], "none", ("weights",), default=True)
    with pytest.raises(ValueError, match="unit kind 'heads'"):
        register_unit_criterion("heads", "x", "x", lambda: None, "none", ())


def test_a_new_hidden_criterion_is_one_registration(monkeypatch):
    """A criterion registered from outside is a CLI choice and runs through ``prune`` with the stats it declares."""
    import torch

    from tiny_models import tiny_causal_lm

    from llmprune.cli import build_parser
    from llmprune.structured.pipeline import prune

    monkeypatch.setattr(units, "_UNIT_CRITERIA", {k: dict(v) for k, v in units._UNIT_CRITERIA.items()})
    seen = []

    def last_channels(stats, n_remove):  # keep the first channels
        seen.append(len(stats))
        d = stats[0].abs_sum.numel()
        return list(range(d - n_remove)), None

    register_unit_criterion("hidden", "first", "keep the first channels", last_channels, "required",
                            ("norm_outputs",))
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["prune"]
    action = next(a for a in sub._actions if a.dest == "hidden_method")
    assert action.choices == ["first", "minitron", "rms"] and "keep the first channels" in action.help
    method = next(a for a in sub._actions if a.dest == "method")
    assert method.choices == available_criteria() and get_criterion("obs").description in method.help
    model = tiny_causal_lm("llama")
    d = model.config.hidden_size
    result = prune(model, PruneConfig(hidden=0.25, hidden_method="first", n_samples=2, seq_len=16),
                   calibration=torch.randint(0, 128, (2, 16)), progress=False)
    assert result.plan.kept_hidden == list(range(d - round(0.25 * d))) and seen


#: the registries, where names are compared by design
REGISTRIES = {"structured/criteria/base.py", "structured/criteria/units.py", "sparsity/registry.py"}
def test_no_method_is_chosen_by_name_outside_the_registries():
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in REGISTRIES:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"""\b(method|hidden_method)\s*[!=]=\s*["']""", code) or \
                    re.search(r"""allocation\s*[!=]=\s*["']owl["']""", code):
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_no_hidden_or_owl_choice_is_hard_coded_elsewhere():
    """The CLI, config and streaming take hidden criteria and sparsity allocations from their registries."""
    for rel in ("core/config.py", "cli/prune.py", "cli/_common.py", "cli/sparsify.py", "streaming/sparsify.py",
                "streaming/prune.py", "structured/pipeline.py", "sparsity/api.py"):
        text = (ROOT / rel).read_text()
        assert not re.search(r"""\(\s*["']minitron["']\s*,\s*["']rms["']\s*\)""", text), rel
        assert not re.search(r"""\(\s*["']uniform["']\s*,\s*["']owl["']\s*\)""", text), rel

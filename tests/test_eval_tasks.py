"""lm-eval task accuracy: our wrapper equals lm_eval.simple_evaluate on the same model and files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmprune.eval.tasks import LOCAL_TASKS, evaluate_tasks, make_task_manager, resolve_task_names
from llmprune.eval.tasks.local_data import load_lambada, load_openbookqa, load_piqa

SHARED = Path(os.environ.get("LLMPRUNE_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")
MODEL = SHARED / "models" / "ref-llama-7m"
DATA = SHARED / "data" / "tasks"
needs_shared = pytest.mark.skipif(not MODEL.is_dir(), reason="../shared (LLMPRUNE_SHARED) not available")
LIMIT = 12


@pytest.fixture(scope="module")
def ref():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(MODEL).eval(), AutoTokenizer.from_pretrained(MODEL)


@needs_shared
def test_local_loaders_read_the_shared_files():
    assert len(load_lambada(DATA)["test"]) == 5153
    piqa = load_piqa(DATA)["validation"]
    assert len(piqa) == 1838 and sum(piqa["label"]) == 928
    obqa = load_openbookqa(DATA)["test"]
    assert len(obqa) == 500
    assert all(len(c["text"]) == 4 and c["label"] == ["A", "B", "C", "D"] for c in obqa["choices"])
    assert {k: obqa["answerKey"].count(k) for k in "ABCD"} == {"A": 138, "B": 126, "C": 132, "D": 104}


@needs_shared
def test_matches_simple_evaluate_directly(ref):
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    model, tok = ref
    ours = evaluate_tasks(model, tok, ["lambada", "piqa"], limit=LIMIT, batch_size=4, device="cpu",
                          data_dir=DATA, samples=True)
    direct = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu"),
        tasks=["llmprune_lambada", "llmprune_piqa"], limit=LIMIT,
        task_manager=make_task_manager(DATA), log_samples=True, bootstrap_iters=0,
    )
    for short, name, metrics in (("lambada", "llmprune_lambada", ["acc"]), ("piqa", "llmprune_piqa", ["acc", "acc_norm"])):
        assert ours[short]["lm_eval_task"] == name
        for metric in metrics:
            assert ours[short][metric] == direct["results"][name][f"{metric},none"]
        want = sorted(direct["samples"][name], key=lambda s: s["doc_id"])
        got = sorted(ours[short]["samples"], key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in got] == list(range(LIMIT))
        assert [s["acc"] for s in got] == [float(s["acc"]) for s in want]
        for g, w in zip(got, want):  # same per-choice log-likelihoods, hence same choices
            assert g["loglikelihoods"] == pytest.approx([r[0] for r in w["filtered_resps"]], abs=1e-4)
    assert ours["lambada"]["acc_norm"] is None and ours["piqa"]["acc_norm"] is not None


@needs_shared
def test_task_names_resolve_to_local_yamls():
    tm = make_task_manager(DATA)
    assert resolve_task_names(list(LOCAL_TASKS), DATA, tm) == {k: v[0] for k, v in LOCAL_TASKS.items()}
    # without local files the short names fall back to lm-eval's own tasks
    assert resolve_task_names(["piqa", "lambada"], DATA / "missing", tm) == {"piqa": "piqa", "lambada": "lambada_openai"}


@needs_shared
def test_unknown_task_is_a_clear_error(ref):
    model, tok = ref
    with pytest.raises(ValueError, match="Unknown task 'piqaa'.*Did you mean"):
        evaluate_tasks(model, tok, ["piqaa"], limit=2, data_dir=DATA)
    with pytest.raises(ValueError, match="No tasks"):
        evaluate_tasks(model, tok, [], limit=2, data_dir=DATA)


def test_missing_task_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="LLMPRUNE_TASK_DATA"):
        load_piqa(tmp_path)

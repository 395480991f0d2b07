"""Issue 42: nothing runs that the user did not ask for, nothing of theirs is lost, nothing is left behind.

One test (or more) per defect D1-D16 of the bad-input and security review. The CLI runs in subprocesses
(``sys.executable -m llmprune``). Every interpreter start costs seconds of CPU, so the refusals of all defects
run in one subprocess (the module fixture ``refusals``, see :func:`cli_batch`; each test checks its own
entries) and one streamed run (``streamed``) serves the tests that only read an output.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import CALIB_TEXT, REF_MODEL, REPO

FAST = ["--heads", "0.25", "--method", "wanda", "--allocation", "uniform", "--calib", str(CALIB_TEXT),
        "--n-samples", "2", "--seq-len", "32", "--quiet"]
NOCAL = ["--heads", "0.25", "--method", "magnitude", "--allocation", "uniform", "--quiet"]  # no calibration
MARKER = "EVIL_CODE_RAN"


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), *sys.path])}


def cli(*args: str, input: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmprune", *map(str, args)], capture_output=True, text=True,
                          input=input, cwd=cwd, env=_env(), timeout=600)


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmprune", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())


_BATCH = r"""
import contextlib, io, json, sys
from llmprune.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code
        except BaseException as exc:
            import traceback
            traceback.print_exc(file=err)
            rc = "raised"
    results.append({"rc": rc, "out": out.getvalue(), "err": err.getvalue()})
print("\n@@RESULTS@@" + json.dumps(results))
"""


def cli_batch(*argvs: list[str], input: str | None = None, cwd: Path | None = None) -> list[dict]:
    """Several CLI invocations in one subprocess (one interpreter start): ``[{rc, out, err}]``."""
    proc = subprocess.run([sys.executable, "-c", _BATCH, json.dumps([list(map(str, a)) for a in argvs])],
                          capture_output=True, text=True, input=input, cwd=cwd, env=_env(), timeout=600)
    assert "@@RESULTS@@" in proc.stdout, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("@@RESULTS@@")[-1])
    for r in results:  # what the terminal saw outside the redirection (transformers' prompt) counts too
        r["all"] = r["out"] + r["err"] + proc.stderr
    return results


def one_line_error(result: dict, *words: str) -> str:
    """The result is exit 2 with exactly one error line naming ``words``; returns that line."""
    lines = [line for line in result["err"].splitlines() if line.strip()]
    assert result["rc"] == 2, result
    assert len(lines) == 1 and lines[0].startswith("llmprune: error: "), result["err"]
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def copy_model(folder: Path) -> Path:
    shutil.copytree(REF_MODEL, folder)
    for p in [folder, *folder.iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return folder


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


EVIL_PY = f"""
import pathlib
pathlib.Path(__file__).with_name({MARKER!r}).write_text("ran")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
class EvilConfig(LlamaConfig):
    model_type = "evil"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def make_evil(folder: Path, known_type: bool = False) -> Path:
    """A model folder whose config and tokenizer config name custom code (``auto_map``) in ``evil.py``, which
    writes a marker file when imported. ``known_type``: a llama whose config also carries auto_map."""
    copy_model(folder)
    (folder / "evil.py").write_text(EVIL_PY)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    if not known_type:
        config["model_type"] = "evil"
    (folder / "config.json").write_text(json.dumps(config))
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    if not known_type:
        tok.pop("tokenizer_class", None)
        tok.pop("backend", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    return folder


# ---- shared runs -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def streamed(tmp_path_factory, shared_dir) -> SimpleNamespace:
    """One streamed prune of a llama whose configs carry ``auto_map``: read by D7, D13, D15, resumed by D16."""
    root = tmp_path_factory.mktemp("streamed")
    src = make_evil(root / "my-llama", known_type=True)
    out = root / "pruned"
    proc = cli("prune", src, *FAST, "--streaming", "--out", out, input="y\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return SimpleNamespace(src=src, out=out, proc=proc)


@pytest.fixture(scope="module")
def refusals(tmp_path_factory, streamed) -> SimpleNamespace:
    """Every refusal of D1, D4-D6, D8-D12, D14 and D16's resume, in one subprocess; ``results[name]`` is
    ``{rc, out, err, all}``. Inputs live in ``root``, which the tests inspect afterwards."""
    root = tmp_path_factory.mktemp("refusals")
    t = SimpleNamespace(root=root, runs={})

    # D1: a folder whose config and tokenizer name custom code; "y" answers any prompt
    t.evil = make_evil(root / "EVIL")
    (t.evil / "sparse_config.json").write_text(json.dumps({"format": "llmprune-sparse", "version": 1,
                                                           "modules": {}, "tied": {}}))
    cfg = root / "cfg.json"
    shutil.copyfile(REF_MODEL / "config.json", cfg)
    data = ["--data", CALIB_TEXT]
    t.runs.update({
        "d1 train tokenizer": ["train", cfg, "--tokenizer", t.evil, *data, "--heads", "0.25", "--steps", "2",
                               "--out", root / "o1"],
        "d1 train config": ["train", t.evil / "config.json", "--tokenizer", REF_MODEL, *data, "--steps", "2",
                            "--out", root / "o2"],
        "d1 prune": ["prune", t.evil, *FAST, "--out", root / "o3"],
        "d1 prune streamed": ["prune", t.evil, *FAST, "--streaming", "--out", root / "o4"],
        "d1 sparsify": ["sparsify", t.evil, "--method", "magnitude", "--out", root / "o5"],
        "d1 eval": ["eval", t.evil, "--no-speed", "--out", root / "o6"],
    })

    # D4-D6: a file, the source or its parent (also through a symlink), an unwritable folder
    t.model = copy_model(root / "models" / "M")
    (t.model / "NOTES.txt").write_text("my notes")
    t.model_files = {p.name: p.read_bytes() for p in t.model.iterdir()}
    t.file_out = root / "report.txt"
    t.file_out.write_text("not a folder")
    link = root / "link-to-M"
    link.symlink_to(t.model)
    if os.geteuid() == 0:  # root writes everywhere that is not read-only
        locked = Path("/proc/llmprune-test/out")
    else:
        (root / "locked").mkdir(mode=0o500)
        locked = root / "locked" / "out"
    recipe = root / "into-parent.yaml"
    recipe.write_text(f"model: {t.model}\nprune: {{ffn: 0.25, method: magnitude}}\noutput: {t.model.parent}\n")
    m, ow = t.model, "--overwrite"
    t.runs.update({
        "d4 file": ["prune", m, *FAST, "--out", t.file_out],
        "d4 file overwrite": ["prune", m, *FAST, "--out", t.file_out, ow],
        "d5 prune source": ["prune", m, *FAST, "--out", m, ow],
        "d5 prune parent": ["prune", m, *FAST, "--out", m.parent, ow],
        "d5 prune symlink": ["prune", m, *FAST, "--out", link, ow],
        "d5 sparsify": ["sparsify", m, "--method", "magnitude", "--out", m, ow],
        "d5 recover": ["recover", m, "--data", CALIB_TEXT, "--out", m, ow],
        "d5 train": ["train", m, "--data", CALIB_TEXT, "--out", m, ow],
        "d5 run": ["run", recipe, ow],
        "d5 eval": ["eval", m, "--out", m.parent, ow],
        "d5 calib parent": ["prune", m, *FAST, "--out", CALIB_TEXT.parent, ow],
        # the output is checked before anything else: a missing calibration file is not reached
        "d6 prune": ["prune", m, *FAST[:-1], "--calib", root / "nope.txt", "--out", locked],
        "d6 sparsify": ["sparsify", m, "--method", "magnitude", "--out", locked],
    })

    # D8, D9
    t.runs.update({
        "d8 prune": ["prune", REF_MODEL, *FAST[:-3], "--seq-len", "2048", "--quiet", "--out", root / "a"],
        "d8 sparsify": ["sparsify", REF_MODEL, "--calib", CALIB_TEXT, "--seq-len", "100000", "--out", root / "b"],
        "d8 streamed": ["prune", REF_MODEL, *FAST[:-3], "--seq-len", "2048", "--streaming", "--quiet",
                        "--out", root / "c"],
        "d9 prune": ["prune", REF_MODEL, *FAST[:-5], "--n-samples", "100000", "--seq-len", "256", "--max-memory",
                     "1GB", "--out", root / "d"],
        "d9 sparsify": ["sparsify", REF_MODEL, "--calib", CALIB_TEXT, "--n-samples", "100000", "--max-memory", "1GB",
                        "--out", root / "e"],
    })

    # D10: malformed recipes
    base = f"model: {REF_MODEL}\noutput: {root / 'r-out'}\n"
    t.recipes = {
        "steps.yaml": base + "prune: {heads: 0.25}\niterative_steps: two\n",
        "list.yaml": base + "prune: [0.25]\n",
        "output.yaml": f"model: {REF_MODEL}\nprune: {{heads: 0.25}}\noutput: [a, b]\n",
        "heads.yaml": base + "prune: {heads: '0.25'}\n",
        "broken.yaml": base + "prune: {heads: 0.25\n",
        "python.yaml": base + "prune: !!python/object/apply:os.system ['touch PWNED']\n",
        "nomodel.yaml": "prune: {heads: 0.25}\n",
        "broken.json": '{"model": "m", ',
        "list.json": "[1, 2]",
    }
    for name, body in t.recipes.items():
        (root / name).write_text(body)
        t.runs[f"d10 {name}"] = ["run", root / name]

    # D11: a downloaded folder whose recipe names an output
    folder = root / "downloaded"
    folder.mkdir()
    t.chosen = root / "elsewhere" / "chosen"
    saved = {"llmprune_recipe_version": 1, "source_model": str(REF_MODEL),
             "run": {"model": str(REF_MODEL), "prune": {"ffn": 0.25, "method": "magnitude"}, "output": str(t.chosen)}}
    (folder / "llmprune_recipe.json").write_text(json.dumps(saved))
    t.runs.update({"d11 folder": ["run", folder], "d11 file": ["run", folder / "llmprune_recipe.json"]})

    # D12: not a model folder, pickled weights, an unknown model_type, a too small ratio
    empty = root / "empty"
    empty.mkdir()
    pickled = root / "pickled"
    pickled.mkdir()
    shutil.copyfile(REF_MODEL / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    unknown = root / "unknown"
    unknown.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (unknown / name).symlink_to(REF_MODEL / name)
    config = json.loads((REF_MODEL / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "llama9000"}))
    out = ["--out", root / "d12-out"]
    t.runs.update({
        "d12 empty": ["prune", empty, *FAST, *out],
        "d12 pickled": ["prune", pickled, *FAST, *out],
        "d12 unknown": ["prune", unknown, *FAST, *out],
        "d12 heads": ["prune", REF_MODEL, *FAST[2:], "--heads", "0.01", *out],
    })

    # D14: an earlier report, an empty task list
    t.report = root / "report"
    t.report.mkdir()
    (t.report / "report.json").write_text("{}")
    ppl = ["--ppl", CALIB_TEXT, "--max-tokens", "256", "--seq-len", "64", "--no-speed", "--quiet"]
    t.runs.update({"d14 again": ["eval", REF_MODEL, *ppl, "--out", t.report],
                   "d14 empty tasks": ["eval", REF_MODEL, *ppl, "--tasks", "", "--out", root / "r2"]})

    # D16: --resume on the finished streamed run
    t.streamed_files = sorted(p.name for p in streamed.out.iterdir())
    t.runs["d16 resume"] = ["prune", streamed.src, *FAST, "--streaming", "--resume", "--out", streamed.out]

    names = list(t.runs)
    t.results = dict(zip(names, cli_batch(*t.runs.values(), input="y\n" * 50, cwd=root)))
    return t


def results(refusals: SimpleNamespace, prefix: str) -> dict[str, dict]:
    return {k: v for k, v in refusals.results.items() if k.startswith(prefix + " ")}


# ---- D1: never remote code ----------------------------------------------------------------------------------
def test_d1_no_entry_point_runs_a_folders_code(refusals):
    for name, r in results(refusals, "d1").items():
        one_line_error(r, "custom code")
        assert "[y/N]" not in r["all"], name
    evil = refusals.evil
    code = ("from llmprune.runtime import load_compressed; from llmprune.checkpoint.io import load_model\n"
            f"for f in (lambda: load_compressed({str(evil)!r}), lambda: load_model({str(evil)!r})):\n"
            "    try: f(); print('LOADED')\n"
            "    except ValueError as e: print('refused:', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], input="y\n" * 5, capture_output=True, text=True, env=_env(),
                          timeout=300)
    assert proc.stdout.count("refused:") == 2 and "LOADED" not in proc.stdout, proc.stdout + proc.stderr
    assert "[y/N]" not in proc.stdout + proc.stderr
    assert not (evil / MARKER).exists()
    assert not any((refusals.root / f"o{i}").exists() for i in range(1, 7))


def test_d1_every_from_pretrained_call_refuses_remote_code():
    """Static: each ``from_pretrained`` / ``from_config`` call in llmprune/, eval/ and scripts/ passes
    trust_remote_code (or the shared LOAD_KWARGS, which set it to False)."""
    missing = []
    for root in ("llmprune", "eval", "scripts", "triton_kernels"):
        for path in sorted((REPO / root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("from_pretrained",
                                                                                       "from_config"):
                    keywords = {k.arg for k in node.keywords}
                    if "trust_remote_code" not in keywords and None not in keywords:
                        missing.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not missing
    from llmprune.checkpoint.verify import LOAD_KWARGS

    assert LOAD_KWARGS["trust_remote_code"] is False


# ---- D2: the second of two runs to the same --out fails, the first's output is kept -------------------------
def test_d2_output_that_appears_during_the_run_is_kept(tmp_path):
    from llmprune.checkpoint.errors import OutputExistsError
    from llmprune.checkpoint.output import atomic_directory

    out = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="appeared while this run was working"):
        with atomic_directory(out) as tmp:
            (tmp / "mine.txt").write_text("second")
            out.mkdir()  # another run finished first
            (out / "theirs.txt").write_text("first")
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    with pytest.raises(OutputExistsError):  # an empty folder that appeared is not replaced either
        with atomic_directory(tmp_path / "b") as tmp:
            (tmp_path / "b").mkdir()
    assert not list((tmp_path / "b").iterdir())
    assert leftovers(tmp_path, "out") == [] and leftovers(tmp_path, "b") == []


def test_d2_two_cli_runs_to_one_out(tmp_path, shared_dir):
    out = tmp_path / "out"
    runs = {h: start("prune", REF_MODEL, *NOCAL[2:], "--heads", h, "--out", out) for h in ("0.25", "0.5")}
    codes = {h: p.wait(timeout=600) for h, p in runs.items()}
    errors = {h: p.stderr.read() for h, p in runs.items()}
    assert sorted(codes.values()) == [0, 2], errors
    winner = next(h for h, c in codes.items() if c == 0)
    loser = next(h for h, c in codes.items() if c == 2)
    assert "already exists" in errors[loser] or "appeared while" in errors[loser]
    recipe = json.loads((out / "llmprune_recipe.json").read_text())
    assert recipe["config"]["heads"] == float(winner)
    assert leftovers(tmp_path, "out") == []
    assert out.stat().st_mode & 0o777 == 0o777 & ~_umask()  # D7 on the in-memory save path too
    assert all(f.stat().st_mode & 0o777 == 0o666 & ~_umask() for f in out.iterdir())


# ---- D3: nothing left behind -------------------------------------------------------------------------------
def _wait_for_temp(proc: subprocess.Popen, parent: Path, name: str) -> Path:
    while proc.poll() is None:
        found = [p for p in parent.glob(f".{name}.tmp-*") if (p / ".llmprune-owner.json").is_file()]
        if found:
            return found[0]
        time.sleep(0.01)
    raise AssertionError(f"the run ended before saving: {proc.stderr.read()[-2000:]}")


def test_d3_sigterm_during_the_save_leaves_nothing(tmp_path, shared_dir):
    proc = start("prune", REF_MODEL, *NOCAL, "--out", tmp_path / "out")
    _wait_for_temp(proc, tmp_path, "out")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in proc.stderr.read()
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []


def test_d3_a_killed_runs_temp_folder_is_removed_by_the_next_run(tmp_path, shared_dir):
    proc = start("prune", REF_MODEL, *NOCAL, "--out", tmp_path / "out")
    tmp = _wait_for_temp(proc, tmp_path, "out")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=300)
    assert tmp.is_dir()  # SIGKILL cannot be caught: the folder stays until the next run
    foreign = tmp_path / ".out.tmp-not-ours"
    foreign.mkdir()  # no owner file: not llmprune's, never removed
    (result,) = cli_batch(["prune", REF_MODEL, *FAST[:-1], "--calib", tmp_path / "missing.txt", "--out",
                           tmp_path / "out"])
    assert f"removed {tmp}" in result["out"] and "interrupted run" in result["out"]
    one_line_error(result, "missing.txt")
    assert not tmp.exists() and foreign.is_dir()


def test_d3_failed_final_rename_with_overwrite_restores_the_old_output(tmp_path, monkeypatch):
    from llmprune.checkpoint import output
    from llmprune.checkpoint.output import atomic_directory

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("kept")
    real_rename = os.rename

    def failing(src, dst):
        if Path(src).name.startswith(".out.tmp-"):
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(output.os, "rename", failing)
    with pytest.raises(OSError, match="No space"):
        with atomic_directory(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert leftovers(tmp_path, "out") == []


def test_d3_output_moved_aside_by_a_killed_overwrite_is_put_back(tmp_path):
    from llmprune.checkpoint.errors import OutputExistsError
    from llmprune.checkpoint.output import OWNER_FILE, check_output_path

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    aside = tmp_path / ".out.old-abc"
    (aside / "out").mkdir(parents=True)
    (aside / "out" / "model.safetensors").write_text("the user's")
    (aside / OWNER_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with pytest.raises(OutputExistsError):  # restored first, so it is an existing output again
        check_output_path(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_text() == "the user's"
    assert leftovers(tmp_path, "out") == []


# ---- D4, D5, D6: --out a file, an input or a folder holding one, an unwritable folder ---------------------------
def test_d4_a_file_out_is_refused_with_or_without_overwrite(refusals):
    for r in results(refusals, "d4").values():
        one_line_error(r, "is a file, not a folder")
    assert refusals.file_out.read_text() == "not a folder"
    assert leftovers(refusals.root, refusals.file_out.name) == []


def test_d5_an_input_or_its_parent_is_never_the_output(refusals):
    for r in results(refusals, "d5").values():
        one_line_error(r, "never writes over its input")
    assert {p.name: p.read_bytes() for p in refusals.model.iterdir()} == refusals.model_files
    assert leftovers(refusals.model.parent, "M") == [] and CALIB_TEXT.is_file()


def test_d6_an_unwritable_output_is_refused_before_any_work(refusals):
    for r in results(refusals, "d6").values():
        one_line_error(r, "cannot write in")


# ---- D7: the umask's modes ----------------------------------------------------------------------------------
def test_d7_outputs_get_the_umask_modes(streamed):
    mask = _umask()
    assert streamed.out.stat().st_mode & 0o777 == 0o777 & ~mask
    for f in streamed.out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f.name


# ---- D8, D9: calibration that cannot work is refused up front ----------------------------------------------
def test_d8_seq_len_over_the_context_is_refused(refusals):
    for r in results(refusals, "d8").values():
        one_line_error(r, "longer than the model's context of 1024 tokens", "--seq-len 1024")
    assert not any((refusals.root / n).exists() for n in "abc")
    assert leftovers(refusals.root, "c") == []


def test_d9_calibration_over_the_memory_budget_is_refused(refusals):
    for r in results(refusals, "d9").values():
        one_line_error(r, "GB of hidden states", "memory budget of 1.0 GB")


def test_d8_d9_check_calibration_fits_api():
    from llmprune.calibration.calibrate import CalibrationError, check_calibration_fits
    from transformers import LlamaConfig

    config = LlamaConfig(max_position_embeddings=512, hidden_size=64)
    check_calibration_fits(config, 4, 512, budget=1 << 30)
    with pytest.raises(CalibrationError, match="context of 512 tokens"):
        check_calibration_fits(config, 4, 513, budget=1 << 30)
    with pytest.raises(CalibrationError, match="hidden states"):
        check_calibration_fits(config, 100_000, 512, budget=1 << 30)


# ---- D10, D11: recipes ------------------------------------------------------------------------------------
def test_d10_malformed_recipes_are_one_line(refusals):
    lines = {name: one_line_error(refusals.results[f"d10 {name}"]) for name in refusals.recipes}
    assert "'iterative_steps' must be an integer" in lines["steps.yaml"]
    assert "'prune' must be a mapping" in lines["list.yaml"]
    assert "'output' must be a string" in lines["output.yaml"]
    assert "prune.heads must be a number, got a string" in lines["heads.yaml"]
    assert "not valid YAML at line" in lines["broken.yaml"]
    assert "!!python tag" in lines["python.yaml"]
    assert "needs 'model'" in lines["nomodel.yaml"]
    assert "not valid JSON" in lines["broken.json"] and "not a mapping" in lines["list.json"]
    assert not (refusals.root / "PWNED").exists() and not (refusals.root / "r-out").exists()


def test_d11_a_saved_folder_does_not_choose_where_we_write(refusals):
    for r in results(refusals, "d11").values():
        one_line_error(r, "give --out")
    assert not refusals.chosen.parent.exists()


# ---- D12: one line each ---------------------------------------------------------------------------------------
def test_d12_bad_inputs_say_what_is_wrong_in_one_line(refusals):
    r = refusals.results
    one_line_error(r["d12 empty"], "has no config.json")
    one_line_error(r["d12 pickled"], "pickled weights are not loaded", "pytorch_model.bin")
    one_line_error(r["d12 unknown"], "unknown model_type 'llama9000'")
    line = one_line_error(r["d12 heads"], "--heads 0.01 would remove no attention head", "is 0.25")
    assert "0.5" not in line.split("exactly one is")[1]
    assert not any("streaming" in v["err"] for v in results(refusals, "d12").values())
    assert not (refusals.root / "d12-out").exists()


def test_d12_push_refused_by_the_hub_is_one_line(tmp_path, shared_dir):
    from hub_server import LocalHub

    folder = copy_model(tmp_path / "m")
    with LocalHub(tmp_path / "hub") as hub:
        hub.state.unauthorized = True
        env = {k: v for k, v in _env().items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "home"), HF_HUB_DISABLE_XET="1", HF_TOKEN="hf_bad",
                   HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5")
        proc = subprocess.run([sys.executable, "-m", "llmprune", "push", str(folder), "acme/x"], env=env,
                              capture_output=True, text=True, timeout=300)
    one_line_error({"rc": proc.returncode, "err": proc.stderr}, "refused by the Hub (401)", "--token")


# ---- D13: auto_map is not carried into outputs -------------------------------------------------------------
def test_d13_auto_map_dropped_from_outputs_with_a_warning(streamed, tmp_path):
    assert "custom code (auto_map) is not used" in streamed.proc.stderr
    for out in (streamed.out, _save_in_memory(streamed.src, tmp_path / "mem")):
        assert "auto_map" not in json.loads((out / "config.json").read_text())
        assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())
        assert not (out / "evil.py").exists()
    assert not (streamed.src / MARKER).exists()
    assert "auto_map" in json.loads((streamed.src / "config.json").read_text())  # the source is untouched


def _save_in_memory(src: Path, out: Path) -> Path:
    from llmprune.checkpoint.io import load_model, save_pruned

    model, tok = load_model(src)
    return save_pruned(model, out, tokenizer=tok, source=str(src), verify=False)


# ---- D14: eval reports ----------------------------------------------------------------------------------------
def test_d14_eval_report_is_never_replaced_silently(refusals):
    one_line_error(refusals.results["d14 again"], "already exists", "--overwrite")
    one_line_error(refusals.results["d14 empty tasks"], "--tasks is empty")
    assert (refusals.report / "report.json").read_text() == "{}" and not (refusals.root / "r2").exists()


def test_d14_report_save_is_atomic_and_new(tmp_path):
    from llmprune.checkpoint.errors import OutputExistsError
    from llmprune.eval.report import Report

    rep = Report({"m": {"params": {"total": 10}}}, {})
    paths = rep.save(tmp_path / "r")
    assert json.loads(paths["json"].read_text())["results"]["m"]["params"]["total"] == 10
    assert (tmp_path / "r").stat().st_mode & 0o777 == 0o777 & ~_umask()
    with pytest.raises(OutputExistsError):
        rep.save(tmp_path / "r")
    rep.save(tmp_path / "r", overwrite=True)
    assert leftovers(tmp_path, "r") == []


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- D15: no absolute local paths in what push uploads --------------------------------------------------------
def test_d15_card_and_recipe_name_the_model_not_its_local_path(streamed):
    card = (streamed.out / "README.md").read_text()
    recipe_text = (streamed.out / "llmprune_recipe.json").read_text()
    assert "# Pruned my-llama" in card
    for text in (card, recipe_text, (streamed.out / "llmprune_plan.json").read_text()):
        assert str(streamed.src.parent) not in text and str(CALIB_TEXT.parent) not in text and "/tmp" not in text
    recipe = json.loads(recipe_text)
    assert recipe["source_model"] == "my-llama" and recipe["run"]["model"] == "my-llama"
    assert recipe["calibration"] == CALIB_TEXT.name and recipe["run"]["calibration"] == CALIB_TEXT.name


def test_d15_public_names():
    from llmprune.checkpoint.io import public_name

    assert public_name("/home/me/models/ref-llama-7m") == "ref-llama-7m"
    assert public_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert public_name("wikitext2", keep_relative=True) == "wikitext2"
    assert public_name("~/data/train.txt", keep_relative=True) == "train.txt"
    assert public_name("data/train.txt", keep_relative=True) == "data/train.txt"
    assert public_name("../data/train.txt", keep_relative=True) == "train.txt"


# ---- D16: --resume on a finished streamed run ---------------------------------------------------------------
def test_d16_resume_after_a_finished_streamed_run_says_complete(refusals, streamed):
    r = refusals.results["d16 resume"]
    assert r["rc"] == 0, r["err"]
    assert "already complete" in r["out"]
    assert sorted(p.name for p in streamed.out.iterdir()) == refusals.streamed_files

"""Recovery training after pruning: LoRA (through peft, merged at the end) or full fine-tuning, optionally
distilled from the unpruned model, run under ``accelerate``; resumable after a kill.

The model keeps its pruned shapes and config type (per-layer widths included): LoRA adapters sit on the
decoder blocks' Linear layers and are merged into them before the result is returned, so the output is again
a plain checkpoint that loads without peft.

Example::

    model, tok = llmprune.load_model("runs/pruned")
    teacher, _ = llmprune.load_model("../shared/models/ref-llama-7m", with_tokenizer=False)
    result = recover(model, RecoveryConfig(steps=300), data="../shared/data/reference-train.txt",
                     tokenizer=tok, teacher=teacher)
    result.history[-1]   # {"step": 300, "loss": ..., "eval_ppl": ...}

Data: the text is tokenised once; the last ``eval_windows * seq_len`` tokens are the held-out slice, and
every training window is drawn from the rest at a position that depends only on (seed, step, process), so a
resumed run reads exactly the windows an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import get_adapter
from ..calibration.calibrate import CalibrationError

__all__ = ["RecoveryConfig", "RecoveryResult", "recover", "training_windows", "STATE_DIR_SUFFIX"]

#: resumable state of ``recover(..., state_dir=out + STATE_DIR_SUFFIX)`` (the CLI keeps it beside the output)
STATE_DIR_SUFFIX = ".recover-state"


@dataclass
class RecoveryConfig:
    """How to train a pruned model back (round-trips through JSON; stored in the output's recipe).

    Attributes:
        steps: optimizer steps; each sees ``batch_size * grad_accum`` windows of ``seq_len`` tokens per process.
        lr: peak learning rate (linear warm-up over ``warmup_steps``, then cosine decay to 10%).
        full: train every parameter instead of LoRA adapters.
        lora_r, lora_alpha, lora_dropout: LoRA rank, scale and dropout (peft).
        lora_targets: ``all-linear`` (every Linear inside the decoder blocks) or module-name suffixes.
        kd_alpha, kd_temperature: with a teacher, loss = (1 - a) * LM loss + a * T^2 * KL(teacher_T || student_T).
        eval_every, eval_windows: held-out perplexity every K steps on that many windows (the best is kept).
        save_every: steps between resumable checkpoints (0: at every evaluation).
    """

    steps: int = 300
    lr: float = 1e-3
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 256
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    full: bool = False
    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["all-linear"])
    kd_alpha: float = 0.5
    kd_temperature: float = 2.0
    eval_every: int = 50
    eval_windows: int = 16
    save_every: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.lora_targets, str):
            self.lora_targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
        self.validate()

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_every", "eval_windows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be an integer >= 1")
        if not self.full and self.lora_r < 1:
            raise ValueError(f"lora_r={self.lora_r!r} must be >= 1 (or use full fine-tuning)")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} must be > 0")
        if not 0.0 <= self.kd_alpha <= 1.0 or not self.kd_temperature > 0:
            raise ValueError("kd_alpha must be in [0, 1] and kd_temperature > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RecoveryConfig":
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown RecoveryConfig field(s): {', '.join(unknown)}")
        return cls(**data)


@dataclass
class RecoveryResult:
    model: nn.Module
    config: RecoveryConfig
    history: list[dict[str, float]] = field(default_factory=list)
    best_step: int = 0
    best_eval_ppl: float = float("nan")
    seconds: float = 0.0
    tokens: int = 0


# ---- data -------------------------------------------------------------------------------------------------
def _token_stream(data: Any, tokenizer: Any) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data.reshape(-1).long()
    if tokenizer is None:
        raise CalibrationError("recovery from text needs the model's tokenizer (tokenizer=...)")
    from ..calibration.calibrate import read_calibration_text

    text = read_calibration_text(data) if isinstance(data, (str, os.PathLike)) and (
        os.path.isfile(os.fspath(data)) or len(os.fspath(data)) < 4096) else str(data)
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def training_windows(stream: torch.Tensor, step: int, n: int, seq_len: int, seed: int, process: int = 0) -> torch.Tensor:
    """The ``[n, seq_len]`` windows of ``step`` for ``process``: a pure function of its arguments (resumable)."""
    g = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + process) % (2 ** 63))
    starts = torch.randint(0, stream.numel() - seq_len + 1, (n,), generator=g)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


# ---- model ------------------------------------------------------------------------------------------------
def _lora_target_names(model: nn.Module, targets: list[str]) -> list[str]:
    layers = get_adapter(model).decoder_layers(model)
    block_ids = {id(m) for layer in layers for m in layer.modules()}
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) in block_ids]
    if targets != ["all-linear"]:
        names = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        raise ValueError(f"lora_targets={targets} match no Linear layer inside the decoder blocks")
    return names


def _wrap_lora(model: nn.Module, config: RecoveryConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=_lora_target_names(model, config.lora_targets), bias="none")
    return get_peft_model(model, lora)


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# ---- loss and evaluation ----------------------------------------------------------------------------------
def _loss(model: nn.Module, ids: torch.Tensor, teacher: nn.Module | None, config: RecoveryConfig) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    if teacher is None or config.kd_alpha == 0:
        return lm
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, use_cache=False).logits[:, :-1].float()
    T = config.kd_temperature
    kd = F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(t_logits / T, -1), log_target=True,
                  reduction="batchmean") / ids.shape[1] * T * T
    return (1 - config.kd_alpha) * lm + config.kd_alpha * kd


@torch.no_grad()
def _eval_nll(model: nn.Module, windows: torch.Tensor, accelerator: Any, batch: int) -> float:
    """Mean next-token NLL on the held-out windows, each process scoring its share (gathered)."""
    was = model.training
    model.eval()
    mine = windows[accelerator.process_index :: accelerator.num_processes]
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for part in mine.split(batch):
        part = part.to(accelerator.device)
        logits = model(input_ids=part, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), part[:, 1:].reshape(-1), reduction="sum")
        total += torch.tensor([float(nll), part[:, 1:].numel()], dtype=torch.float64, device=total.device)
    total = accelerator.reduce(total, reduction="sum")
    model.train(was)
    return float(total[0] / total[1])


# ---- resumable state (safetensors + JSON: nothing is unpickled) ------------------------------------------
def _save_state(path: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                extra: dict[str, Any], best: dict[str, torch.Tensor] | None = None) -> None:
    from safetensors.torch import save_file

    from ..checkpoint.io import atomic_directory

    with atomic_directory(path, overwrite=True) as tmp:
        params = {n: p.detach().cpu().contiguous() for n, p in _trainable(model).items()}
        save_file(params, str(tmp / "trainable.safetensors"))
        if best is not None:  # the best held-out weights so far (a resumed run must end on the same ones)
            save_file({n: t.contiguous() for n, t in best.items()}, str(tmp / "best.safetensors"))
        opt = optimizer.state_dict()
        tensors, meta = {}, {"param_groups": opt["param_groups"], "state": {}}
        for idx, st in opt["state"].items():
            meta["state"][str(idx)] = {}
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
                else:
                    meta["state"][str(idx)][k] = v
        tensors["__torch_rng__"] = torch.get_rng_state()
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer": meta,
                                                    "scheduler": scheduler.state_dict(), **extra}))


def _load_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    from safetensors.torch import load_file

    meta = json.loads((path / "state.json").read_text())
    params = load_file(str(path / "trainable.safetensors"))
    trainable = _trainable(model)
    if set(params) != set(trainable):
        raise ValueError(f"{path} was written for another model or recovery setting; remove it or drop --resume")
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(params[n])
    tensors = load_file(str(path / "optimizer.safetensors"))
    state = {}
    for idx, st in meta["optimizer"]["state"].items():
        state[int(idx)] = dict(st)
        for key in list(tensors):
            if key.startswith(f"{idx}."):
                state[int(idx)][key[len(idx) + 1 :]] = tensors[key]
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["__torch_rng__"])
    return meta


# ---- the loop ---------------------------------------------------------------------------------------------
def recover(
    model: nn.Module,
    config: RecoveryConfig | None = None,
    data: Any = None,
    tokenizer: Any = None,
    teacher: nn.Module | None = None,
    state_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    accelerator: Any = None,
    stop_after: int | None = None,
    callback: Any = None,
) -> RecoveryResult:
    """Train ``model`` (pruned, in place) back towards the dense model; returns the best held-out checkpoint.

    Args:
        data: text file, text, or a 1-D/2-D tensor of token ids (concatenated into one stream).
        teacher: the unpruned model for distillation (same tokenizer), or ``None`` for LM loss only.
        state_dir: folder for resumable checkpoints (every ``save_every``/``eval_every`` steps);
            ``resume=True`` continues from it. Nothing in it is unpickled.
        accelerator: an ``accelerate.Accelerator`` (default: a new one with ``grad_accum``).
        stop_after: stop (without the final merge) after this many steps, as a kill would (tests).
        callback: an object with ``on_step_end(step, lr) -> plan | None`` called after every optimizer step
            (e.g. :class:`llmprune.training.one_cycle.OneCycle`); when it returns a plan the model's shapes changed, so
            the optimizer is rebuilt on the same schedule. Needs ``full=True`` or a callback that merges LoRA
            adapters itself (``OneCycle``: training continues with fresh adapters); runs with a callback are not
            resumable and keep the best step only among those after the last structural change.
    """
    from accelerate import Accelerator

    config = config or RecoveryConfig()
    config.validate()
    if callback is not None and not config.full and not hasattr(callback, "peft"):
        raise ValueError("pruning during training changes parameter shapes: use full fine-tuning (--full), or a "
                         "callback that can merge LoRA adapters (llmprune.training.one_cycle.OneCycle)")
    if data is None:
        raise CalibrationError("recovery needs training data: pass data=<text file, text or token ids>")
    stream = _token_stream(data, tokenizer)
    held = config.eval_windows * config.seq_len
    if stream.numel() < held + 4 * config.seq_len:
        raise CalibrationError(f"recovery data has {stream.numel()} tokens; need at least {held + 4 * config.seq_len} "
                               f"({config.eval_windows} held-out windows plus training windows of {config.seq_len})")
    train_stream, eval_windows = stream[:-held], stream[-held:].reshape(config.eval_windows, config.seq_len)
    torch.manual_seed(config.seed)
    accelerator = accelerator or Accelerator(gradient_accumulation_steps=config.grad_accum)
    model.train()
    if config.full:
        for p in model.parameters():
            p.requires_grad_(True)
        work = model
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        work = _wrap_lora(model, config)
    params = list(_trainable(work).values())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)

    def schedule(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        t = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    # the scheduler is stepped by hand once per optimizer step: accelerate's wrapper would step it once per
    # process, which would make the schedule depend on the process count
    work, optimizer = accelerator.prepare(work, optimizer)
    if teacher is not None:
        teacher = teacher.to(accelerator.device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    state_path = Path(state_dir) if state_dir is not None else None
    start, history, best = 0, [], {"ppl": float("inf"), "step": 0, "params": None}
    unwrapped = accelerator.unwrap_model(work)
    if callback is not None and not config.full:
        callback.peft = unwrapped
    if resume and state_path is not None and (state_path / "state.json").is_file():
        meta = _load_state(state_path, unwrapped, optimizer, scheduler)
        start, history = meta["step"], meta["history"]
        best.update(ppl=meta["best_ppl"], step=meta["best_step"])
        if (state_path / "best.safetensors").is_file():
            from safetensors.torch import load_file

            best["params"] = load_file(str(state_path / "best.safetensors"))

    save_every = config.save_every or config.eval_every
    t0, tokens = time.perf_counter(), 0
    from ..core.progress import progress_bar

    bar = progress_bar(range(start, config.steps), desc="recover", disable=not progress or not accelerator.is_main_process,
                       initial=start, total=config.steps)
    loss_value = float("nan")
    for step in bar:
        for micro in range(config.grad_accum):
            ids = training_windows(train_stream, step * config.grad_accum + micro, config.batch_size, config.seq_len,
                                   config.seed, accelerator.process_index).to(accelerator.device)
            with accelerator.accumulate(work):
                loss = _loss(work, ids, teacher, config)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            tokens += ids.numel() * accelerator.num_processes
            loss_value = float(loss.detach())
        done = step + 1
        record = {"step": done, "loss": loss_value}
        if callback is not None and callback.on_step_end(done, scheduler.get_last_lr()[0]) is not None:
            # the structure changed: a fresh optimizer over the new parameters, the same schedule position
            if not config.full:  # the adapters were merged into the cut model: fresh ones on the smaller model
                for p in model.parameters():
                    p.requires_grad_(False)
                work = accelerator.prepare(_wrap_lora(model, config))
                unwrapped = accelerator.unwrap_model(work)
            params = list(_trainable(work).values())
            optimizer = accelerator.prepare(torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay))
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
            for _ in range(done):
                optimizer.step()  # no gradients yet: only advances the schedule without a warning
                scheduler.step()
            best.update(ppl=float("inf"), step=0, params=None)
            record["committed"] = True
            state_path = None
        if done % config.eval_every == 0 or done == config.steps:
            ppl = math.exp(_eval_nll(work, eval_windows, accelerator, config.batch_size))
            record["eval_ppl"] = ppl
            if ppl < best["ppl"]:
                best.update(ppl=ppl, step=done,
                            params={n: p.detach().cpu().clone() for n, p in _trainable(unwrapped).items()})
        history.append(record)
        if hasattr(bar, "set_postfix"):
            elapsed = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{loss_value:.3f}", eval_ppl=f"{history_ppl(history):.1f}",
                            tok_s=f"{tokens / elapsed:.0f}")
        if state_path is not None and (done % save_every == 0) and done < config.steps and accelerator.is_main_process:
            _save_state(state_path, done, unwrapped, optimizer, scheduler,
                        {"history": history, "best_ppl": best["ppl"], "best_step": best["step"],
                         "config": config.to_dict()}, best["params"])
        accelerator.wait_for_everyone()
        if stop_after is not None and done >= stop_after:
            return RecoveryResult(model=unwrapped, config=config, history=history, best_step=best["step"],
                                  best_eval_ppl=best["ppl"], seconds=time.perf_counter() - t0, tokens=tokens)

    if best["params"] is not None:  # keep the best held-out checkpoint
        with torch.no_grad():
            for n, p in _trainable(unwrapped).items():
                p.copy_(best["params"][n].to(p.device, p.dtype))
    final = unwrapped.merge_and_unload() if not config.full else unwrapped
    for p in final.parameters():
        p.requires_grad_(False)
    final.eval()
    return RecoveryResult(model=final, config=config, history=history, best_step=best["step"],
                          best_eval_ppl=best["ppl"], seconds=time.perf_counter() - t0, tokens=tokens)


def history_ppl(history: list[dict[str, float]]) -> float:
    """The latest held-out perplexity in ``history`` (nan before the first evaluation)."""
    for record in reversed(history):
        if "eval_ppl" in record:
            return record["eval_ppl"]
    return float("nan")

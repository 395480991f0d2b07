"""``params``: a target fraction of *all* parameters split among the vocabulary, hidden and block axes (Minitron).

Candidates: a grid of shares ``(vocab, hidden, blocks)`` of the target, multiples of ``1 / SHARE_STEPS`` summing to
1 (:func:`share_grid`): 10 candidates with both the vocabulary and the hidden axis, 4 with one of them, 1 with
neither; those that cannot be realised are skipped, with the reason in the report. The vocabulary share removes
that many parameters in vocabulary rows (embedding and untied LM-head rows; a tied head counts once), in whole rows
(``vocab``, :mod:`.vocab`); the hidden share gives ``hidden = share * params`` (every weight matrix and the
embeddings have a hidden side); heads and FFN neurons remove the rest at about the same ratio ``b``. Heads come in
whole attention units, so the heads ratio is rounded to the nearest achievable one and the FFN ratio solved exactly
for the budget. A split that would need a heads / FFN ratio outside ``[0, 0.95]``, or more vocabulary rows than the
vocabulary stage may remove (specials, the byte alphabet and their merges always stay), is skipped.

The vocabulary axis is a candidate only with a tokenizer that can be rewritten (byte-level or byte-fallback BPE) and
calibration given as text; otherwise its share is 0 and the report's ``notes`` say why.

Each candidate is *measured*: a copy of the model is pruned by a stand-in (the run's hidden criterion, ``wanda``
with uniform widths for heads and neurons, and the candidate's vocabulary rows by token frequency) calibrated on
the calibration text less a held-out part, and scored on the held-out text in nats per byte of text, each
candidate with its own tokenizer (:func:`llmprune.calibration.held_out.text_loss`), so candidates that rewrite the
tokenizer compare fairly with those that do not. The stand-in refits (``reconstruct=True``) exactly when the run's
final method does (:func:`~.criteria.base.final_refits`: the method declares ``refits``, as ``obs`` does, or the
config asks for ``reconstruct``): a stand-in without the final method's refit favours the axes the refit does not
improve. Calibration given as token ids has no text to hold out: the last quarter of the windows is held out and
the loss is per token (the tokenizer is the same for every candidate then). The split with the lowest loss is then
pruned with the run's own method. Cost: one stand-in prune and one loss pass per candidate, on top of the real prune.

Example::

    cfg, report = choose_split(model, adapter, PruneConfig(params=0.25), batches, llmprune.prune,
                               tokenizer=tok, text=calibration_text)
    cfg.vocab, cfg.hidden, cfg.heads, cfg.ffn    # the measured best split; report["candidates"] lists them all
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..arch import ArchAdapter
from ..arch.surgery import count_parameters
from ..calibration.calibrate import CalibrationError, as_batches, read_calibration_text
from ..calibration.held_out import chars_per_token, split_held_out, text_loss
from ..checkpoint.tokenizer_prune import TokenizerPruneError, merge_closure, prune_tokenizer, tokenizer_vocab
from ..core.config import PruneConfig, RatioError
from ..core.progress import progress_bar
from .criteria.base import final_refits
from .criteria.units import get_unit_criterion
from .hidden import hidden_to_remove
from .select import units_to_remove
from .vocab import config_token_ids, count_tokens, prune_vocab

__all__ = ["SHARE_STEPS", "PROXY_METHOD", "MAX_BLOCK_RATIO", "HELD_OUT", "share_grid", "parameter_groups",
           "split_for", "calibration_loss", "VocabAxis", "vocab_axis", "choose_split"]

#: the shares of the parameter target are multiples of 1 / SHARE_STEPS (10 candidates with all three axes)
SHARE_STEPS = 3
#: the stand-in that prunes heads and neurons of each candidate (with the final method's refit, if it refits)
PROXY_METHOD = "wanda"
#: the largest heads / FFN ratio a candidate may ask for
MAX_BLOCK_RATIO = 0.95
#: the part of the calibration held out to score the candidates (of its windows' worth of text)
HELD_OUT = 0.25


def share_grid(vocab: bool, hidden: bool, steps: int = SHARE_STEPS) -> list[tuple[float, float, float]]:
    """The ``(vocab, hidden, blocks)`` shares of the target measured: multiples of ``1 / steps`` summing to 1, an
    unavailable axis at 0.

    Example::

        len(share_grid(True, True)), len(share_grid(False, True)), share_grid(False, False)   # 10, 4, [(0, 0, 1)]
    """
    return [(v / steps, h / steps, (steps - v - h) / steps)
            for v in range(steps + 1 if vocab else 1) for h in range(steps + 1 - v if hidden else 1)]


def _count(module: Any, names: Sequence[str] = ("weight", "bias")) -> int:
    return sum(t.numel() for t in (getattr(module, n, None) for n in names) if isinstance(t, torch.Tensor))


def parameter_groups(model: nn.Module, adapter: ArchAdapter) -> dict[str, int]:
    """``total`` distinct parameters; those of the attention and FFN projections; ``per_query`` / ``per_kv``: the
    parameters one query head (its q rows and o columns) and one KV head (k and v rows) own, summed over layers
    (``query`` units remove only the former, ``group`` units both); ``vocab``: those of the vocabulary rows (the
    embedding, and an untied LM head's rows and bias; a tied head counts once) and ``rows``, their number."""
    attention = ffn = per_query = per_kv = 0
    d = int(model.config.hidden_size)
    for layer in adapter.decoder_layers(model):
        attn, mlp, moe = adapter.attention(layer), adapter.ffn(layer), adapter.experts(layer)
        if attn is not None:
            attention += sum(_count(m) for m in {id(s.module): s.module for s in attn.q_slots + attn.kv_slots}.values())
            per_query += 2 * d * attn.head_dim  # weights only: biases are a rounding error here
            per_kv += 2 * d * attn.head_dim
        if mlp is not None:
            ffn += sum(_count(m) for m in {id(s.module): s.module for s in mlp.slots}.values())
        if moe is not None:
            ffn += sum(getattr(p.module, p.name).numel() for p in moe.params)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    rows = int(emb.weight.shape[0])
    vocab = emb.weight.numel()
    if head is not None and int(head.weight.shape[0]) == rows:
        vocab += _count(head, ("bias",) if head.weight is emb.weight else ("weight", "bias"))
    return {"total": count_parameters(model), "attention": attention, "ffn": ffn, "per_query": per_query,
            "per_kv": per_kv, "vocab": vocab, "rows": rows}


def _heads_removed(model: nn.Module, adapter: ArchAdapter, cfg: PruneConfig, ratio: float, rounding: str,
                   groups: dict[str, int]) -> tuple[float, float]:
    """``(heads fraction, attention fraction)`` a uniform ``ratio`` removes in whole attention units (first
    attention layer's geometry); ``(-1, -1)`` when it cannot be realised."""
    from .select import resolve_config

    attn = next((a for a in map(adapter.attention, adapter.decoder_layers(model)) if a is not None), None)
    if ratio <= 0 or attn is None:
        return 0.0, 0.0
    unit_mode = resolve_config(model, adapter, dataclasses.replace(cfg, heads=ratio, params=0.0)).attention_unit
    unit = attn.group_size if unit_mode == "group" or attn.group_size == 1 else attn.num_kv_heads
    try:
        n = units_to_remove(ratio, attn.num_heads, unit, rounding)
    except RatioError:
        return -1.0, -1.0
    a = n * unit / attn.num_heads
    removed = a * groups["per_query"] * attn.num_heads
    if unit_mode == "group" or attn.group_size == 1:
        removed += a * groups["per_kv"] * attn.num_kv_heads
    return a, removed / max(1, groups["attention"])


def _vocab_ratio(cfg: PruneConfig, share: float, groups: dict[str, int]) -> float:
    """The fraction of vocabulary rows whose parameters are ``share`` of the target, in whole rows."""
    rows = groups["rows"]
    return round(share * cfg.params * groups["total"] / max(1, groups["vocab"]) * rows) / rows if share > 0 else 0.0


def split_for(model: nn.Module, adapter: ArchAdapter, cfg: PruneConfig, share: float,
              groups: dict[str, int] | None = None, vocab_share: float = 0.0,
              max_vocab: float = 0.0) -> PruneConfig | None:
    """The config removing ``cfg.params`` of all parameters with ``share`` of it on the hidden axis and
    ``vocab_share`` on vocabulary rows (at most ``max_vocab`` of them), the rest on heads and FFN neurons
    (``None`` when no ratio in range meets the budget)."""
    groups = groups or parameter_groups(model, adapter)
    total, attention, ffn = groups["total"], groups["attention"], groups["ffn"]
    d = int(model.config.hidden_size)
    vocab = _vocab_ratio(cfg, vocab_share, groups)
    if vocab_share > 0 and not 0 < vocab <= max_vocab:
        return None
    hidden = 0.0
    if share > 0:
        try:
            hidden = hidden_to_remove(share * cfg.params, d) / d
        except RatioError:
            return None
        if hidden == 0:
            return None
    # After: (1 - hidden) * (rest - vocab * V + attention - removed_attention + (1 - f) * ffn) = (1 - params) * total
    need = (1 - cfg.params) * total / (1 - hidden)
    rest = total - attention - ffn - vocab * groups["vocab"]
    b = 1 - (need - rest) / max(1, attention + ffn)
    if b < -0.02 or b > MAX_BLOCK_RATIO:
        return None
    base = dataclasses.replace(cfg, params=0.0, vocab=round(vocab, 8), hidden=round(hidden, 6))
    if b <= 0:
        return dataclasses.replace(base, heads=0.0, ffn=0.0)
    for rounding in ("nearest", "down"):
        a, attn_frac = _heads_removed(model, adapter, cfg, b, rounding, groups) if attention else (0.0, 0.0)
        if a < 0:
            continue
        f = 1 - (need - rest - (1 - attn_frac) * attention) / max(1, ffn) if ffn else 0.0
        if 0.0 <= f <= MAX_BLOCK_RATIO:
            f = round(f, 4) if f * min(_ffn_widths(model, adapter) or [1]) >= 0.5 else 0.0  # < half a neuron: none
            return dataclasses.replace(base, heads=round(a, 6), ffn=f)
    return None


def _ffn_widths(model: nn.Module, adapter: ArchAdapter) -> list[int]:
    out = []
    for layer in adapter.decoder_layers(model):
        mlp, moe = adapter.ffn(layer), adapter.experts(layer)
        out += [x.num_neurons for x in (mlp, moe) if x is not None]
    return out


@torch.no_grad()
def calibration_loss(model: nn.Module, batches: Sequence[torch.Tensor]) -> float:
    """Mean next-token loss over ``batches`` (every window's tokens weighted equally)."""
    device = next(model.parameters()).device
    total = count = 0.0
    for batch in batches:
        ids = batch.to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total += float(loss)
        count += ids[:, 1:].numel()
    return total / max(1.0, count)


@dataclass
class VocabAxis:
    """What the vocabulary candidates need, read once: the tokenizer, its vocabulary and the token counts of the
    domain text; ``max_ratio`` is the largest fraction of rows the vocabulary stage can remove."""

    tokenizer: Any
    vocab: Any
    counts: torch.Tensor
    rows: int
    max_ratio: float
    model_config: Any
    _cut: dict[int, tuple[list[int], Any]] = dataclasses.field(default_factory=dict, repr=False)

    def cut(self, ratio: float) -> tuple[list[int], Any]:
        """The kept token ids and the rewritten tokenizer for ``ratio`` of the rows (as :func:`.vocab.choose_vocab`),
        cached per row count."""
        n_keep = self.rows - int(round(ratio * self.rows))
        if n_keep not in self._cut:
            kept = get_unit_criterion("vocab").fn(self.counts, self.vocab, n_keep)
            self._cut[n_keep] = kept, prune_tokenizer(self.tokenizer, kept, self.model_config)
        return self._cut[n_keep]


def vocab_axis(model: nn.Module, cfg: PruneConfig, tokenizer: Any, text: str | None) -> tuple[VocabAxis | None, str]:
    """The vocabulary axis with its tokens counted in ``cfg.vocab_text`` or ``text`` (the calibration text less the
    held-out part), or ``None`` and why it is not a candidate."""
    if tokenizer is None:
        return None, "vocabulary axis not measured: no tokenizer was given"
    if text is None:
        return None, "vocabulary axis not measured: it needs the calibration as text (token ids were given)"
    rows = int(model.get_input_embeddings().weight.shape[0])
    try:
        vocab = tokenizer_vocab(tokenizer, extra_required=[i for i in config_token_ids(model) if 0 <= i < rows])
    except TokenizerPruneError as err:
        return None, f"vocabulary axis not measured: {err}"
    if vocab.size > rows:
        return None, (f"vocabulary axis not measured: the tokenizer has {vocab.size} token ids but the embedding "
                      f"only {rows} rows")
    counts = count_tokens(tokenizer, read_calibration_text(cfg.vocab_text) if cfg.vocab_text else text, rows)
    n_required = len(merge_closure(vocab.required, vocab.parents))
    return VocabAxis(tokenizer, vocab, counts, rows, (rows - n_required) / rows, model.config), ""


def _held_out(cfg: PruneConfig, tokenizer: Any, text: str | None, batches: Sequence[torch.Tensor]
              ) -> tuple[list[torch.Tensor], str | None, list[torch.Tensor], str | None]:
    """``(stand-in calibration, held-out text, held-out windows, calibration text less the held-out)``: a text is
    split (:func:`~llmprune.calibration.held_out.split_held_out`) into a part the stand-ins calibrate on and the
    :data:`HELD_OUT` share of the windows' worth of text they are scored on; token ids keep their last quarter."""
    if text is not None and tokenizer is not None:
        held_windows = max(1, int(cfg.n_samples * HELD_OUT))
        chars = math.ceil(held_windows * cfg.seq_len * chars_per_token(tokenizer, text))
        calib_text, held = split_held_out(text, min(len(text) // 4, chars))
        try:
            calib = as_batches(calib_text, tokenizer, max(1, cfg.n_samples - held_windows), cfg.seq_len, cfg.seed,
                               cfg.batch_size)
            if held.strip():
                return list(calib or ()), held, [], calib_text
        except CalibrationError:
            pass  # too short to hold out a part: per token on windows, below
    held_n = max(1, len(batches) // 4) if len(batches) > 1 else 0
    if not held_n:
        return list(batches), None, list(batches), None
    return list(batches[:-held_n]), None, list(batches[-held_n:]), None


def choose_split(model: nn.Module, adapter: ArchAdapter, cfg: PruneConfig, batches: Sequence[torch.Tensor],
                 prune: Callable[..., Any], device: Any = None, progress: bool = True, tokenizer: Any = None,
                 text: str | None = None) -> tuple[PruneConfig, dict[str, Any]]:
    """Measure every candidate split of ``cfg.params`` and return the best one's config (the run's method and
    options, ``params`` 0, the chosen ``vocab`` / ``hidden`` / ``heads`` / ``ffn``) with a report: ``{"target",
    "proxy", "proxy_refits", "loss_unit", "candidates": [...], "chosen", "skipped", "notes"}``. ``text`` is the
    calibration text (``None``: token ids), ``tokenizer`` the model's. ``prune`` is :func:`llmprune.prune` (passed
    in: the pipeline calls this module)."""
    groups = parameter_groups(model, adapter)
    calib, held, evaluation, calib_text = _held_out(cfg, tokenizer, text, batches)
    notes: list[str] = []
    if held is None and text is not None:
        axis, why = None, "vocabulary axis not measured: the calibration text is too short to hold out a part"
    else:
        axis, why = vocab_axis(model, cfg, tokenizer, calib_text)
    if why:
        notes.append(why)
    if adapter.hidden_refusal:
        notes.append(f"hidden axis not measured: {adapter.hidden_refusal}")
    refits = final_refits(cfg)
    candidates: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for v_share, h_share, b_share in progress_bar(share_grid(axis is not None, not adapter.hidden_refusal),
                                                  desc="params split", disable=not progress):
        shares = {"vocab_share": round(v_share, 4), "hidden_share": round(h_share, 4),
                  "blocks_share": round(b_share, 4)}
        split = split_for(model, adapter, cfg, h_share, groups, v_share, axis.max_ratio if axis else 0.0)
        if split is None:
            v = _vocab_ratio(cfg, v_share, groups)
            skipped.append({**shares, "why": f"vocab ratio {v:.3f} is beyond the {axis.max_ratio:.3f} the vocabulary "
                            "stage allows" if axis and v > axis.max_ratio else
                            f"no heads / FFN ratio in [0, {MAX_BLOCK_RATIO}] meets the target"})
            continue
        kept, tok = None, tokenizer
        if split.vocab and axis is not None:  # before any pruning: a tokenizer it cannot rewrite skips it
            try:
                kept, tok = axis.cut(split.vocab)
            except (TokenizerPruneError, RatioError) as err:
                skipped.append({**shares, "why": f"the tokenizer cannot be rewritten for it: {err}"})
                continue
        trial = copy.deepcopy(model)
        proxy = dataclasses.replace(split, vocab=0.0, method=PROXY_METHOD, allocation="uniform", reconstruct=refits,
                                    bias_compensation=False)
        if proxy.hidden or proxy.heads or proxy.ffn:
            prune(trial, proxy, calibration=calib, device=device, progress=False)
        if kept is not None:
            prune_vocab(trial, kept)
        was_training = trial.training
        trial.eval()
        loss = (text_loss(trial, tok, held, cfg.seq_len, cfg.batch_size).per_byte if held is not None
                else calibration_loss(trial, evaluation))
        trial.train(was_training)
        candidates.append({**shares, "vocab": split.vocab, "hidden": split.hidden, "heads": split.heads,
                           "ffn": split.ffn, "removed": 1 - count_parameters(trial) / groups["total"], "loss": loss,
                           "loss_per_byte": loss if held is not None else None})
        del trial
    if not candidates:
        raise RatioError(f"--params {cfg.params:g}: no split of vocabulary rows, hidden channels, heads and FFN "
                         f"neurons reaches it (each heads / FFN ratio at most {MAX_BLOCK_RATIO}); lower --params")
    best = min(range(len(candidates)), key=lambda i: candidates[i]["loss"])
    c = candidates[best]
    chosen = dataclasses.replace(cfg, params=0.0, vocab=c["vocab"], hidden=c["hidden"], heads=c["heads"], ffn=c["ffn"])
    return chosen, {"target": cfg.params, "proxy": PROXY_METHOD, "proxy_refits": refits,
                    "loss_unit": "nats per byte of held-out text" if held is not None else "nats per token",
                    "held_out_chars": len(held) if held is not None else 0, "candidates": candidates,
                    "chosen": best, "skipped": skipped, "notes": notes}

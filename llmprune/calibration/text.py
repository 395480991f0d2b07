"""Text sources for calibration and evaluation: a local UTF-8 file, or a dataset name the peers use.

``--calib`` and ``--ppl`` accept the same sources. A dataset name is loaded through Hugging Face
``datasets`` with the split the papers use for that purpose: calibration draws from the *train* split
(SparseGPT and Wanda calibrate on C4 train), evaluation scores the *test* split (validation for C4),
so calibrating and evaluating on one name never shares text.

Example::

    from llmprune.calibration.text import load_text
    calib = load_text("c4", split="train")           # online, or with a warm datasets cache
    test = load_text("../shared/data/wikitext2-raw-test.txt")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

__all__ = ["DATASET_ALIASES", "TextSourceError", "load_text", "is_dataset_alias", "check_is_text"]

Split = Literal["train", "test"]


class TextSourceError(FileNotFoundError):
    """A text source is neither a readable file nor a loadable dataset (message says what to pass)."""


@dataclass(frozen=True)
class _Dataset:
    description: str
    load: Callable[[Split], str]


def _wikitext2(split: Split) -> str:
    import datasets

    rows = datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split=split)["text"]
    return "\n\n".join(rows)  # as the SparseGPT/Wanda evaluation code joins them


def _ptb(split: Split) -> str:
    import datasets

    rows = datasets.load_dataset("ptb-text-only/ptb_text_only", "penn_treebank", split=split)["sentence"]
    return " ".join(rows)


def _c4(split: Split) -> str:
    import datasets

    # The shards the SparseGPT/Wanda code uses: first train shard for calibration, first validation shard
    # (first 1100 documents) for perplexity.
    if split == "train":
        shard, key, limit = "en/c4-train.00000-of-01024.json.gz", "train", None
    else:
        shard, key, limit = "en/c4-validation.00000-of-00008.json.gz", "validation", 1100
    rows = datasets.load_dataset("allenai/c4", data_files={key: shard}, split=key)
    texts = rows["text"] if limit is None else rows[:limit]["text"]
    return " ".join(texts)


#: Dataset names accepted wherever a text source is (``--calib``, ``--ppl``), with the split each purpose uses.
DATASET_ALIASES: dict[str, _Dataset] = {
    "wikitext2": _Dataset("Salesforce/wikitext / wikitext-2-raw-v1; rows joined with '\\n\\n'", _wikitext2),
    "ptb": _Dataset("ptb-text-only/ptb_text_only / penn_treebank; sentences joined with ' '", _ptb),
    "c4": _Dataset("allenai/c4 en; train shard 0 for calibration, validation shard 0 (1100 documents) for "
                   "evaluation", _c4),
}


def is_dataset_alias(source: str | Path) -> bool:
    """``True`` for a dataset name that is not also an existing path."""
    return str(source).strip().lower() in DATASET_ALIASES and not Path(source).expanduser().exists()


def load_text(source: str | Path, split: Split = "test", purpose: str = "text") -> str:
    """The text of ``source``: an existing UTF-8 file (universal newlines) or a name in ``DATASET_ALIASES``.

    ``split`` picks the dataset split (``train`` for calibration, ``test`` for evaluation); files are used
    as they are. ``purpose`` names the option in error messages (``"calibration"``, ``"perplexity"``).

    Raises :class:`TextSourceError` (a ``FileNotFoundError``) for a missing file, a directory, an unknown
    name, or a dataset that cannot be loaded (offline without a cache), and ``ValueError`` for empty text
    or a file that is not text (:func:`check_is_text`).
    """
    key = str(source).strip().lower()
    path = Path(source).expanduser()
    if path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace")
        origin = str(path)
    elif is_dataset_alias(source):
        try:
            text = DATASET_ALIASES[key].load(split)
        except ImportError as err:  # pragma: no cover - datasets is a dependency
            raise TextSourceError(f"loading the '{key}' dataset needs the `datasets` package") from err
        except Exception as err:  # network, offline mode, missing cache
            raise TextSourceError(
                f"could not load the '{key}' dataset ({split} split) for {purpose} from the Hugging Face Hub "
                f"({type(err).__name__}: {str(err)[:200]}). Offline (HF_DATASETS_OFFLINE=1) only cached datasets "
                "work; pass a local text file instead."
            ) from err
        origin = f"dataset '{key}' ({split})"
    elif path.is_dir():
        raise TextSourceError(f"{purpose} source {str(source)!r} is a directory; give a text file")
    else:
        raise TextSourceError(
            f"{purpose} source {str(source)!r} does not exist and is not one of the dataset names "
            f"{sorted(DATASET_ALIASES)}; check the path"
        )
    if not text.strip():
        raise ValueError(f"{purpose} text from {origin} is empty")
    check_is_text(text, origin, purpose)
    return text


#: the most undecodable or control characters a text may hold (a few stray bytes in a real corpus pass)
MAX_NON_TEXT = 0.01


def check_is_text(text: str, origin: str, purpose: str = "text") -> None:
    """Refuse what is not natural-language text: a binary file (random bytes, weights, an archive) read as
    UTF-8 turns into replacement characters and control codes, and pruning calibrated on it wrecks the
    model while exiting 0. Raises ``ValueError`` naming the share found."""
    sample = text[:1_000_000]
    bad = sum(1 for ch in sample if ch == "\ufffd" or (ch < " " and ch not in "\t\n\r\f\v"))
    if "\x00" in sample or bad > MAX_NON_TEXT * len(sample):
        raise ValueError(
            f"{purpose} source {origin} is not UTF-8 text ({bad / max(len(sample), 1):.0%} of its first "
            f"{len(sample):,} characters are undecodable bytes or control codes); give a plain text file"
        )

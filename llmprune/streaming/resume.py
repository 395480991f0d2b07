"""A streamed run's state: the ``.<out>.partial/`` folder, its state file and fingerprint, and the hidden
states saved as the resume point."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from ..calibration.fisher import FisherStore
from ..checkpoint.dispatched import ModelSource
from ..checkpoint.io import OutputExistsError, replace_directory
from ..checkpoint.output import umask_modes
from .source import Checkpoint, StreamingError


STATE_FILE = "stream_state.json"
STATE_VERSION = 1


# ---- the run's folder: shards, state, resume point -------------------------------------------------------
class PartialOutput:
    """``.<out>.partial/`` next to the output: created fresh, or reopened by ``resume`` when its state
    was written for the same ``fingerprint``."""

    def __init__(self, out: str | os.PathLike, fingerprint: str, resume: bool, overwrite: bool):
        self.out = Path(out).absolute()
        self.dir = self.out.with_name(f".{self.out.name}.partial")
        if self.out.exists() and not overwrite:
            raise OutputExistsError(f"output directory {self.out} already exists; pass --overwrite (overwrite=True) "
                                    "to replace it")
        self.overwrite = overwrite
        self.state: dict[str, Any] = {}
        if resume and (self.dir / STATE_FILE).is_file():
            state = json.loads((self.dir / STATE_FILE).read_text())
            if state.get("fingerprint") != fingerprint:
                raise StreamingError(f"{self.dir} holds an interrupted run with other settings (model, config or "
                                     "calibration data differ); rerun without --resume to start over")
            self.state = state
        else:  # a fresh run (also --resume with nothing saved yet)
            if (self.dir / STATE_FILE).is_file() and not overwrite and not resume:
                raise OutputExistsError(f"{self.dir} holds an interrupted run: pass --resume (resume=True) to "
                                        "continue it, or --overwrite to start over")
            if self.dir.exists():
                shutil.rmtree(self.dir)
            self.dir.mkdir(parents=True)
            self.state = {"version": STATE_VERSION, "fingerprint": fingerprint}
            self.save_state()
        (self.dir / "layers").mkdir(exist_ok=True)

    def save_state(self) -> None:
        tmp = self.dir / f"{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(self.state, indent=1, sort_keys=True))
        os.replace(tmp, self.dir / STATE_FILE)  # atomic: a kill leaves the old or the new state

    def finish(self, keep: Callable[[Path], bool]) -> Path:
        """Remove the state files and rename the folder into place."""
        for p in list(self.dir.iterdir()):
            if not keep(p):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        umask_modes(self.dir)
        replace_directory(self.dir, self.out, overwrite=self.overwrite)  # refuses an output that appeared meanwhile
        return self.out


class DiskStore(FisherStore):
    """The Fisher pass's states in the run folder: each ``put`` writes a new file, and the files it replaces are
    deleted only after :meth:`commit` has saved the state that no longer names them, so a kill at any point leaves
    a state whose files exist (the pass resumes at its last finished layer)."""

    def __init__(self, part: PartialOutput, spill_bytes: int):
        super().__init__()
        self.part, self.spill_bytes = part, spill_bytes
        self.state = part.state.setdefault("fisher", {})
        self.files: dict[str, Any] = self.state.setdefault("files", {})
        self._stale: list[str] = []
        self._serial = int(self.state.get("serial", 0))

    def put(self, key: str, tensors: list[torch.Tensor]) -> None:
        self._serial += 1
        self.state["serial"] = self._serial
        old = self.files.get(key)
        self.files[key] = _save_hidden(self.part.dir, f"fisher-{self._serial}", tensors)
        if old is not None:
            self._stale.append(old["file"])

    def get(self, key: str) -> list[torch.Tensor]:
        desc = self.files[key]
        size = torch.empty(0, dtype=getattr(torch, desc["dtype"])).element_size()
        return _load_hidden(self.part.dir, desc, mapped=sum(math.prod(s) for s in desc["shapes"]) * size
                            > self.spill_bytes)

    def drop(self, key: str) -> None:
        old = self.files.pop(key, None)
        if old is not None:
            self._stale.append(old["file"])

    def commit(self) -> None:
        self.part.save_state()
        for name in self._stale:
            (self.part.dir / name).unlink(missing_ok=True)
        self._stale.clear()


def _save_hidden(folder: Path, tag: str, hidden: list[torch.Tensor]) -> dict[str, Any]:
    """Write hidden states as one raw file (read back memory-mapped); returns its description."""
    path = folder / f"hidden-{tag}.bin"
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        for h in hidden:
            f.write(h.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"file": path.name, "shapes": [list(h.shape) for h in hidden], "dtype": str(hidden[0].dtype).split(".")[-1]}


def _load_hidden(folder: Path, desc: dict[str, Any], mapped: bool) -> list[torch.Tensor]:
    dtype = getattr(torch, desc["dtype"])
    shapes = desc["shapes"]
    total = sum(math.prod(s) for s in shapes)
    flat = torch.from_file(str(folder / desc["file"]), shared=False, size=total, dtype=dtype)
    if not mapped:
        flat = flat.clone()  # into memory: the file may be replaced by the next layer's states
    out, at = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(flat[at: at + n].view(*s))
        at += n
    return out


def _hidden_bytes(hidden: list[torch.Tensor]) -> int:
    return sum(h.numel() * h.element_size() for h in hidden)


def _fingerprint(ck: Checkpoint | ModelSource, settings: dict[str, Any], batches: list[torch.Tensor] | None,
                 dtype: torch.dtype) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({**ck.identity(), "settings": settings, "dtype": str(dtype)}, sort_keys=True).encode())
    for b in batches or []:
        h.update(b.contiguous().numpy().tobytes())
    return h.hexdigest()

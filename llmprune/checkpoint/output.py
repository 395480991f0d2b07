"""Where llmprune writes: one up-front check of an output path and one atomic way to put a folder there.

Every command that writes (``prune``, ``sparsify``, ``recover``, ``train``, ``run``, ``export``, eval reports)
calls :func:`check_output_path` before any work and writes through :class:`atomic_directory`, so:

- nothing of the user's is replaced without ``overwrite`` (checked up front *and* at the final rename, which
  cannot replace a folder that appeared in the meantime);
- the source model folder (or a folder holding it) is never an output;
- a failure that can be caught (an exception, Ctrl-C, SIGTERM) leaves no temporary folder behind, and the temp
  folder of a killed run (SIGKILL, power loss) is removed by the next run to the same output;
- outputs get the permissions of the user's umask, like ``save_pretrained``'s.

Example::

    out = check_output_path("runs/pruned", sources=["../shared/models/ref-llama-7m"])
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterable

from .errors import OutputExistsError, OutputPathError

__all__ = ["check_output_path", "atomic_directory", "replace_directory", "remove_stale_temps", "umask_modes",
           "OWNER_FILE"]

#: Written into every temporary folder (and removed before the rename): who owns it, so a later run can tell a
#: dead run's leftovers from a live run's work, and never removes a folder llmprune did not create.
OWNER_FILE = ".llmprune-owner.json"
_TEMP_KINDS = ("tmp", "old")  # ".OUT.tmp-*": a save in progress; ".OUT.old-*": the replaced output, being removed


def check_output_path(out: str | os.PathLike, sources: Iterable[str | os.PathLike | None] = (),
                      overwrite: bool = False, flag: str = "--out") -> Path:
    """Refuse, before any work, an output that cannot or must not be written; returns it as a ``Path``.

    Refused: a regular file; the source model folder or a folder that holds it (symlinks resolved), even with
    ``overwrite``; an existing output without ``overwrite``; a folder whose parent cannot be written. Temporary
    folders left beside ``out`` by a killed run are removed on the way.

    Example::

        out = check_output_path(args.out, sources=[args.model], overwrite=args.overwrite)
    """
    path = Path(out).expanduser()
    if not str(out).strip():
        raise OutputPathError(f"{flag} is empty: give an output folder")
    remove_stale_temps(path)  # first: it may put back an output a killed run had moved aside
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{flag} {path} is a file, not a folder: give a folder path (an existing file is never "
                              "replaced, --overwrite or not)")
    _refuse_source(path, sources, flag)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output folder {path} already exists; pass --overwrite to replace it")
    _check_writable(path, flag)
    return path


def _refuse_source(path: Path, sources: Iterable[str | os.PathLike | None], flag: str) -> None:
    """The output must not be a source folder, nor one of its parents (replacing it deletes the source)."""
    target = path.resolve()
    for src in sources:
        if src is None or not Path(src).expanduser().exists():
            continue  # a Hub id: its cache is not the user's folder
        s = Path(src).expanduser().resolve()
        s = s if s.is_dir() else s.parent  # a .gguf file: its folder
        if target == s or target in s.parents:
            what = "is the source folder" if target == s else "holds the source"
            raise OutputPathError(f"{flag} {path} {what} {src}: llmprune never writes over its input; "
                                  "give a new folder")


def _check_writable(path: Path, flag: str) -> None:
    """Create (and remove) a probe folder where the temp folder will go: the same call the save makes, so
    root, ACLs and read-only mounts all answer as they will at the end."""
    parent = path.absolute().parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputPathError(f"{flag} {path}: {existing} is a file, not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=f".{path.name}.probe-", dir=existing)
    except OSError as exc:
        raise OutputPathError(f"{flag} {path}: cannot write in {existing} ({exc.strerror or exc})") from None
    os.rmdir(probe)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(out: str | os.PathLike) -> list[Path]:
    """Remove the temp folders beside ``out`` that a dead run on this machine left (SIGKILL, power loss);
    returns them. Only folders carrying llmprune's owner file are touched."""
    out = Path(out).absolute()
    removed = []
    if not out.parent.is_dir():
        return removed
    for kind in _TEMP_KINDS:
        for tmp in out.parent.glob(f".{out.name}.{kind}-*"):
            try:
                owner = json.loads((tmp / OWNER_FILE).read_text())
            except (OSError, ValueError):
                continue  # not ours, or being created right now
            if owner.get("host") != socket.gethostname() or _pid_alive(int(owner.get("pid", 0))):
                continue
            if kind == "old" and (tmp / "out").is_dir() and not out.exists():  # killed between the two renames
                os.rename(tmp / "out", out)
                print(f"llmprune: restored {out} from {tmp}, left by an interrupted run (pid {owner.get('pid')})")
            shutil.rmtree(tmp, ignore_errors=True)
            print(f"llmprune: removed {tmp}, left by an interrupted run (pid {owner.get('pid')})")
            removed.append(tmp)
    return removed


def _mark_owner(folder: Path) -> None:
    (folder / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))


def umask_modes(folder: str | os.PathLike) -> None:
    """Give ``folder`` and everything in it the modes ``mkdir`` / ``open`` give under the current umask
    (``mkdtemp`` makes 0700 folders, some writers 0600 files)."""
    mask = os.umask(0)
    os.umask(mask)
    root = Path(folder)
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            p = os.path.join(dirpath, f)
            executable = os.stat(p).st_mode & 0o111
            os.chmod(p, (0o777 if executable else 0o666) & ~mask)


class atomic_directory:
    """Context manager yielding a temp folder next to ``out``; renamed to ``out`` only on success.

    Refuses an existing ``out`` unless ``overwrite``, both on entry and at the rename (so of two runs to the same
    ``out`` the second to finish fails and the first's output is kept); on any exception (Ctrl-C and SIGTERM
    included, see :func:`llmprune.cli.main`) the temp folder is removed.
    """

    def __init__(self, out: str | os.PathLike, overwrite: bool = False,
                 sources: Iterable[str | os.PathLike | None] = ()) -> None:
        self.out = Path(out).expanduser().absolute()
        self.overwrite = overwrite
        self.sources = list(sources)

    def __enter__(self) -> Path:
        check_output_path(self.out, self.sources, self.overwrite)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        _mark_owner(self.tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                (self.tmp / OWNER_FILE).unlink(missing_ok=True)
                umask_modes(self.tmp)
                _refuse_source(self.out, self.sources, "--out")  # a symlink may have been swapped meanwhile
                replace_directory(self.tmp, self.out, overwrite=self.overwrite)
                return
            except BaseException:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
        shutil.rmtree(self.tmp, ignore_errors=True)


_RENAME_NOREPLACE = 1


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, failing with ``FileExistsError`` if ``dst`` exists, atomically.

    Linux ``renameat2(RENAME_NOREPLACE)``; elsewhere (or on filesystems without it) ``mkdir(dst)`` claims the
    name (exclusive) and the rename replaces the empty folder just made.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError, TypeError):  # not glibc / not Linux
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd = -100
        if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, os.strerror(err), str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(dst))
    os.mkdir(dst)  # FileExistsError when another run got there first
    try:
        os.rename(src, dst)
    except BaseException:
        os.rmdir(dst)
        raise


def replace_directory(src: Path, out: Path, overwrite: bool = True) -> None:
    """Rename the finished folder ``src`` to ``out``.

    Without ``overwrite`` an ``out`` that exists at this moment is never replaced
    (:class:`OutputExistsError`). With it, an existing ``out`` is moved aside first, put back if the rename
    fails, and removed only after it succeeded, so a failure never leaves neither.
    """
    src, out = Path(src), Path(out)
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"{out} is a file, not a folder: an existing file is never replaced")
    if not overwrite or not out.exists():
        try:
            _rename_noreplace(src, out)
        except FileExistsError:
            raise OutputExistsError(f"output folder {out} appeared while this run was working (another run?); "
                                    "it was kept and this run's result discarded: pass --overwrite to replace it"
                                    ) from None
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    _mark_owner(backup)  # a kill from here on leaves it for the next run, which restores or removes it
    aside = backup / "out"
    os.rename(out, aside)
    try:
        os.rename(src, out)
    except BaseException:
        os.rename(aside, out)
        shutil.rmtree(backup, ignore_errors=True)
        raise
    shutil.rmtree(backup, ignore_errors=True)

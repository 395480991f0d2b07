"""Where llmprune's shared, read-only material lives (reference models and data).

Example:
    >>> from llmprune.eval.paths import shared_dir
    >>> (shared_dir() / "data" / "wikitext2-raw-test.txt").name
    'wikitext2-raw-test.txt'
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["SHARED_ENV", "TASK_DATA_ENV", "shared_dir", "task_data_dir"]

#: Environment variable that overrides the location of the shared folder.
SHARED_ENV = "LLMPRUNE_SHARED"
#: Environment variable that overrides the folder with the local task data.
TASK_DATA_ENV = "LLMPRUNE_TASK_DATA"


def shared_dir() -> Path:
    """The shared folder: ``$LLMPRUNE_SHARED`` if set, else ``<repo>/../shared``.

    The folder may not exist (e.g. in an installed package); callers check.

    Example:
        >>> shared_dir().name
        'shared'
    """
    env = os.environ.get(SHARED_ENV)
    if env:
        return Path(env).expanduser().resolve()
    repo = Path(__file__).resolve().parents[1]
    return (repo.parent / "shared").resolve()


def task_data_dir() -> Path:
    """Folder with the local task files (``lambada/``, ``piqa/``, ``openbookqa/``).

    ``$LLMPRUNE_TASK_DATA`` if set, else ``shared_dir() / "data" / "tasks"``.

    Example:
        >>> task_data_dir().name
        'tasks'
    """
    env = os.environ.get(TASK_DATA_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return shared_dir() / "data" / "tasks"

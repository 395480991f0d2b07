"""Progress bars (tqdm), silenced when not on a terminal unless asked for."""

from __future__ import annotations

from typing import Iterable, TypeVar

from tqdm.auto import tqdm

__all__ = ["progress_bar"]

T = TypeVar("T")


def progress_bar(items: Iterable[T], desc: str = "", disable: bool = False, **kwargs) -> Iterable[T]:
    return tqdm(items, desc=desc, disable=disable, leave=False, dynamic_ncols=True, **kwargs)

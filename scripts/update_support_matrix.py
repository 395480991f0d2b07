#!/usr/bin/env python
"""Rewrite README.md's support matrix (between ``<!-- support-matrix:start -->`` and
``<!-- support-matrix:end -->``) from the adapter registry.

Example::

    python scripts/update_support_matrix.py          # rewrites README.md in place
    python scripts/update_support_matrix.py --check  # exit 1 if README.md is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmprune.checkpoint.support import MARKER_END, MARKER_START, replace_readme_block  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Regenerate the support matrix block in README.md")
    p.add_argument("--readme", default=str(REPO / "README.md"))
    p.add_argument("--check", action="store_true", help="only check; exit 1 when the block is out of date")
    args = p.parse_args(argv)
    readme = Path(args.readme)
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    new = replace_readme_block(text)
    if new is None:
        print(f"{readme}: no {MARKER_START} ... {MARKER_END} block", file=sys.stderr)
        return 2
    if new == text:
        print(f"{readme}: support matrix up to date")
        return 0
    if args.check:
        print(f"{readme}: support matrix out of date; run scripts/update_support_matrix.py", file=sys.stderr)
        return 1
    readme.write_text(new, encoding="utf-8")
    print(f"{readme}: support matrix rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())

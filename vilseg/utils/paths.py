"""Finding shipped files (configs, the embedded demo data) from any working directory. Nothing here writes.

A relative path is looked up in the working directory first, then next to the installed ``vilseg`` package: in an
editable install (``pip install -e .``) that folder is the checkout with ``configs/`` and ``data/``; in a regular
install it holds neither and the second lookup finds nothing. Outputs never go there: callers write under the
folders they are given, or under the working directory.
"""
from __future__ import annotations

import os
import os.path as osp
from pathlib import Path
from typing import Optional, Union

__all__ = ["PACKAGE_PARENT", "find_path", "resolve_path"]

# the folder that holds the vilseg package (the checkout, for an editable install); read from, never written to
PACKAGE_PARENT = Path(__file__).resolve().parents[2]


def find_path(path: Union[str, os.PathLike]) -> Optional[str]:
    """Absolute path of ``path`` as given (absolute or relative to the working directory) if it exists, else of
    ``PACKAGE_PARENT / path`` if that exists (relative paths only), else None."""
    path = os.fspath(path)
    if osp.exists(path):
        return osp.abspath(path)
    candidate = PACKAGE_PARENT / path
    if not osp.isabs(path) and candidate.exists():
        return str(candidate)
    return None


def resolve_path(path: Union[str, os.PathLike], what: str = "config") -> str:
    """:func:`find_path`, or an error.

    Raises:
        FileNotFoundError: naming ``path`` and both places looked at.
    """
    found = find_path(path)
    if found is not None:
        return found
    path = os.fspath(path)
    places = os.getcwd() if osp.isabs(path) or Path(os.getcwd()).resolve() == PACKAGE_PARENT else \
        f"{os.getcwd()} and {PACKAGE_PARENT}"
    raise FileNotFoundError(f"{what} not found: {path!r} (looked in {places})")

"""The one error type of m3jepa.search: a one-line message naming the item and the fix."""

from __future__ import annotations

import logging

# Every module of the package imports this one before faiss: faiss logs its CPU-feature probing (the
# failed imports of its AVX builds, as tracebacks) at INFO, which would fill every command's output.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)


class SearchError(ValueError):
    """An index, store or query that cannot be used as asked; the message names it and the fix."""

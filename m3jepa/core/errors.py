"""Errors of the shared runtime, in a module of their own so every runtime module can raise them."""

from __future__ import annotations


class StoreDataError(ValueError):
    """Stores that cannot be trained or scored together; the message names the cause and the fix."""

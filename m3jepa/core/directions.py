"""Directions ('image->text', 'image+question->answer') parsed into the modalities they join."""

from __future__ import annotations

from m3jepa.core.errors import StoreDataError
from m3jepa.model.predictor import parse_direction as _parse_direction


def parse_direction(direction: str) -> tuple[str | tuple[str, ...], str]:
    """'image->text' → ('image', 'text'); a concatenated input 'image+question->answer' →
    (('image', 'question'), 'answer'), the form the predictor takes (model.parse_direction parses)."""
    try:
        parsed = _parse_direction(direction)
    except ValueError as e:
        raise StoreDataError(str(e)) from None
    return parsed.source, parsed.target


def source_modalities(source: str | tuple[str, ...]) -> tuple[str, ...]:
    """The modalities of a parsed source, as a tuple."""
    return (source,) if isinstance(source, str) else source


def direction_modalities(directions: list[str]) -> list[str]:
    """The modalities a list of directions touches, in first-seen order."""
    seen: list[str] = []
    for d in directions:
        source, target = parse_direction(d)
        for m in (*source_modalities(source), target):
            if m not in seen:
                seen.append(m)
    return seen

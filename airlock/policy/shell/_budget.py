"""The work budget of one analysis: every step and every character it makes, counted.

Text is copied once per nesting level (``echo $(echo $( ... ))`` repeats each inner level in
the words, the text and the normalised line of every outer one), so a line of n bytes can
make O(n²) characters of model. The budget is what bounds it: every character the analysis
materialises (word values, command texts, the normalised line, here-document bodies, the
strings it re-parses) and every step of the loops that are not linear in the line is charged
to one counter for the whole analysis, and past the limit the analysis stops with a
``parse.too-large`` finding (ASK). Memory is then bounded by the budget, independently of the
shape of the line, and so is the time of the rules run on the model.
"""

from __future__ import annotations


class _OverBudget(Exception):
    """Raised when an analysis has used its whole work budget."""


class _Budget:
    """A countdown of work units: one per character made, one per loop step."""

    __slots__ = ("left", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit

    def charge(self, units: int) -> None:
        self.left -= units
        if self.left < 0:
            raise _OverBudget

    @property
    def used(self) -> int:
        return self.limit - self.left

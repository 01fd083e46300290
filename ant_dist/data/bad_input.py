"""Counting what the packer skipped or repaired, by reason, with a few examples each."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any


class BadInputLog:
    """Counts skipped and repaired records by reason and keeps the first few examples.

    Every rule that drops or changes input goes through `skip` or `repair`, so
    pack_report.json accounts for each input record.
    """

    def __init__(self, examples_per_reason: int = 5):
        self.examples_per_reason = examples_per_reason
        self.skipped: Counter[str] = Counter()
        self.repaired: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = defaultdict(list)

    def example(self, reason: str, where: str, detail: Any) -> None:
        if len(self.examples[reason]) < self.examples_per_reason:
            text = str(detail)
            if len(text) > 120:
                text = text[:117] + "..."
            self.examples[reason].append(f"{where}: {text}" if text else where)

    def skip(self, reason: str, where: str = "", detail: Any = "", count: int = 1) -> None:
        self.skipped[reason] += count
        self.example(reason, where, detail)

    def repair(self, reason: str, where: str = "", detail: Any = "", count: int = 1) -> None:
        self.repaired[reason] += count
        self.example(reason, where, detail)

    def as_dict(self) -> dict:
        return {
            "skipped": dict(sorted(self.skipped.items())),
            "repaired": dict(sorted(self.repaired.items())),
            "examples": {k: v for k, v in sorted(self.examples.items())},
        }

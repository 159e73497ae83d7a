"""The data stage's error, and the collector that lets one run report every bad row at once."""

from __future__ import annotations

from lorakit.errors import LorakitError


class DataError(LorakitError):
    """A data file or example is unusable; the message names where and how to fix it."""


class Problems:
    """Every fatal problem found while reading and rendering; the first `shown` messages are kept."""

    def __init__(self, shown: int = 50):
        self.count, self.messages, self.shown = 0, [], shown
        self.first: DataError | None = None

    def add(self, error: DataError | str) -> None:
        self.count += 1
        self.first = self.first or (error if isinstance(error, DataError) else DataError(error))
        if len(self.messages) < self.shown:
            self.messages.append(str(error))

    def extend(self, other: "Problems | dict") -> None:
        """Add another collection's problems (a Problems, or its `report()`)."""
        found = other.report() if isinstance(other, Problems) else other
        for message in found["messages"]:
            self.add(message)
        self.count += found["count"] - len(found["messages"])

    def raise_if_any(self) -> None:
        """One DataError naming each problem (the problem itself when there is only one)."""
        if self.count == 1:
            raise self.first
        if self.count:
            more = f"\n  ... and {self.count - len(self.messages)} more" if self.count > len(self.messages) else ""
            raise DataError(f"{self.count} problems in the data; fix each, then run lorakit check again:\n  "
                            + "\n  ".join(self.messages) + more)

    def report(self) -> dict:
        return {"count": self.count, "messages": self.messages}

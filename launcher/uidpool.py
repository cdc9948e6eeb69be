"""Distinct uids for emulator processes, from the spec's uid range."""

from __future__ import annotations


class UidPool:
    """Distinct uids from the spec's range: one per live emulator or spare,
    so no emulator can signal or trace another."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self.used: set[int] = set()

    def take(self, preferred: int | None = None) -> int | None:
        if preferred is not None and preferred not in self.used:
            self.used.add(preferred)
            return preferred
        for uid in range(self.first, self.last + 1):
            if uid not in self.used:
                self.used.add(uid)
                return uid
        return None

    def give_back(self, uid: int) -> None:
        self.used.discard(uid)

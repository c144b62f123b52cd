"""Fresh names for inserted tensors and nodes."""

from __future__ import annotations

from typing import Iterable


class UniqueNames:
    """Hands out names derived from a base that collide with nothing already used."""

    def __init__(self, used: Iterable[str]):
        self.used = set(used)

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name

"""A name → object registry for each extension point (estimators, schedules, converters).

Duplicates are refused at registration; an unknown name fails with the list of valid ones,
so the CLI's choices and error messages always come from the same place.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import UsageError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind, in registration order."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator adding an entry under `name`; registering a name twice is an error."""

        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = entry
            return entry

        return add

    def unregister(self, name: str) -> None:
        """Remove the entry called `name` (a plugin's, or one a test added)."""
        self.get(name)
        del self._entries[name]

    def get(self, name: str) -> T:
        """The entry called `name`; an unknown name raises UsageError listing the valid ones."""
        try:
            return self._entries[name]
        except KeyError:
            valid = ", ".join(self._entries) or "(none registered)"
            raise UsageError(f"unknown {self.kind} {name!r}; valid: {valid}") from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

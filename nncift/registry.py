"""A name -> object table for the user's choices (objectives, label designs, input formats, ...).

Each table lives next to the code it dispatches; the configuration takes its allowed values from it
(:meth:`Registry.names`), so a new entry is a valid ``--set`` value at once::

    from nncift.registry import Registry

    SHAPES = Registry("shape")

    @SHAPES.register("square")
    def square(x):
        return x * x

    SHAPES.get("square")(3)  # 9
    SHAPES.names()  # ('square',)
    SHAPES.get("cube")  # ValueError: unknown shape 'cube' (known: square)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries in registration order.

    Args:
        kind: what an entry is, for the error of :meth:`get` ("objective" -> "unknown objective 'x' (known: ...)").
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator (or plain call ``register(name)(obj)``) adding ``obj`` as ``name``; returns ``obj``."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        """The entry ``name``; a ValueError listing the known names when there is none."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {self.kind} {name!r} (known: {', '.join(self._entries)})") from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(tuple(self._entries.items()))

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"

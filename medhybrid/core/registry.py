"""One registry per kind of choice (pretraining modes, semi-supervised algorithms, fine-tuning heads): each choice is
one small class, registered by its ``name`` with a class decorator, and configs name it."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """The registered choices of one ``kind`` (``"pretraining mode"``): :meth:`register` a class (its instance is
    kept), :meth:`get` it by name, or a ``ValueError`` naming the known ones (``also`` lists names a config may give
    besides the registered ones, such as ``none``)."""

    def __init__(self, kind: str, also: tuple[str, ...] = ()):
        self.kind, self.also = kind, also
        self._items: dict[str, T] = {}

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator: make the choice available by its ``name``."""
        self._items[cls.name] = cls()
        return cls

    def unregister(self, name: str) -> T:
        """Remove a choice (a plugin unloaded, a test's own choice) and return it."""
        return self._items.pop(name)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join((*self.also, *self.names()))}") from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)


__all__ = ["Registry"]

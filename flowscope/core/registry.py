"""Named registries (inits, activations, nets, data, statistics) in the style of timm's.

Every extensible thing is an entry with a lowercase name; the same name is used in the CLI,
the study files and the frames. An unknown name gets "did you mean" and the allowed list.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from flowscope.core.errors import FlowscopeError, unknown

T = TypeVar("T")


class Registry(Generic[T]):
    """A name → object table.

    Example:
        >>> acts: Registry[str] = Registry("activation")
        >>> @acts.register("double")
        ... def double(x): return 2 * x
        >>> acts.get("double")(3)
        6
        >>> acts.names()
        ['double']
    """

    def __init__(self, kind: str, internal: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.internal = internal  # arguments the caller supplies, never a study file
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that files an object under ``name`` (lowercase, unique)."""
        if name != name.lower() or not name:
            raise FlowscopeError(f"{self.kind} names are lowercase and non-empty, got {name!r}")

        def add(obj: T) -> T:
            if name in self._entries:
                raise FlowscopeError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str, where: str = "") -> T:
        """The entry called ``name``; raises FlowscopeError with suggestions if unknown."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise unknown(self.kind, name, self._entries, where) from None

    def arguments(self, name: str, internal: bool = False) -> list[str]:
        """The keyword arguments of entry ``name``; the ``internal`` ones only when asked.

        Example:
            >>> data: Registry[object] = Registry("data", internal=("device",))
            >>> _ = data.register("ones")(lambda *, n=1, device=None: [1] * n)
            >>> data.arguments("ones"), data.arguments("ones", internal=True)
            (['n'], ['n', 'device'])
        """
        params = list(inspect.signature(self.get(name)).parameters)  # type: ignore[arg-type]
        return params if internal else [p for p in params if p not in self.internal]

    def check_args(
        self, name: str, kwargs: Mapping[str, object], where: str = "", internal: bool = False
    ) -> T:
        """The entry ``name`` after checking ``kwargs`` against its signature (did-you-mean).

        Arguments in ``internal`` (a device, a generator: what the caller makes) are refused
        unless ``internal=True``, so a study file can set only the documented ones.
        """
        entry = self.get(name, where)
        allowed = self.arguments(name, internal)
        for key in kwargs:
            if key not in allowed:
                raise unknown(f"{self.kind} {name!r} argument", key, allowed, where)
        return entry

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted names, optionally filtered by a glob pattern."""
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

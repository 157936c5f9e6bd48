"""``LRU``: a bounded key -> value store that forgets the least recently used entry first.

The caches of frozen work (prompt features, tokenizer features, decoded scenes) share it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Any


class LRU:
    """Up to ``max_items`` values by key; :meth:`get` and :meth:`put` make a key the most recent.

    Plain composition over an ``OrderedDict`` (not a subclass), so it pickles into DataLoader workers.
    """

    def __init__(self, max_items: int, name: str = "max_items") -> None:
        if int(max_items) < 1:
            raise ValueError(f"{name} must be >= 1, got {max_items}")
        self.max_items = int(max_items)
        self._items: OrderedDict[Hashable, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def get(self, key: Hashable) -> Any | None:
        """The value of ``key`` (now the most recent), or None."""
        if key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: Hashable, value: Any) -> None:
        """Store ``value`` as the most recent entry; evict the oldest beyond the bound."""
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()

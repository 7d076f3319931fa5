"""In-memory semantic lookups shared by the join's unit and broker tests."""

from __future__ import annotations


class ClickSetLookup:
    """A real in-memory SemanticLookup whose user vector spells out the user's clicks before the
    asked time: an example shows exactly which clicks its cache knew, so a click lost (or
    doubled) across a checkpoint changes the examples."""

    version = "v-clicks"

    def __init__(self) -> None:
        self.clicks: dict[str, set[tuple[float, str]]] = {}

    def item(self, item_id: str) -> bytes | None:
        return item_id.encode()

    def item_words(self, item_id: str) -> bytes | None:
        return None

    def user(self, user_id: str, at: float | None = None) -> bytes | None:
        before = sorted(c for c in self.clicks.get(user_id, ()) if at is None or c[0] < at)
        return repr(before).encode() if before else None

    def observe_click(self, user_id: str, item_id: str, ts: float) -> None:
        self.clicks.setdefault(user_id, set()).add((ts, item_id))

    def expire_users(self, before: float) -> int:
        gone = [u for u, clicks in self.clicks.items() if max(clicks)[0] < before]
        for user_id in gone:
            del self.clicks[user_id]
        return len(gone)

    def stats(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass

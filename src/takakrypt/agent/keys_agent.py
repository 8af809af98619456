"""The key cache's side of takakryptd (docs/keys.md, "Key cache and offline
operation"): the cache's upkeep, the data path's copies of the keys it drops, the
audit of key events, and guard points that are *closed* because no key of theirs can
be had (the backend down, nothing held in memory or in the offline cache) and open by
themselves when it answers again.  :class:`KeysAgent` is a mixin of
:class:`takakrypt.agent.daemon.Agent`."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any

from ..errors import Error, KeyNotFound
from .kernel_engine import running_on

log = logging.getLogger("takakryptd")
_upkeep = threading.Lock()  # the loop's round and a health check's, one at a time


class KeysAgent:
    """Methods of the Agent for the key cache (uses its keys, guards, config, closed and
    audit helpers)."""

    def key_upkeep(self) -> None:
        """Off the event loop (the backend may be slow): the key cache's upkeep; the
        guard points drop their copies of the keys it dropped; key events audited;
        guard points closed or opened again."""
        keys = self.keys  # type: ignore[attr-defined]
        if keys is None:
            return
        with _upkeep:
            self._key_upkeep(keys)

    def _key_upkeep(self, keys: Any) -> None:
        dropped = keys.maintain()
        names = {n for n, _v in dropped}
        wipe = set()
        for path, g in list(self.guards.items()):  # type: ignore[attr-defined]
            if getattr(getattr(g, "spec", None), "key", None) not in names:
                continue
            if hasattr(g, "drop_keys"):
                g.drop_keys()
            elif getattr(g, "engine", "") == "kernel":
                wipe.add(path)  # the module's copies: by CONFIG_UPDATE (genl.sync_keys)
        for kind, reason, detail in keys.drain_events():
            self._audit_system(kind, reason, detail)  # type: ignore[attr-defined]
        self._update_closed()
        self._kernel_sync_keys(frozenset(wipe))

    def _kernel_sync_keys(self, wipe: frozenset[str]) -> None:
        """The kernel module's side of the key cache: its keys of the guard points in
        ``wipe`` wiped, and its guard points closed or opened as ``closed`` says
        (genl.GenlTransport.sync_keys, on the loop; this may run on it or off it)."""
        t = self._genl()  # type: ignore[attr-defined]
        loop = self.loop  # type: ignore[attr-defined]
        if t is None or loop is None or loop.is_closed():
            return

        def go() -> None:
            t._spawn(t.sync_keys(wipe))

        if running_on(loop):
            go()
        else:
            loop.call_soon_threadsafe(go)

    def _closed_reason(self, key: str) -> str:
        """Why a guard point using ``key`` is closed ("" if it is not): its current
        version cannot be had from the backend, the key cache or the offline cache.
        A key the backend says does not exist is another matter (key_problem)."""
        try:
            self.keys.current_version(key)  # type: ignore[attr-defined]
        except KeyNotFound:
            return ""
        except Error as e:
            cause = self.keys.last_error or str(e)  # type: ignore[attr-defined]
            return f"closed: no key {key!r} held and the key backend is unavailable: {cause}"
        return ""

    def _update_closed(self) -> None:
        closed: dict[str, str] = self.closed  # type: ignore[attr-defined]
        for gp in self.config.guard_points:  # type: ignore[attr-defined]
            if not gp.enabled:
                continue
            path = os.path.normpath(gp.path)
            why = self._closed_reason(gp.key)
            if why and path not in closed:
                closed[path] = why
                g = self.guards.get(path)  # type: ignore[attr-defined]
                if g is not None and hasattr(g, "drop_keys"):
                    g.drop_keys()  # what it still holds expires with the version now
                log.error("guard point %s: %s: every access to an encrypted file fails",
                          path, why)
                self._audit_system("guard-point", f"guard point {why}: every access to an "  # type: ignore[attr-defined]
                                   "encrypted file fails", {"key": gp.key, "state": "closed"},
                                   path=path)
            elif why:
                closed[path] = why
            elif path in closed:
                del closed[path]
                g = self.guards.get(path)  # type: ignore[attr-defined]
                if g is not None and hasattr(g, "drop_keys"):
                    g.drop_keys()  # files that failed without a key ask for it again
                log.info("guard point %s: keys back, open again", path)
                self._audit_system("guard-point", "keys back: guard point open again",  # type: ignore[attr-defined]
                                   {"key": gp.key, "state": "open"}, path=path)
        for path in [p for p in closed if p not in {os.path.normpath(g.path) for g in
                                                    self.config.guard_points}]:  # type: ignore[attr-defined]
            del closed[path]

    def keys_status(self) -> dict[str, Any] | None:
        """The keys section of ``takakrypt status`` and of the metrics."""
        if self.keys is None:  # type: ignore[attr-defined]
            return None
        return {**self.keys.status(), "closed": dict(self.closed)}  # type: ignore[attr-defined]


async def keys_loop(agent: Any) -> None:
    """The key cache's upkeep at its own pace (a short ``cache_ttl`` expires keys within
    a fraction of it); the health check's round does it too."""
    interval = agent.keys.upkeep_interval() if agent.keys is not None else 0.0
    if not interval:
        return
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval)
        try:
            await loop.run_in_executor(None, agent.key_upkeep)
        except Exception:  # noqa: BLE001 - the next round tries again
            log.exception("key cache upkeep failed")

"""takakryptd's side of live rekey and key usage (``takakrypt rekey``, ``takakrypt keys
versions --usage``): a :class:`takakrypt.agent.rekey.Rekey` per guard point (FUSE: the
engine's copy and swap; kernel: the module's in-place sealing, agent.krekey),
created on demand, resumed after a restart when its state file says it was running,
closed (state kept) when the guard point is released or handed over.
:class:`RekeyAgent` is a mixin of :class:`takakrypt.agent.daemon.Agent`."""

from __future__ import annotations

import logging
import os
from typing import Any

from .. import config as C
from ..errors import AgentError, UsageError
from . import krekey
from . import rekey as R

log = logging.getLogger("takakryptd")

#: 1 MB/s units in the YAML and on the command line
MB = 1_000_000


class RekeyAgent:
    """Methods of the Agent for rekeys (uses its guards, config, keys, audit helpers)."""

    rekeys: dict[str, R.Rekey]

    def _guard_spec(self, path: str) -> C.GuardPoint:
        want = os.path.normpath(path)
        for gp in self.config.guard_points:  # type: ignore[attr-defined]
            if os.path.normpath(gp.path) == want:
                return gp
        raise UsageError(f"{path} is not a guard point of {self.config_path}")  # type: ignore[attr-defined]

    def _rekey_for(self, path: str, *, create: bool = True) -> R.Rekey | None:
        path = os.path.normpath(path)
        rk = self.rekeys.get(path)
        if rk is not None or not create:
            return rk
        gp = self._guard_spec(path)
        g = self.guards.get(path)  # type: ignore[attr-defined]
        if g is None or not (hasattr(g, "rekey_file") or getattr(g, "engine", "") == "kernel"):
            raise UsageError(f"{path}: the guard point is not mounted "
                             f"({self.guard_errors.get(path) or 'disabled or failed'})")  # type: ignore[attr-defined]
        data = g if hasattr(g, "rekey_file") else self._kernel_rekey_files(path, gp)
        try:
            rk = R.Rekey(path, gp.key, data, audit=self._rekey_audit,
                         current_version=lambda name: self.keys.current_version(name))  # type: ignore[attr-defined]
        except OSError as e:
            where = getattr(data, "state_path", None) or "the backing directory"
            raise AgentError(f"{path}: the rekey state in {where} cannot be used "
                             f"({os.strerror(e.errno or 0) if e.errno else e}): check "
                             "agent.state_dir and its permissions") from None
        self.rekeys[path] = rk
        return rk

    def _kernel_rekey_files(self, path: str, gp: C.GuardPoint) -> Any:
        """The rekey data path of a mounted ``engine: kernel`` guard point: the module
        seals blocks again in place (agent.krekey), asked by this process, which it must
        know as its registered agent (the stored bytes of the files, the ioctls)."""
        if self._genl() is None:  # type: ignore[attr-defined]
            raise UsageError(f"{path}: the kernel module has not registered this takakryptd "
                             "(generic netlink transport down): `takakrypt status` says why; "
                             "the rekey needs it")
        return krekey.KernelRekeyFiles(path, self.config.agent.state_dir, path, gp.key)  # type: ignore[attr-defined]

    def _rekey_audit(self, kind: str, reason: str, detail: dict[str, Any], path: str) -> None:
        self._audit_system(kind, reason, detail, path=path)  # type: ignore[attr-defined]

    def _rekey_attach(self, path: str) -> None:
        """After a FUSE guard point is mounted or taken over: remove the temporaries a
        killed rekey left, and resume its rekey if the state file in its backing
        directory says one was running."""
        g = self.guards.get(path)  # type: ignore[attr-defined]
        if g is None:
            return
        try:
            if getattr(g, "engine", "") == "kernel":
                # no temporaries (blocks are sealed again in place); the state and the
                # journal of the range being sealed are in takakryptd's state directory
                n = 0
                if not os.path.isdir(krekey.state_dir_for(self.config.agent.state_dir, path)):  # type: ignore[attr-defined]
                    return
                files = self._kernel_rekey_files(path, self._guard_spec(path))
                torn = files.replay(self.keys.get)  # type: ignore[attr-defined]
                if torn:
                    why = (f"{torn} block(s) of a file torn by a crash while a rekey "
                           "sealed them again were put back from the rekey journal")
                    log.warning("guard point %s: %s", path, why)
                    self._audit_system("rekey", why, {"blocks": torn}, path=path)  # type: ignore[attr-defined]
                fd = files.state_fd()
            elif hasattr(g, "backing_fd"):
                fd = g.backing_fd()
                n = R.remove_leftovers(fd)
            else:
                return
            try:
                st = R.load_state(fd)
            finally:
                os.close(fd)
            if n:
                log.info("guard point %s: removed %d temporary file(s) of an interrupted "
                         "rekey", path, n)
            if st is None:
                return
            rk = self._rekey_for(path)
            if rk is not None and rk.resume_after_restart():
                log.info("guard point %s: rekey resumed (to version %s)", path,
                         rk.state.target_version if rk.state else "?")
        except Exception as e:  # noqa: BLE001 - a damaged state must not stop the mount
            log.error("guard point %s: rekey state: %s", path, e)
            self._audit_system("rekey", f"rekey state not usable: {e}", path=path)  # type: ignore[attr-defined]

    def _rekey_detach(self, path: str) -> None:
        rk = self.rekeys.pop(os.path.normpath(path), None)
        if rk is not None:
            rk.close()

    def rekey_control(self, req: dict[str, Any]) -> dict[str, Any]:
        """Control command ``rekey`` (blocking: run off the loop)."""
        op = req.get("op")
        path = str(req.get("guard") or "")
        if op == "status" and not path:
            return {"rekeys": [rk.status() for rk in self.rekeys.values()]}
        if op not in ("start", "status", "pause", "resume"):
            raise UsageError(f"unknown rekey operation {op!r}")
        rate = req.get("rate")
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float))
                                 or not 0 <= rate <= 100_000):
            raise UsageError("rekey rate: a number of MB/s from 0 (unlimited) to 100000")
        rk = self._rekey_for(path, create=op == "start")
        if rk is None:
            self._guard_spec(path)  # a path that is no guard point: say so
            if op == "status":
                return {"guard": os.path.normpath(path), "state": "none"}
            raise UsageError(f"no rekey of {os.path.normpath(path)} was started")
        if op == "status":
            return rk.status()
        if op == "pause":
            return rk.pause()
        rate_b = None if rate is None else round(float(rate) * MB)
        if op == "resume":
            return rk.resume(rate_b)
        version = req.get("version") or 0
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise UsageError("rekey version: a positive key version (0: the current one)")
        if rate_b is None:
            rate_b = round(self._guard_spec(path).rekey_rate * MB)
        return rk.start(rate_b, version, restart=bool(req.get("restart")))

    def key_usage(self, req: dict[str, Any]) -> dict[str, Any]:
        """Control command ``key_usage``: versions of the guard point's key named by its
        files' headers (blocking: run off the loop)."""
        path = os.path.normpath(str(req.get("guard") or ""))
        gp = self._guard_spec(path)
        key = str(req.get("key") or gp.key)
        g = self.guards.get(path)  # type: ignore[attr-defined]
        if g is not None and hasattr(g, "backing_fd"):
            fd = g.backing_fd()
        else:
            # Unmounted: the directory itself.  A mounted kernel guard point: a separate
            # backing directory directly, an in-place one through the mount, where
            # takakryptd (the agent registered with the module) is given the stored
            # bytes of every file (docs/kernel.md, "Views"), so the headers.
            if g is not None and gp.engine == "kernel" and not gp.backing and \
                    self._genl() is None:  # type: ignore[attr-defined]
                raise AgentError(f"{path}: the kernel module has not registered this "
                                 "takakryptd (generic netlink transport down), so the "
                                 "files under the mount cannot be read for their headers")
            try:
                fd = os.open(gp.backing or path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as e:
                raise AgentError(f"{path}: cannot read the guard point's files "
                                 f"({os.strerror(e.errno or 0)})") from None
        try:
            out = R.usage(fd, key)
        finally:
            os.close(fd)
        return out | {"guard": path}

    def rekey_summary(self) -> list[dict[str, Any]]:
        return [rk.status() for rk in self.rekeys.values()]

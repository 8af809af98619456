"""The kernel engine's side of takakryptd (``engine: kernel`` guard points,
docs/kernel.md): mounting them once the module holds the guard points, releasing the
ones a reload changes before the module gets the new set, the generic-netlink transport
started on demand, and the module's STATUS for ``takakrypt status`` and the metrics.
:class:`KernelEngine` is a mixin of :class:`takakrypt.agent.daemon.Agent`; the mount
itself is :mod:`takakrypt.agent.kmount`."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from .. import config as C
from ..errors import Error

log = logging.getLogger("takakryptd")


def running_on(loop: asyncio.AbstractEventLoop) -> bool:
    """True if the caller runs on ``loop`` (so must not block waiting for it)."""
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class KernelEngine:
    """Methods of the Agent for kernel guard points (uses its guards, guard_errors,
    transports, health_problems, bundles, kernel_last, loop and audit helpers)."""

    async def _release_changed_kernel_guards(self) -> None:
        """Reload, before the module gets the new guard points: kernel guard points the
        new configuration removes, disables or mounts differently (engine, key, id) are
        unmounted while the module still holds their keys, so the unmount writes their
        dirty pages back (the CONFIG_UPDATE without them wipes the keys)."""
        async with self.guard_lock:
            want = {os.path.normpath(g.path): g for g in self.config.guard_points
                    if g.enabled}
            for path, g in list(self.guards.items()):
                if getattr(g, "engine", "fuse") == "kernel" and not (
                        path in want and self._same_kernel_mount(g, want[path])):
                    await self._release_guard(path)

    def _same_kernel_mount(self, current: Any, gp: C.GuardPoint) -> bool:
        if gp.engine != "kernel" or getattr(current, "engine", "fuse") != "kernel":
            return False
        from .kmount import KernelGuard, KernelGuardError

        try:
            return bool(current.mount_args == KernelGuard(gp, self.gp_id(
                os.path.normpath(gp.path))).mount_args)
        except KernelGuardError:
            return False

    def _genl(self) -> Any:
        """The registered generic-netlink transport (the kernel module), or None."""
        for t in self.transports:
            if getattr(t, "name", "") == "genl" and getattr(t, "registered", False):
                return t
        return None

    async def _kernel_ready(self) -> str:
        """Why a kernel guard point cannot be mounted now ("" if it can): the module is
        not loaded, or does not hold this agent's guard points (CONFIG_UPDATE)."""
        try:
            t = await self._kernel_transport()
        except (Error, OSError) as e:
            return str(e)
        why = t.config_in_force()
        return f"the kernel module does not hold the guard points: {why}" if why else ""

    def _engine_not_applied(self, path: str, why: str) -> None:
        """A FUSE guard point whose configuration now says engine kernel, which cannot
        start: the FUSE mount goes on serving (taking it down would leave the directory
        bare), the guard point is reported failing until a reload applies the change."""
        self.guard_errors[path] = f"engine kernel not applied, still served by FUSE: {why}"
        log.error("guard point %s: %s", path, self.guard_errors[path])
        self._audit_system("guard-point", self.guard_errors[path], path=path)

    async def _kernel_transport(self) -> Any:
        """The registered generic-netlink transport; started now if the module was
        loaded after takakryptd started.  KernelGuardError naming `modprobe takakryptfs`
        when the module is not loaded."""
        from . import genl, kmount

        t = self._genl()
        if t is not None:
            return t
        if not any(getattr(x, "name", "") == "genl" for x in self.transports):
            t = await genl.start(self)
            if t is not None:
                self.transports.append(t)
                return t
        state = await self._off_loop(kmount.module_state)
        more = "" if state.state != "absent" else \
            f" ({state.detail}: build and install it first, docs/kernel.md)"
        import errno

        raise kmount.KernelGuardError(errno.ENODEV, (
            "the takakryptfs kernel module is not loaded (generic netlink family "
            f"'takakrypt' absent): {kmount.LOAD_HINT}{more}; engine kernel never falls "
            "back to FUSE or to an unprotected directory"))

    async def _mount_kernel_guard(self, gp: C.GuardPoint, path: str) -> None:
        """``engine: kernel``: once the module has registered this agent and holds the
        guard point (CONFIG_UPDATE acknowledged), mount takakryptfs in place, or reuse
        the mount a killed or upgraded takakryptd left (agent.kmount).  Fails like a
        FUSE guard point that cannot mount: error in status, no READY=1."""
        import msgspec

        from . import kmount

        bundle = self.bundles.get(path)
        why = await self._kernel_ready()
        if bundle is not None:  # a FUSE connection handed over (the engine was fuse)
            await self._resume_guard(msgspec.structs.replace(gp, engine="fuse"), bundle)
            if path not in self.guards:
                return  # not taken over: its error is in guard_errors
            if why:  # served by FUSE still, never left bare: the error says why
                self._engine_not_applied(path, why)
                return
            await self._release_guard(path)
        try:
            if why:
                raise kmount.KernelGuardError(0, why)
            await self._off_loop(_clear_fuse_mount, path)
            g = kmount.KernelGuard(gp, self.gp_id(path))
            how = await self._off_loop(g.mount)
        except Exception as e:  # noqa: BLE001 - one bad guard point must not stop the rest
            self.guard_errors[path] = str(e)
            log.error("guard point %s: %s", path, e)
            self._audit_system("guard-point", f"guard point failed to mount: {e}", path=path)
            return
        self.guards[path] = g
        self.guard_errors.pop(path, None)
        self.health_problems.pop(f"guard:{path}", None)  # stale: checked again soon
        what = ("guard point mounted" if how == "mounted" else
                "guard point taken over: the takakryptfs mount was there already")
        self._audit_system("guard-point", what, {"policy": gp.policy, "engine": "kernel",
                                                 "options": g.data}, path=path)
        log.info("%s: %s (engine kernel, -o %s, policy %s)", what, path, g.data, gp.policy)
        await self._off_loop(self._rekey_attach, path)  # type: ignore[attr-defined]

    async def kernel_status(self) -> dict[str, Any]:
        """The module's state for ``status``: asked now with STATUS_REQUEST when this
        agent is registered with it; ``loaded`` False (and no error) when it is not
        loaded."""
        from .kmount import MODULE

        t = self._genl()
        loaded = os.path.isdir(f"/sys/module/{MODULE}")
        out: dict[str, Any] = {"loaded": loaded, "registered": t is not None,
                               "status": None, "error": None}
        if t is None:
            if loaded:
                out["error"] = ("loaded, but this takakryptd is not registered with it "
                                "(`takakrypt reload` registers it)")
        else:
            out["loaded"] = True
            try:
                st = await t.status()
            except (Error, OSError) as e:
                out["error"] = str(e)
            else:
                import msgspec

                counters = msgspec.to_builtins(st)
                counters["enforcer"] = st.enforcer.name.lower()
                out["status"] = counters
        self.kernel_last = out
        return out

    def _kernel_counters(self) -> dict[str, Any] | None:
        """The module's counters for the metrics (asked from the scrape's thread, on the
        loop); None when there are none to show (module not loaded, no answer)."""
        loop = self.loop
        if loop is None or self._genl() is None:
            return None
        if running_on(loop) or loop.is_closed():  # cannot wait for the loop from the loop
            return (self.kernel_last or {}).get("status")
        fut = asyncio.run_coroutine_threadsafe(self.kernel_status(), loop)
        try:
            return fut.result(5.0).get("status")
        except Exception:  # noqa: BLE001 - a scrape never fails for the kernel's sake
            fut.cancel()
            return None


def _clear_fuse_mount(path: str) -> None:
    """Before a kernel guard point mounts: a FUSE guard point's mount left on ``path``
    (the engine changed from fuse, its server is gone) is cleaned up as a FUSE start
    cleans it (docs/guard-points.md, "Is a mount stale?"); one that another process
    serves, or one held in an fd store, fails the guard point."""
    from .kmount import KernelGuardError, mounts_at

    if not any(m.fstype == "fuse.takakrypt" for m in mounts_at(path)):
        return
    from ..guard import cleanup_stale

    cleanup_stale(path)  # dead or hung: unmounted; held: GuardError
    if any(m.fstype == "fuse.takakrypt" for m in mounts_at(path)):
        import errno

        raise KernelGuardError(errno.EBUSY, f"{path}: a FUSE guard point served by another "
                               "process is mounted there; stop it first")

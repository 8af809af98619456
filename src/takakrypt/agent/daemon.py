"""takakryptd: the agent daemon.

    takakryptd --config FILE [--foreground] [--pid-file PATH] [--fd-store] [--upgrade]

Lifecycle: load and validate the configuration (a bad one stops the start with exit
status 3), take the pid-file lock, open the key backend and audit sinks, start the
control socket, the protocol transports and metrics, mount the guard points (or take
over the connections a previous takakryptd handed over), then tell systemd READY=1
once every guard point is served.  SIGHUP reloads (a configuration that fails
validation leaves the old one running and is logged and audited), SIGTERM/SIGINT stop
gracefully: in-flight requests are answered, audit flushed, and the guard points are
released -- or, with ``--fd-store`` (systemd), handed to the service manager's fd
store: the mounts stay and the next start serves them (agent.handover).
``--upgrade`` takes the guard points over from the running takakryptd, which exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from .. import __version__
from .. import config as C
from .. import policy, procinfo
from ..audit import event as audit_event
from ..errors import ConfigError, Error, KeyNotFound, UsageError
from .control import ControlServer
from .kernel_engine import KernelEngine, running_on
from .keymanager import KeyManager, load_config
from .keys_agent import KeysAgent, keys_loop
from .notify import Notifier
from .rekey_agent import RekeyAgent

log = logging.getLogger("takakryptd")

DEFAULT_CONFIG = "/etc/takakrypt/takakrypt.yaml"


@dataclass
class State:
    """One loaded configuration; replaced whole on reload (readers never see a mix)."""

    config: C.Config
    engine: policy.Engine
    loaded_at: float = field(default_factory=time.time)


class PidFile:
    """A pid file held under an exclusive flock for the daemon's lifetime."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1

    def acquire(self, wait: float = 0.0) -> None:
        """Lock the pid file; ``wait``: seconds to wait for another holder to let go
        (``--upgrade``: the old process exits once we took over)."""
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o755, exist_ok=True)
        deadline = time.monotonic() + wait
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                if time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                raise UsageError(f"takakryptd is already running (pid {other or '?'}, "
                                 f"{self.path})") from None
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            os.close(fd)  # the holder unlinked it meanwhile: lock the file in place
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = -1


class Agent(KernelEngine, RekeyAgent, KeysAgent):
    """The daemon's state and services.  All mutation happens on the event loop."""

    def __init__(self, config_path: str, *, notifier: Notifier | None = None) -> None:
        self.config_path = config_path
        self.notifier = notifier or Notifier()
        self.state = self._load(config_path)
        self.started = time.time()
        self.stopping = asyncio.Event()
        self.inflight = 0
        self.requests = 0
        self.reloads = {"ok": 0, "failed": 0}
        self.last_reload_error: str | None = None
        self.health: dict[str, bool] = {}
        self.health_problems: dict[str, str] = {}  # check name -> why it fails
        self.keys: KeyManager | None = None
        self.closed: dict[str, str] = {}  # guard path -> why it has no key (keys_agent)
        self.rekeys: dict[str, Any] = {}  # guard path -> rekey.Rekey (rekey_agent)
        self.audit: Any = None
        self.metrics: Any = None
        self.cache: Any = None
        self.control_server: ControlServer | None = None
        self.pidfile: PidFile | None = None
        self.transports: list[Any] = []
        self.guards: dict[str, Any] = {}  # path -> mounted guard point
        self.guard_errors: dict[str, str] = {}
        self.crypto_bytes = {"encrypt": 0, "decrypt": 0}
        self._tasks: list[asyncio.Task[Any]] = []
        self.guard_lock = asyncio.Lock()
        self.reload_lock = asyncio.Lock()  # reloads apply one after another, in order
        self._reloading: set[asyncio.Future[Any]] = set()
        self.started_up = False
        self.hup_pending = False
        self.unseen: dict[str, str] = {}  # guard path -> why host processes miss the mount
        # issue 16: connections handed over by the previous takakryptd
        self.bundles: dict[str, Any] = {}  # path -> handover.Bundle, resumed not mounted
        self.from_store = False  # the bundles came from systemd's fd store
        self.fd_store = False  # at stop, hand the guard points to systemd's fd store
        self.unserved: str | None = None  # why every decision is a deny (no keys)
        self.handing_over = False  # a `takakryptd --upgrade` is taking over
        self.handed_over = False  # ... and took the guard points: no key wipe at stop
        self.ready_sent = False
        # main()'s check found the key backend down: (what it said, seconds it took)
        self.start_outage: tuple[str, float] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # set by run()
        self.kernel_last: dict[str, Any] | None = None  # the module's last STATUS answer

    # configuration ------------------------------------------------------------------------
    def _load(self, path: str) -> State:
        # reload: the running backend names the keys; at start main() looked them up
        keys = getattr(self, "keys", None)
        cfg = load_config(path, backend=keys, check_keys=keys is not None, outage_ok=True)
        for w in C.identity_warnings(cfg):  # `takakrypt config check --strict` refuses these
            log.warning("%s: %s", path, w)
        return State(cfg, policy.Engine(cfg))

    @property
    def config(self) -> C.Config:
        return self.state.config

    async def reload(self) -> dict[str, Any]:
        """Re-read the configuration.  On any error the running one stays.  Guard points
        the new one adds are mounted off the event loop: decisions go on meanwhile.
        Reloads run one at a time, in the order they were asked for: two SIGHUPs in a
        row never leave the older file's configuration in force."""
        async with self.reload_lock:
            return await self._reload()

    async def _reload(self) -> dict[str, Any]:
        self.notifier.reloading()
        try:
            # off the loop: the data path's decisions go on while the file is parsed
            new = await self._off_loop(self._load, self.config_path)
            if new.config.keys != self.config.keys:
                log.warning("reload: key backend settings changed; restart takakryptd to "
                            "apply them (keeping the current backend)")
        except Error as e:
            self.reloads["failed"] += 1
            self.last_reload_error = str(e)
            log.error("reload failed, keeping the running configuration: %s", e)
            self._audit_system("config-reload", f"reload rejected: {e}",
                               {"result": "failed"})
            if self.metrics:
                self.metrics.reloads.labels(result="failed").inc()
            self.notifier.send("READY=1", f"STATUS=reload failed: {e}"[:200])
            return {"reloaded": False, "error": str(e)}
        old = self.state
        # before the new policy decides anything, only what BOTH policies prove: a
        # decision it gives must never be cached as one that holds for every process
        # of a uid (docs/guard-points.md, "Policy hints")
        from .guards import policy_hints
        for g in self.guards.values():
            if hasattr(g, "set_policy_hints") and hasattr(g, "spec"):
                both = zip(policy_hints(old.engine, g), policy_hints(new.engine, g))
                g.set_policy_hints(*(a and b for a, b in both))
        self.state = new
        if self.cache is not None:
            self.cache.bump_generation()
        for g in self.guards.values():  # the data path's own cache: nothing stale survives
            if hasattr(g, "bump_generation"):
                g.bump_generation()
            if hasattr(g, "set_policy_hints") and hasattr(g, "spec"):
                from .guards import apply_policy_hints
                apply_policy_hints(self, g)  # what the new policy proves
        self.reloads["ok"] += 1
        self.last_reload_error = None
        self._audit_system("config-reload", "configuration reloaded", {"result": "ok"})
        if self.metrics:
            self.metrics.reloads.labels(result="ok").inc()
        log.info("configuration reloaded from %s", self.config_path)
        await self._release_changed_kernel_guards()
        for t in self.transports:  # the kernel module gets the new guard points, and
            if hasattr(t, "reconfigure"):  # has them before kernel guard points mount
                try:
                    await t.reconfigure()
                except (Error, OSError) as e:
                    log.error("reload: CONFIG_UPDATE to the kernel module failed: %s", e)
            elif hasattr(t, "config_changed"):
                t.config_changed()
        await self.reconcile_guards()
        self.ready_if_served()
        return {"reloaded": True, "generation": self.cache.generation if self.cache is not None else None}

    def reload_soon(self) -> None:
        """SIGHUP: reload in a task of its own (never cancelled: a mount it started
        must end up in ``guards`` to be released at stop).  During start-up: once
        started (READY=1 must not come before the start is done)."""
        if not self.started_up:
            self.hup_pending = True
            return
        task = asyncio.ensure_future(self.reload())
        self._reloading.add(task)
        task.add_done_callback(self._reloading.discard)

    # decisions ----------------------------------------------------------------------------
    def decide(self, policy_name: str, uid: int, gid: int, tid: int, path: str, action: str,
               *, guard: str = "", key: str | None = None, audit: bool = True,
               exe: tuple[int, int] | None = None) -> policy.Decision:
        """The agent-side chokepoint: identify the calling thread ``tid``, evaluate,
        meter, audit.  ``exe``: the (st_dev, st_ino) of the executable the enforcement
        point saw (or, from the FUSE engine, st_ino with the ctime folded in:
        procinfo.exe_ino_key); a caller that now runs another one (it exec'd meanwhile,
        or the file changed) is denied."""
        t0 = time.perf_counter()
        state = self.state
        if self.unserved:  # no keys (a handed-over connection): every access is a deny
            d = policy.Decision(policy=policy_name, rule=-1, effects=frozenset({"deny"}),
                                permit=False, apply_key=False, audit=True, cache_ttl=0.0)
            if audit:
                self._audit_access(d, uid, tid, "", path, action, key, 0.0, self.unserved,
                                   guard=guard)
            return d
        try:
            proc = procinfo.inspect(tid)
        except procinfo.ProcessGone:
            d = policy.Decision(policy=policy_name, rule=-1, effects=frozenset({"deny"}),
                                permit=False, apply_key=False, audit=True, cache_ttl=0.0)
            if audit:
                self._audit_access(d, uid, tid, "", path, action, key,
                                   time.perf_counter() - t0,
                                   "process exited before it could be identified")
            return d
        if policy_name not in state.engine.policies:
            d = policy.Decision(policy=policy_name, rule=-1, effects=frozenset({"deny"}),
                                permit=False, apply_key=False, audit=True)
            reason = "policy no longer configured"
        elif exe is not None and (proc.exe_id is None or proc.exe_id[0] != exe[0] or exe[1]
                                  not in (proc.exe_id[1], procinfo.exe_ino_key(proc.exe_id))):
            d = policy.Decision(policy=policy_name, rule=-1, effects=frozenset({"deny"}),
                                permit=False, apply_key=False, audit=True, cache_ttl=0.0)
            reason = "caller runs another executable than the one the request names"
        else:
            req = policy.Request(uid=uid, gid=gid, groups=proc.groups, process=proc, path=path,
                                 action=action)
            d = state.engine.evaluate(policy_name, req)
            reason = ""
        elapsed = time.perf_counter() - t0
        if self.metrics:
            self.metrics.decisions.labels(effect=d.verdict).inc()
            self.metrics.decision_latency.observe(elapsed)
        if d.audit and audit:
            self._audit_access(d, uid, proc.pid, proc.exe, path, action, key, elapsed, reason,
                               groups=proc.groups, guard=guard)
        return d

    def _audit_access(self, d: policy.Decision, uid: int, pid: int, exe: str, path: str,
                      action: str, key: str | None, elapsed: float, reason: str = "",
                      groups: tuple[int, ...] = (), guard: str = "") -> None:
        if self.audit is None:
            return
        full = os.path.join(guard, path) if guard else path
        self.audit.log(audit_event.access_event(
            uid=uid, pid=pid, exe=exe, path=full, operation=action, decision=d.verdict,
            effects=sorted(d.effects), policy=d.policy, rule=d.rule,
            key=key if d.apply_key else None, learn_mode=d.learn_mode,
            latency_us=elapsed * 1e6, reason=reason, groups=groups))

    def _audit_system(self, kind: str, reason: str, detail: dict[str, Any] | None = None,
                      path: str = "") -> None:
        if self.audit is not None:
            self.audit.log(audit_event.system_event(kind, reason, detail=detail, path=path))

    # guard points -------------------------------------------------------------------------
    async def reconcile_guards(self) -> None:
        """Mount what the configuration adds, release what it removes; one at a time
        (reloads queue up), and nothing new once the agent is stopping."""
        async with self.guard_lock:
            want = {os.path.normpath(g.path): g for g in self.config.guard_points
                    if g.enabled}
            for path in list(self.guards):
                if path not in want:
                    await self._release_guard(path)
            for path, gp in want.items():
                if self.stopping.is_set():
                    return
                if path in self.guards:
                    current = self.guards[path]
                    if getattr(current, "spec", None) == gp and \
                            getattr(current, "gp_id", None) in (None, self.gp_id(path)):
                        self.guard_errors.pop(path, None)  # an engine change undone
                        continue
                    spec = getattr(current, "spec", None)
                    if spec is not None and spec.engine == "fuse" and msgspec.structs.replace(
                            spec, rekey_rate=gp.rekey_rate) == gp and \
                            getattr(current, "gp_id", None) in (None, self.gp_id(path)):
                        current.spec = gp  # the rekey rate only: the next start uses it
                        continue
                    if self._same_kernel_mount(current, gp):
                        current.spec = gp  # policy and FUSE settings: nothing to remount
                        continue
                    if gp.engine == "kernel" and getattr(current, "engine", "fuse") != "kernel":
                        why = await self._kernel_ready()
                        if why:  # FUSE -> kernel: not before the module can take over
                            self._engine_not_applied(path, why)
                            continue
                    await self._release_guard(path)  # engine, key, id or path changed
                await self._mount_guard(gp)

    def gp_id(self, path: str) -> int:
        """The id of the guard point at ``path`` in CONFIG_UPDATE and POLICY_CHECK: its
        1-based index in ``guard_points`` (0 if it is not configured)."""
        for i, g in enumerate(self.config.guard_points, 1):
            if os.path.normpath(g.path) == path:
                return i
        return 0

    @staticmethod
    async def _off_loop(fn: Callable[..., Any], *args: Any) -> Any:
        # mount and unmount block (the kernel's INIT, fusermount3): in a thread, while
        # the loop keeps answering the data path of the other guard points
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def _mount_guard(self, gp: C.GuardPoint) -> None:
        path = os.path.normpath(gp.path)
        if gp.engine == "kernel":
            await self._mount_kernel_guard(gp, path)
            return
        try:
            from . import guards
        except ImportError as e:  # pragma: no cover - the FUSE extension is part of the build
            self.guard_errors[path] = f"FUSE data path unavailable: {e}"
            return
        bundle = self.bundles.get(path)
        if bundle is not None:
            await self._resume_guard(gp, bundle)
            return
        try:
            from . import kmount

            # a kernel guard point's mount left there (engine changed from kernel): a
            # FUSE mount stacked on it would encrypt what takakryptfs encrypts again
            await self._off_loop(kmount.unmount_all, path)
            g = await self._off_loop(guards.mount, self, gp)
            guards.apply_policy_hints(self, g)  # a reload may have come meanwhile
            self.guards[path] = g
            self.guard_errors.pop(path, None)
            self.health_problems.pop(f"guard:{path}", None)  # stale: checked again soon
            self._persist(path, g)
            self._audit_system("guard-point", "guard point mounted", {"policy": gp.policy},
                               path=path)
            log.info("guard point %s mounted (policy %s, key %s)", path, gp.policy, gp.key)
            await self._off_loop(self._rekey_attach, path)
        except Exception as e:  # noqa: BLE001 - one bad guard point must not stop the rest
            self.guard_errors[path] = str(e)
            log.error("guard point %s: %s", path, e)
            self._audit_system("guard-point", f"guard point failed to mount: {e}", path=path)

    async def _resume_guard(self, gp: C.GuardPoint, bundle: Any) -> None:
        """Take over a connection handed over instead of mounting.  If the engine
        cannot, the path is NOT mounted afresh (that would unmount a live connection):
        its requests keep waiting in the kernel, the error shows in status, and the
        descriptors stay where they are (fd store / this process) for another try."""
        from . import guards, handover

        path = os.path.normpath(gp.path)
        try:
            g = await self._off_loop(guards.resume, self, gp, bundle.fds, bundle.state)
        except Exception as e:  # noqa: BLE001
            self.guard_errors[path] = (f"cannot take over the connection the previous "
                                       f"takakryptd handed over: {e} (not remounted; "
                                       "requests wait in the kernel)")
            log.error("guard point %s: %s", path, self.guard_errors[path])
            self._audit_system("guard-point", self.guard_errors[path], path=path)
            return
        guards.apply_policy_hints(self, g)
        self.guards[path] = g
        self.guard_errors.pop(path, None)
        del self.bundles[path]
        bundle.close()  # the engine holds its own copies
        if self.from_store:  # stale now: this process's own go in instead
            handover.remove(self.notifier.send_fds, bundle.names)
        self._persist(path, g)
        self._audit_system("guard-point", "guard point taken over from the previous "
                           "takakryptd", {"policy": gp.policy}, path=path)
        log.info("guard point %s taken over (policy %s, key %s)", path, gp.policy, gp.key)
        await self._off_loop(self._rekey_attach, path)

    def _persist(self, path: str, g: Any) -> None:
        """With an fd store: keep this guard point's connection and its shadow state
        there from now on, so a successor takes it over even after takakryptd is
        killed (watchdog, OOM killer, crash) -- the path then waits for it instead of
        failing with ENOTCONN, and is never uncovered (docs/guard-points.md, "After a
        kill").  At a clean stop the quiesced handover replaces these entries."""
        from . import handover

        if not (self.fd_store and self.notifier.enabled and hasattr(g, "persist_fds")):
            return
        fds = g.persist_fds()
        if not fds:
            return
        names = [handover.fdname(path, i) for i in range(len(fds) + 1)]
        try:
            handover.remove(self.notifier.send_fds, names)
            handover.store(self.notifier.send_fds, path, fds, b"")
        except (handover.HandoverError, OSError) as e:
            log.warning("guard point %s: the fd store did not take its connection (%s): "
                        "after a kill it fails with ENOTCONN until the next start", path, e)

    def ready_if_served(self, status: str = "running") -> bool:
        """READY=1 only when every enabled guard point is mounted or taken over: units
        ordered after takakryptd (databases) must not start on a bare directory."""
        down = [p for p in (os.path.normpath(g.path) for g in self.config.guard_points
                            if g.enabled) if p not in self.guards]
        if self.unserved:
            status = f"denying every access: {self.unserved}"
        if down:
            why = self.guard_errors.get(down[0], "not mounted")
            status = f"guard point {down[0]}: {why}"
            if not self.ready_sent:  # (once ready, a reload still ends with READY=1)
                self.notifier.status(f"not ready: {status}"[:200])
                return False
        self.notifier.ready(status[:200])
        self.ready_sent = True
        return not down

    async def _release_guard(self, path: str) -> None:
        await self._off_loop(self._rekey_detach, path)  # state kept: resumed at the next mount
        g = self.guards.pop(path, None)
        self.unseen.pop(path, None)
        if g is None:
            return
        try:
            how = await self._off_loop(g.unmount)
        except Exception as e:  # noqa: BLE001
            log.error("guard point %s: unmount failed: %s", path, e)
            how = None
        if how == "detached":  # engine kernel, busy: lazily (agent.kmount)
            why = ("guard point released: busy, detached lazily (open files keep the "
                   "detached mount until they are closed)")
            log.warning("guard point %s: %s", path, why)
            self._audit_system("guard-point", why, path=path)
            return
        self._audit_system("guard-point", "guard point released", path=path)
        log.info("guard point %s released", path)

    async def _store_guard(self, path: str) -> None:
        """Stop under systemd with an fd store: the connection goes to the store, the
        mount stays; the next start takes it over.  Nothing is unmounted even if this
        fails: the connection then closes with this process and the path fails (ENOTCONN)
        instead of showing the backing directory."""
        from . import handover

        await self._off_loop(self._rekey_detach, path)
        g = self.guards.pop(path)
        self.unseen.pop(path, None)
        if getattr(g, "engine", "fuse") == "kernel":
            # the mount does not depend on this process: it stays, and the next start
            # reuses it (its keys stay too: no wipe with an fd store)
            what = "guard point left mounted for the next takakryptd (engine kernel)"
            self._audit_system("guard-point", what, path=path)
            log.info("guard point %s: %s", path, what)
            return
        try:
            fds, state = await self._off_loop(g.handover_begin)
            # the entries kept since the mount (for a kill) give way to the handover's
            handover.remove(self.notifier.send_fds,
                            [handover.fdname(path, i) for i in range(len(fds) + 8)])
        except Exception as e:  # noqa: BLE001
            log.error("guard point %s: cannot hand the connection over (%s); it closes "
                      "with takakryptd: ENOTCONN until the next start", path, e)
            self._audit_system("guard-point", f"handover failed: {e}", path=path)
            return
        try:
            handover.store(self.notifier.send_fds, path, fds, state)
            what = "guard point handed to the service manager's fd store"
        except (handover.HandoverError, OSError) as e:
            what = f"fd store refused the connection ({e}): ENOTCONN until the next start"
            log.error("guard point %s: %s", path, what)
        await self._off_loop(g.handover_done)
        self._audit_system("guard-point", what, path=path)
        log.info("guard point %s: %s", path, what)

    async def handover_to(self, req: dict[str, Any]) -> dict[str, Any]:
        """Control command ``handover`` (from ``takakryptd --upgrade``): send every
        guard point to the new process's socket.  If it takes them over, let go and
        stop; if not, resume serving.  One at a time: a second upgrade is refused."""
        from . import handover

        sock = req.get("socket")
        if not isinstance(sock, str) or not sock:
            raise UsageError("handover: 'socket' must name the new takakryptd's socket")
        if self.handing_over or self.stopping.is_set():
            raise UsageError("an upgrade of takakryptd is already under way (or it is "
                             "stopping); try again once it is done")
        self.handing_over = True
        begun: list[tuple[str, Any, list[int], bytes]] = []
        try:
            async with self.guard_lock:
                try:
                    for path, g in list(self.guards.items()):
                        if getattr(g, "engine", "fuse") == "kernel":
                            continue  # nothing to hand over: the successor reuses the mount
                        fds, state = await self._off_loop(g.handover_begin)
                        begun.append((path, g, fds, state))
                    await self._off_loop(handover.hand_to, sock,
                                         [(p, f, st) for p, _g, f, st in begun])
                except Exception as e:
                    for path, g, _f, _st in begun:  # the successor failed: serve again
                        await self._off_loop(g.handover_abort)
                    log.error("upgrade refused, still serving: %s", e)
                    self._audit_system("agent", f"upgrade failed, still serving: {e}")
                    raise handover.HandoverError(f"handover failed: {e}") from None
                for path, g, _f, _st in begun:
                    await self._off_loop(g.handover_done)
                    self.guards.pop(path, None)
                kept = [p for p, g in self.guards.items()
                        if getattr(g, "engine", "fuse") == "kernel"]
                for path in kept:  # left mounted, never unmounted: the successor reuses them
                    self.guards.pop(path)
                self.handed_over = True  # and the kernel keeps their keys
                done = [p for p, *_ in begun] + kept
                self._audit_system("agent", "guard points handed to the new takakryptd",
                                   {"guard_points": done})
                log.info("handed %d guard point(s) to the new takakryptd; stopping",
                         len(done))
                self.stopping.set()
                return {"handed_over": done, "pid": os.getpid()}
        finally:
            self.handing_over = False

    async def guard_release(self, req: dict[str, Any]) -> dict[str, Any]:
        """``takakrypt guard release PATH``: the one way to take a guard point down.
        Refused while any process holds a file under it (it would go on with the bare
        directory: plaintext writes); afterwards checked again.  It stays down until
        the next start or reload (``enabled: false`` keeps it down)."""
        from .holders import describe, holders

        path = os.path.normpath(str(req.get("path") or ""))
        async with self.guard_lock:
            if path not in self.guards:
                raise UsageError(f"{path} is not a guard point served by this takakryptd")
            found = await self._off_loop(lambda: holders(path, skip=(os.getpid(),)))
            if found:
                raise UsageError(f"{path} is in use, not released: {describe(found)}")
            await self._release_guard(path)
            after = await self._off_loop(lambda: holders(path, skip=(os.getpid(),)))
        if after:  # opened between the check and the unmount: on the bare directory now
            why = f"released, but files were opened meanwhile: {describe(after)}"
            log.error("guard point %s: %s", path, why)
            self._audit_system("guard-point", why, path=path)
            return {"released": path, "warning": why}
        return {"released": path}

    # status -------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        audit = self.audit.stats() if self.audit is not None else {}
        return {
            "cache": self.cache.stats() if self.cache is not None else {},
            "audit": audit,
            "health": dict(self.health),
            "breaker_state": self.keys.breaker.state if self.keys else "closed",
            "guard_points_mounted": sum(1 for g in self.guards.values()
                                        if getattr(g, "is_mounted", True)),
            "crypto_bytes": self._crypto_bytes(),
            "kernel": self._kernel_counters(),
            "rekeys": self.rekey_summary(),
            "keys": self.keys_status(),
        }

    def _crypto_bytes(self) -> dict[str, int]:
        out = dict(self.crypto_bytes)
        for g in self.guards.values():
            st = g.stats() if hasattr(g, "stats") else {}
            out["encrypt"] += int(st.get("bytes_encrypted", 0))
            out["decrypt"] += int(st.get("bytes_decrypted", 0))
        return out

    def status(self) -> dict[str, Any]:
        healthy = all(self.health.values()) if self.health else True
        return {
            "version": __version__,
            "pid": os.getpid(),
            "kernel": self.kernel_last,
            "config": self.config_path,
            "uptime_seconds": round(time.time() - self.started, 3),
            "healthy": healthy,
            "state": self.health_state(),
            "health": dict(self.health),
            "problems": dict(self.health_problems),
            "key_backend": {"type": self.config.keys.backend,
                            **(self.keys.breaker.snapshot() if self.keys else {})},
            "policies": sorted(self.config.policies),
            "guard_points": self.guard_list(),
            "requests": self.requests,
            "inflight": self.inflight,
            "reloads": dict(self.reloads),
            "last_reload_error": self.last_reload_error,
            "denying_all": self.unserved,
            "cache": self.cache.stats() if self.cache is not None else None,
            "audit": self.audit.stats() if self.audit is not None else None,
            "metrics": (f"http://{self.metrics.address[0]}:{self.metrics.address[1]}/metrics"
                        if self.metrics and self.metrics.address else None),
            "transports": [t.describe() for t in self.transports],
            "rekeys": self.rekey_summary(),
            "keys": self.keys_status(),
        }

    def guard_list(self) -> list[dict[str, Any]]:
        out = []
        for gp in self.config.guard_points:
            path = os.path.normpath(gp.path)
            g = self.guards.get(path)
            out.append({"path": path, "policy": gp.policy, "key": gp.key,
                        "engine": gp.engine,
                        "backing": gp.backing or "(in place)", "enabled": gp.enabled,
                        "mounted": bool(g is not None and getattr(g, "is_mounted", True)),
                        "error": (self.guard_errors.get(path) or self.unseen.get(path)
                                  or self.health_problems.get(f"guard:{path}")),
                        "closed": self.closed.get(path),
                        "request_timeout_ms": getattr(getattr(g, "_m", None),
                                                      "ring_timeout_ms", None),
                        "stats": g.stats() if g is not None and hasattr(g, "stats") else None,
                        "mount": g.describe() if hasattr(g, "describe") else None})
        return out

    # control commands ---------------------------------------------------------------------
    def control(self, req: dict[str, Any]) -> Any:
        cmd = req["cmd"]
        if cmd == "status":
            return self._status_now()  # what holds now, not 10 s ago
        if cmd == "reload":
            return self.reload()  # a coroutine: the control server awaits it
        if cmd == "guard_list":
            return self.guard_list()
        if cmd == "keys_list":
            import msgspec

            if self.keys is None:
                raise UsageError("no key backend open")
            return [msgspec.to_builtins(k) for k in self.keys.list()]
        if cmd == "audit_stats":
            return self.audit.stats() if self.audit is not None else {}
        if cmd == "health":
            return self._checked(lambda: {
                "healthy": all(self.health.values()) if self.health else True,
                "state": self.health_state(), "checks": dict(self.health),
                "problems": dict(self.health_problems)})
        if cmd == "keys_changed":  # sent by `takakrypt keys rotate`
            return self._checked(lambda: {"state": self.health_state()})
        if cmd == "policy_check":
            return self._control_policy_check(req)
        if cmd == "handover":  # from `takakryptd --upgrade`
            return self.handover_to(req)
        if cmd == "guard_release":
            return self.guard_release(req)
        if cmd == "rekey":
            return self._off_loop(self.rekey_control, req)
        if cmd == "key_usage":
            return self._off_loop(self.key_usage, req)
        raise UsageError(f"unknown command {cmd!r}")

    def _control_policy_check(self, req: dict[str, Any]) -> Any:
        """Evaluate against the LIVE policy (same engine the data path uses)."""
        from ..cli import policy_check_request

        request, pol_name = policy_check_request(self.config, req)
        d = self.state.engine.evaluate(pol_name, request, explain=True)
        out = d.as_dict() | {"generation": self.cache.generation if self.cache is not None
                             else None}
        # the policy may permit, but a guard point whose key is missing denies everything
        path = os.path.normpath(str(req.get("path") or ""))
        for gp in self.config.guard_points:
            root = os.path.normpath(gp.path)
            if gp.enabled and gp.policy == pol_name and (
                    path == root or path.startswith(root.rstrip("/") + "/")):
                why = self.key_problem(gp.key)
                if why and out["permit"]:
                    out |= {"decision": "deny", "permit": False, "apply_key": False,
                            "effects": ["deny"],
                            "explanation": [*out["explanation"], f"guard point {root}: {why}"]}
        return out

    async def _status_now(self) -> dict[str, Any]:
        await self._off_loop(self.check_health)
        await self.kernel_status()
        return self.status()

    # health -------------------------------------------------------------------------------
    async def _checked(self, answer: Callable[[], Any]) -> Any:
        # the checks send a request through every guard point and wait for it: not on
        # the loop, which answers the data path's decisions meanwhile
        await self._off_loop(self.check_health)
        return answer()

    def check_health(self) -> dict[str, bool]:
        checks: dict[str, bool] = {}
        problems: dict[str, str] = {}
        checks["key_backend"] = self.keys.probe() if self.keys else False
        self.key_upkeep()  # guard points closed or open again (keys_agent)
        if not checks["key_backend"]:
            problems["key_backend"] = (self.keys.last_error if self.keys else None) or \
                self.unserved or "no key backend open"
        if self.audit is not None:
            sinks = self.audit.stats().get("sinks", {})
            checks["audit_sinks"] = all(not s.get("failing", False) for s in sinks.values())
        for gp in self.config.guard_points:
            if not gp.enabled:
                continue
            path = os.path.normpath(gp.path)
            g = self.guards.get(path)
            checks[f"guard:{path}"] = (bool(g is not None and getattr(g, "is_mounted", False))
                                       and self._visible(path, g))
            if path in self.unseen:
                problems[f"guard:{path}"] = self.unseen[path]
            elif not checks[f"guard:{path}"]:
                problems[f"guard:{path}"] = self.guard_errors.get(path) or "not mounted"
            elif path in self.guard_errors:  # served, but not as configured (engine)
                checks[f"guard:{path}"] = False
                problems[f"guard:{path}"] = self.guard_errors[path]
            elif why := self._serves(path, g):
                checks[f"guard:{path}"] = False
                problems[f"guard:{path}"] = why
            why = self.key_problem(gp.key) or self.closed.get(path) or (
                f"every access is denied: {self.unserved}" if self.unserved else "")
            if why:
                checks[f"guard:{path}"] = False
                problems[f"guard:{path}"] = why
        for name, why in problems.items():
            if self.health_problems.get(name) != why:  # log each new problem once
                log.error("%s: %s", name, why)
        self.health, self.health_problems = checks, problems
        self._pick_up_rotations()
        return checks

    def key_problem(self, name: str) -> str:
        """Why a guard point with key ``name`` denies every access ("" if it does not):
        the backend answers that the key does not exist.  A backend that fails is not
        such a reason (held keys are still served: degraded)."""
        if self.keys is None:
            return ""
        try:
            self.keys.current_version(name)
        except KeyNotFound as e:
            return f"{e}: every access is denied"
        except Error:
            return ""
        return ""

    def _pick_up_rotations(self) -> None:
        """Keys rotated since they were last read (``keys rotate``): the guard points that
        use them forget the current version they hold, so new files use the new one."""
        if self.keys is None:
            return
        changed = self.keys.changed_versions()
        for name, version in changed.items():
            for g in list(self.guards.values()):
                if getattr(getattr(g, "spec", None), "key", None) == name and \
                        hasattr(g, "bump_generation"):
                    g.bump_generation()
            log.info("key %s: new files use version %d", name, version)
            self._audit_system("key-rotation", f"key {name} now at version {version}",
                               {"key": name, "version": version})
        if any(gp.engine == "kernel" and gp.key in changed
               for gp in self.config.guard_points):
            self._kernel_forget_versions()

    def _kernel_forget_versions(self) -> None:
        """The module holds the current version of each kernel guard point's key until a
        CONFIG_UPDATE: send one (and, off the loop, wait for its answer, so that `keys
        rotate` returns once new files of kernel guard points take the new version)."""
        t, loop = self._genl(), self.loop
        if t is None or loop is None:
            return  # not registered: the module gets the guard points when it registers
        if running_on(loop):
            t.config_changed()
            return
        try:
            asyncio.run_coroutine_threadsafe(t.reconfigure(), loop).result(timeout=10)
        except Exception as e:  # noqa: BLE001 - the next CONFIG_UPDATE carries it too
            log.warning("kernel module: the rotation was not passed on: %s", e)

    def health_state(self) -> str:
        """healthy; degraded (only the key backend fails: keys already held are served);
        unhealthy (a guard point, the audit trail)."""
        bad = [n for n, ok in self.health.items() if not ok]
        if any(n != "key_backend" for n in bad):
            return "unhealthy"
        if bad or (self.keys is not None and self.keys.degraded):
            return "degraded"
        return "healthy"

    def _serves(self, path: str, g: Any) -> str:
        """Why the guard point's mount does not serve ("" if it does): a real request
        through it, from a child process, never a stat the kernel answers from its
        cache; several takakrypt mounts stacked on the path fail too.  A kernel guard
        point: its mount on top of the path, and the module holding this agent's
        guard points (else it denies what it has not cached)."""
        if getattr(g, "engine", "fuse") == "kernel":
            t = self._genl()
            agent = ("the kernel module has no registered agent" if t is None
                     else t.config_in_force())
            return g.mount_problem() or (f"{agent}: accesses are denied" if agent else "")
        if hasattr(g, "mount_problem"):
            return g.mount_problem()
        from ..guard import mount_problem

        return mount_problem(getattr(g, "path", path))

    def _visible(self, path: str, g: Any) -> bool:
        """False when host processes do not see the guard point's mount: it is missing
        from PID 1's mount namespace (a private namespace, or one without propagation
        towards the host), so they reach the backing files around the policy."""
        if hasattr(g, "visible_to_init"):  # a kernel guard point
            seen = g.visible_to_init()
        else:
            from ..guard import mount_device, visible_to_init

            dev = mount_device(getattr(g, "path", path))
            seen = None if dev is None else visible_to_init(dev)
        if seen is not False:
            if self.unseen.pop(path, None) is not None:
                log.info("guard point %s: the mount is visible to PID 1 again", path)
            return True
        if path not in self.unseen:
            self.unseen[path] = ("mount not visible in PID 1's mount namespace "
                                 "(/proc/1/mountinfo): host processes see the backing "
                                 "files; takakryptd runs in a mount namespace that does "
                                 "not propagate to the host")
            log.error("guard point %s: %s", path, self.unseen[path])
            self._audit_system("guard-point", self.unseen[path], path=path)
        return False


# ------------------------------------------------------------------------------------------
# running



@contextlib.contextmanager
def _setting(agent: Agent, name: str, what: str) -> Any:
    """A start-up step the system may refuse (port in use, directory missing): one
    line naming the setting and the configuration file, exit status 3, no traceback."""
    try:
        yield
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        raise ConfigError(f"{agent.config_path}: {name}: cannot {what}{where}: "
                          f"{e.strerror or e}") from None


async def run(agent: Agent, *, pid_file: str | None = None,
              ready: Callable[[], None] | None = None, upgrade: bool = False) -> int:
    from ..audit.config import build_logger

    loop = asyncio.get_running_loop()
    agent.loop = loop
    cfg = agent.config
    # signals first: SIGTERM/SIGINT during start-up end it at the next step, cleanly
    # (no default action killing the process in the middle of a mount)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stopping.set)
    loop.add_signal_handler(signal.SIGHUP, agent.reload_soon)
    pidfile = PidFile(pid_file or cfg.agent.pid_file)
    if not upgrade:  # an upgrade takes it once the running takakryptd let go
        with _setting(agent, "--pid-file" if pid_file else "$.agent.pid_file", "create"):
            pidfile.acquire()
        agent.pidfile = pidfile
    try:
        try:
            with _setting(agent, "$.keys", "open the key backend at"):
                # a backend that is down starts closed (keys_agent), not an error
                down, took = agent.start_outage or (None, 0.0)
                agent.keys = KeyManager.open(cfg.keys, known_down=down, known_down_took=took)
        except Error as e:
            if not (agent.bundles or upgrade):
                raise
            # connections were handed over: take them (never unmount) and deny
            agent.unserved = f"the key backend cannot be opened: {e}"
            log.error("%s; every access to the guard points is denied", agent.unserved)
        with _setting(agent, "$.audit.sinks", "open"):
            agent.audit = build_logger(cfg.audit) if cfg.audit is not None else build_logger({})
        from .._cache import DecisionCache

        agent.cache = DecisionCache(max_entries=cfg.agent.cache.max_entries,
                                    default_ttl=cfg.agent.cache.ttl_seconds)
        if upgrade:
            await _take_over(agent)
            with _setting(agent, "--pid-file" if pid_file else "$.agent.pid_file", "create"):
                await agent._off_loop(pidfile.acquire, 60.0)  # the old one exits now
            agent.pidfile = pidfile
        if cfg.agent.metrics is not None and cfg.agent.metrics.enabled:
            from .metrics import Metrics

            agent.metrics = Metrics(agent.stats)
            m = cfg.agent.metrics
            with _setting(agent, "$.agent.metrics", f"listen on {m.address}:{m.port}"):
                agent.metrics.serve(m.address, m.port)
        control = ControlServer(cfg.agent.control_socket, agent.control)
        with _setting(agent, "$.agent.control_socket", "create"):
            await control.start()
        agent.control_server = control  # only one that started is closed (and unlinked)
        from . import transports

        with _setting(agent, "$.agent.protocol_socket", "create"):
            agent.transports = await transports.start_all(agent)
        if not agent.stopping.is_set():
            await agent.reconcile_guards()
        for path in agent.bundles.keys() - agent.guards.keys():
            if path not in agent.guard_errors:  # no longer configured: left as it is
                why = ("the fd store holds a connection for a path that is no longer a "
                       "guard point: left in the store, its requests wait (configure it "
                       "again, or release it: docs/operations.md)")
                log.error("%s: %s", path, why)
                agent._audit_system("guard-point", why, path=path)
        if agent.stopping.is_set():
            log.info("stopped during start-up")
            agent.notifier.stopping()
            return 0
        agent.check_health()
        agent._tasks.append(asyncio.ensure_future(_health_loop(agent)))
        agent._tasks.append(asyncio.ensure_future(keys_loop(agent)))
        if agent.notifier.watchdog_interval:
            agent._tasks.append(asyncio.ensure_future(_watchdog_loop(agent)))
        agent._audit_system("agent", "takakryptd started", {"version": __version__})
        log.info("takakryptd %s ready (config %s, %d guard point(s))", __version__,
                 agent.config_path, len(agent.guards))
        agent.ready_if_served("running")
        agent.started_up = True
        if agent.hup_pending:
            agent.reload_soon()
        if ready:
            ready()
        await agent.stopping.wait()
        log.info("stopping")
        agent.notifier.stopping()
        return 0
    finally:
        await _shutdown(agent)


async def _take_over(agent: Agent) -> None:
    """``--upgrade``: receive the running takakryptd's guard points and resume each
    (keys and policy are loaded already).  All or nothing: if one cannot be taken over,
    the ones that were are let go again (not unmounted) and the old process resumes
    serving every one; this process then exits with the reason."""
    from . import handover, transports

    transports.start_ring(agent)  # resumed guard points send their cache misses here
    up = handover.Upgrade(agent.config.agent.control_socket)
    try:
        agent.bundles = await agent._off_loop(up.receive)
        want = {os.path.normpath(g.path): g for g in agent.config.guard_points if g.enabled}
        failed = [f"{p}: not a guard point of {agent.config_path}" for p in agent.bundles
                  if p not in want]
        if not failed:
            for path in list(agent.bundles):
                await agent._mount_guard(want[path])  # resumes: never mounts
            failed = [f"{p}: {agent.guard_errors.get(p)}" for p in agent.bundles]
        if failed:
            for path in [p for p in list(agent.guards) if p in want]:
                g = agent.guards.pop(path)
                with contextlib.suppress(Exception):
                    await agent._off_loop(g.handover_begin)
                    await agent._off_loop(g.handover_done)
            why = "; ".join(failed)
            with contextlib.suppress(Error, OSError):
                await agent._off_loop(up.confirm, False, why)
            raise handover.HandoverError(f"--upgrade: cannot take over ({why}); the running "
                                         "takakryptd keeps serving")
        await agent._off_loop(up.confirm, True)
        log.info("took over %d guard point(s) from the running takakryptd",
                 len(agent.guards))
    finally:
        for b in agent.bundles.values():
            b.close()
        agent.bundles.clear()
        up.close()


async def _health_loop(agent: Agent, interval: float = 10.0) -> None:
    while True:
        await asyncio.sleep(interval)
        await asyncio.get_running_loop().run_in_executor(None, agent.check_health)


async def _watchdog_loop(agent: Agent) -> None:
    assert agent.notifier.watchdog_interval
    while True:
        agent.notifier.watchdog()  # sent from the loop itself: a stuck loop stops pinging
        await asyncio.sleep(agent.notifier.watchdog_interval)


async def _shutdown(agent: Agent) -> None:
    for t in agent._tasks:
        t.cancel()
    if agent.control_server is not None:
        await agent.control_server.close()
    if not (agent.fd_store and agent.notifier.enabled):
        # kernel guard points first, while the module still gets keys from us: the
        # unmount writes their dirty pages back (after the wipe below it could not)
        async with agent.guard_lock:
            for path, g in list(agent.guards.items()):
                if getattr(g, "engine", "fuse") == "kernel":
                    await agent._release_guard(path)
    if agent.fd_store and agent.notifier.enabled:
        # hand the guard points over FIRST: their requests in progress may still need
        # a decision from the transports (the engine's cache misses go to the ring);
        # closing those first made them fail -- a database PANIC at every restart
        async with agent.guard_lock:
            for path in list(agent.guards):
                await agent._store_guard(path)
    for t in agent.transports:
        with contextlib.suppress(Exception):
            await t.close()  # stops accepting, answers what is in flight
    for _ in range(500):  # in-flight requests get up to 5 s to be answered
        if agent.inflight == 0:
            break
        await asyncio.sleep(0.01)
    async with agent.guard_lock:  # a mount under way finishes first, then goes too
        for path in list(agent.guards):
            if agent.fd_store and agent.notifier.enabled:
                await agent._store_guard(path)
            else:
                await agent._release_guard(path)
        for b in agent.bundles.values():  # not taken over: they stay where they were
            b.close()
    if agent.audit is not None:
        agent._audit_system("agent", "takakryptd stopped")
        agent.audit.close(timeout=5)
    if agent.keys is not None:
        agent.keys.close()
    if agent.metrics is not None:
        agent.metrics.close()
    if agent.pidfile is not None:
        agent.pidfile.release()
    agent.notifier.close()


def _daemonize() -> int:
    """Fork into the background.  The caller stays until the daemon reports (through
    the returned pipe, see :func:`_report`) that it is ready, or why it is not, and
    exits with that status: a failed start never looks like a successful one."""
    r, w = os.pipe()
    if os.fork() > 0:
        os.close(w)
        os._exit(_await_daemon(r))
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    fd = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(fd, target)
    if fd > 2:
        os.close(fd)
    return w


def _await_daemon(fd: int) -> int:
    data = b""
    while chunk := os.read(fd, 4096):
        data += chunk
    status, _, message = data.decode(errors="replace").partition(" ")
    if not status.isdigit():
        status, message = "1", ("takakryptd ended during start-up without a word "
                                "(see the system log)")
    if message:
        print(f"takakryptd: {message}", file=sys.stderr)
    return int(status)


def _report(parent: list[int], status: int, message: str = "") -> None:
    """Tell the waiting parent of a background start how it went (the first report
    only: ``parent`` holds the pipe until then)."""
    if not parent:
        return
    fd = parent.pop()
    with contextlib.suppress(OSError):
        os.write(fd, f"{status} {message}".encode())
    os.close(fd)


def _setup_logging(level: str, foreground: bool) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    if foreground or not os.path.exists("/dev/log"):
        h: logging.Handler = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s takakryptd[%(process)d] %(levelname)s "
                                         "%(message)s"))
    else:
        from logging.handlers import SysLogHandler

        h = SysLogHandler(address="/dev/log", facility=SysLogHandler.LOG_DAEMON)
        h.setFormatter(logging.Formatter("takakryptd[%(process)d]: %(message)s"))
    root.addHandler(h)
    root.setLevel(level.upper())


def build_parser() -> argparse.ArgumentParser:
    from ..cli import _exit_table, _Formatter

    p = argparse.ArgumentParser(
        prog="takakryptd", formatter_class=_Formatter,
        description="The Takakrypt agent: decides every access to guard points by policy, "
                    "hands keys to the data path, writes the audit trail.\n\n"
                    "Signals: SIGHUP reloads the configuration (a bad one is rejected and the "
                    "running one kept), SIGTERM/SIGINT stop gracefully.\n"
                    "Under systemd (Type=notify) it reports READY=1 and pings the watchdog.",
        epilog=_exit_table())
    p.add_argument("--config", default=DEFAULT_CONFIG, metavar="FILE",
                   help=f"configuration file (default {DEFAULT_CONFIG})")
    p.add_argument("--foreground", action="store_true",
                   help="do not fork into the background; log to stderr")
    p.add_argument("--pid-file", metavar="PATH", help="override agent.pid_file")
    p.add_argument("--fd-store", action="store_true",
                   help="under systemd with FileDescriptorStoreMax=: at stop, hand every "
                   "guard point's FUSE connection to the service manager's fd store "
                   "instead of unmounting; the next start takes them over (implied when "
                   "systemd sets $FDSTORE)")
    p.add_argument("--upgrade", action="store_true",
                   help="take the guard points over from the running takakryptd (same "
                   "configuration), which then exits: a restart that never unmounts")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    from ..cli import harden_process

    args = build_parser().parse_args(argv)
    harden_process()
    # the daemon works from "/": paths given relative to here must not change meaning
    args.config = os.path.abspath(args.config)
    if args.pid_file:
        args.pid_file = os.path.abspath(args.pid_file)
    from . import handover

    # connections a previous takakryptd left in systemd's fd store (before anything
    # else takes fd numbers); then the keys are not looked up here: a key backend that
    # cannot be opened must not leave them unserved (run() denies every access instead)
    bundles, problems = handover.bundles_from_store(handover.listen_fds())
    outages: list[str] = []  # the key backend down (or hung) at this check: not asked again
    checked = time.monotonic()
    try:
        agent_cfg = load_config(args.config, check_keys=not (bundles or args.upgrade),
                                outage_ok=True, outages=outages)
    except ConfigError as e:
        for line in getattr(e, "all", None) or [str(e)]:
            print(f"takakryptd: error: {line}", file=sys.stderr)
        return e.exit_code
    parent: list[int] = []  # the pipe to the waiting parent of a background start
    if not args.foreground and not os.environ.get("NOTIFY_SOCKET"):
        parent.append(_daemonize())
    _setup_logging(agent_cfg.agent.log_level, args.foreground or bool(os.environ.get(
        "NOTIFY_SOCKET")))
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency
        runner = asyncio.run
    try:
        agent = Agent(args.config)
        agent.fd_store = args.fd_store or os.environ.get("FDSTORE", "0") not in ("", "0")
        for why in problems:
            log.error("%s: dropped from the fd store", why)
        for path in [p for p in bundles if p.startswith("?")]:
            handover.remove(agent.notifier.send_fds, bundles.pop(path).names)
        agent.bundles, agent.from_store = bundles, bool(bundles)
        if outages:
            agent.start_outage = (outages[0], time.monotonic() - checked)

        async def _main() -> int:
            return await run(agent, pid_file=args.pid_file,
                             ready=lambda: _report(parent, 0), upgrade=args.upgrade)

        rc = int(runner(_main()))
        _report(parent, rc or 1, "error: stopped by a signal during start-up")
        return rc
    except Error as e:
        log.error("%s", e)
        print(f"takakryptd: error: {e}", file=sys.stderr)
        _report(parent, e.exit_code, f"error: {e}")
        return e.exit_code
    except KeyboardInterrupt:
        _report(parent, 130, "interrupted during start-up")
        return 130
    except Exception as e:  # noqa: BLE001 - one line, not a traceback; details in the log
        log.debug("unexpected error", exc_info=True)
        print(f"takakryptd: error: unexpected {type(e).__name__}: {e}", file=sys.stderr)
        _report(parent, 1, f"error: unexpected {type(e).__name__}: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""The guard point server of a benchmark (a child process of the runner, in its own
session so a Ctrl-C on the terminal reaches the runner, which stops the workloads first
and then this server):

    python -m takakrypt.bench.serve SPEC.json

SPEC: ``mountpoint``, ``backing``, ``key_file`` (32 raw bytes), ``threads`` and
``policy_yaml`` (a configuration whose policy ``bench`` decides; null: allow-all).
Prints ``ready`` once the mount is live; SIGTERM or SIGINT unmounts and exits.
"""

from __future__ import annotations

import json
import signal
import sys

from ..sigflags import SignalFlags


def main(argv: list[str]) -> int:
    from .. import guard
    from ..cli import harden_process

    harden_process()  # no core file, no ptrace: this process holds the key
    with open(argv[0]) as f:
        spec = json.load(f)
    with open(spec["key_file"], "rb") as f:
        key = f.read()
    if len(key) != 32:
        print("takakrypt.bench.serve: the key file must hold 32 bytes", file=sys.stderr)
        return 2
    if spec.get("policy_yaml"):
        from .. import config
        from ..policy import Engine

        engine = Engine(config.loads(spec["policy_yaml"], source="bench policy"))
        decide = guard.policy_decider(engine, "bench")
        hints = (*engine.metadata_hints("bench"), engine.process_free("bench"))
    else:
        decide = guard.allow_all
        hints = (True, True, True)
    gp = guard.GuardPoint(spec["mountpoint"], backing=spec["backing"], key_name="bench",
                          get_key=lambda name, version: key, decide=decide,
                          threads=int(spec.get("threads", 4)),
                          # what a guard point of takakryptd makes by default
                          format_version=int(spec.get("format", 2)))
    gp.set_policy_hints(*hints)
    sigs = SignalFlags(signal.SIGTERM, signal.SIGINT)
    try:
        gp.mount()
    except guard.GuardError as e:
        print(f"takakrypt.bench.serve: {e}", file=sys.stderr)
        return 1
    print("ready", flush=True)
    try:
        while not sigs.seen(signal.SIGTERM, signal.SIGINT):
            sigs.sleep()
            if not gp.is_mounted:
                break
    finally:
        gp.unmount()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

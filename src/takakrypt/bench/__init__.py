"""``takakrypt bench``: the workloads a user cares about, on their own disk, over native
and over takakrypt guard points, in interleaved rounds; medians, spread and ratios to
native measured in the same run (docs/benchmarking.md).

Split by responsibility:

* :mod:`.machine`   what the figures were measured on (CPU, kernel, file system, commit)
* :mod:`.targets`   where a workload runs: the native directory, guard points served by
  a child process (:mod:`.serve`) under a realistic policy or allow-all, the kernel
  engine's detection; the throwaway key
* :mod:`.workloads` the workloads (dd, tar, ls -lR, rm -rf, fio, pgbench)
* :mod:`.runner`    rounds, statistics, progress, clean-up on every exit (Ctrl-C too)
* :mod:`.report`    the text table, the JSON document, ``--compare``
* :mod:`.html`      the self-contained HTML report (inline SVG)
"""

#: the JSON document's ``schema`` field; bump on incompatible changes
SCHEMA = "takakrypt-bench/1"

"""The guard point behaviour of tests/test_agent_guard.py, the same test functions, run
here against the kernel engine: TAKAKRYPT_IN_VM=1 makes ``kernel`` the only parameter of
their ``engine`` fixture, so takakryptd mounts takakryptfs in place of FUSE (the module
is loaded by this directory's conftest).  Access matrix (the application, a symlink to
it, a copy of it elsewhere, root's shell, nobody), tar's raw view and restore, rename
and link, learn mode, time sets, reload."""

from test_agent_guard import (  # noqa: F401  (fixtures and tests collected from here)
    engine,
    served,
    test_access_matrix,
    test_learn_mode_permits_and_audits_would_be_denials,
    test_reload_voids_cached_permits_and_moves_guard_points,
    test_rename_and_link_are_decided_by_the_agent,
    test_tar_backs_up_ciphertext_and_restores,
    test_time_sets_decide_by_the_clock,
)

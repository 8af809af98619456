"""Configuration decoding: errors name path and line; fuzzed input never crashes."""

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from takakrypt import config
from takakrypt.errors import ConfigError

GOOD = """\
version: 1
agent:
  control_socket: /run/takakrypt/control.sock
  cache: {ttl_seconds: 10, max_entries: 1000}
keys:
  backend: local
  local: {path: /var/lib/takakrypt/keystore.json}
user_sets:
  dba: {users: [postgres, 1001], groups: [dba]}
process_sets:
  pg: {executables: ["/usr/lib/postgresql/*/bin/postgres"], databases: [postgres]}
resource_sets:
  data: {paths: ["base/**", "global"], subdirectories: true}
time_sets:
  office: {days: [mon, tue, wed, thu, fri], start: "08:00", end: "18:00", timezone: Europe/Berlin}
policies:
  pgdata:
    learn_mode: false
    rules:
      - {user_set: dba, process_set: pg, actions: [all_ops], effects: [permit, apply_key]}
      - {user_set: "!dba", time_set: office, actions: [read_ops], effects: [permit, audit]}
      - {actions: [all_ops], effects: [deny, audit]}
guard_points:
  - {path: /var/lib/postgresql/15/main, policy: pgdata, key: pgkey}
"""


def test_good_config_decodes():
    cfg = config.loads(GOOD, source="good.yaml")
    assert cfg.agent.cache.ttl_seconds == 10
    assert cfg.user_sets["dba"].users == ["postgres", 1001]
    assert cfg.policies["pgdata"].rules[1].user_set == "!dba"
    assert cfg.guard_points[0].backing is None
    assert cfg.guard_points[0].metadata_cache == 1.0
    assert cfg.guard_points[0].format == 2  # per-block key versions by default
    assert cfg.agent.state_dir == "/var/lib/takakrypt"
    assert config.expand_actions(["read_ops"]) == {"read", "getattr", "list", "getxattr"}


def _err(text):
    with pytest.raises(ConfigError) as ei:
        config.loads(text, source="c.yaml")
    return ei.value


@pytest.mark.parametrize("old,new,expect", [
    ("effects: [permit, apply_key]}", "effects: [alow]}",
     "c.yaml:20: $.policies.pgdata.rules[0].effects[0]: unknown effect 'alow'"),
    ("actions: [read_ops]", "actions: [reed]",
     "c.yaml:21: $.policies.pgdata.rules[1].actions[0]: unknown action 'reed'"),
    ("user_set: dba, process_set", "user_set: dbx, process_set",
     "c.yaml:20: $.policies.pgdata.rules[0].user_set: unknown user set 'dbx'"),
    ("policy: pgdata, key", "policy: nope, key",
     "c.yaml:24: $.guard_points[0].policy: unknown policy 'nope'"),
    ("start: \"08:00\"", "start: \"8am\"", "c.yaml:15: $.time_sets.office.start: expected HH:MM"),
    ("timezone: Europe/Berlin", "timezone: Mars/Olympus",
     "c.yaml:15: $.time_sets.office.timezone: unknown timezone 'Mars/Olympus'"),
    ("ttl_seconds: 10,", "ttl_seconds: ten,",
     "c.yaml:4: $.agent.cache.ttl_seconds: expected `float`, got `str`"),
    ("  control_socket:", "  control_sockets:", "c.yaml:3: $.agent.control_sockets: unknown field"),
    ("databases: [postgres]", "databases: [postgress]",
     "c.yaml:11: $.process_sets.pg.databases[0]: unknown database type 'postgress'"),
    ("paths: [\"base/**\"", "paths: [\"/abs/**\"",
     "c.yaml:13: $.resource_sets.data.paths[0]: paths are relative to the guard point"),
    ("effects: [deny, audit]", "effects: [deny, apply_key]",
     "c.yaml:22: $.policies.pgdata.rules[2].effects: apply_key only goes with permit"),
    ("effects: [deny, audit]", "effects: [permit, deny]",
     "c.yaml:22: $.policies.pgdata.rules[2].effects: a rule needs exactly one of permit or deny"),
    ("path: /var/lib/postgresql/15/main", "path: relative/dir",
     "c.yaml:24: $.guard_points[0].path: guard point path must be absolute"),
    ("key: pgkey}", "key: pgkey, metadata_cache: 90}",
     "c.yaml:24: $.guard_points[0].metadata_cache: must be between 0 and 60 seconds"),
    ("key: pgkey}", "key: pgkey, format: 3}",
     "c.yaml:24: $.guard_points[0].format: must be 1 or 2"),
    ("  control_socket: /run/takakrypt/control.sock",
     "  control_socket: /run/takakrypt/control.sock\n  state_dir: var/lib/takakrypt",
     "c.yaml:4: $.agent.state_dir: must be an absolute path"),
])
def test_errors_name_path_and_line(old, new, expect):
    assert old in GOOD
    e = _err(GOOD.replace(old, new, 1))
    assert str(e).startswith(expect), str(e)
    assert e.exit_code == 3


def test_all_errors_are_reported():
    bad = GOOD.replace("effects: [permit, apply_key]}", "effects: [alow]}").replace(
        "actions: [read_ops]", "actions: [reed]")
    e = _err(bad)
    assert len(e.all) >= 3 and "(and" in str(e)


def test_yaml_syntax_error_has_line():
    e = _err("policies:\n  p:\n    rules: [\n")
    assert str(e).startswith("c.yaml:4: invalid YAML")


def test_duplicate_keys_rejected():
    e = _err("user_sets:\n  a: {users: [1]}\n  a: {users: [2]}\n")
    assert "duplicate key 'a'" in str(e)


def test_billion_laughs_is_bounded():
    doc = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, 9):
        doc += f"{chr(97 + i)}: &{chr(97 + i)} [*{chr(96 + i)}, *{chr(96 + i)}, *{chr(96 + i)}, " \
               f"*{chr(96 + i)}, *{chr(96 + i)}, *{chr(96 + i)}, *{chr(96 + i)}, *{chr(96 + i)}]\n"
    e = _err(doc)
    assert "too large" in str(e)


def test_empty_and_non_mapping():
    assert "empty" in str(_err(""))
    assert "must be a mapping" in str(_err("- 1\n- 2\n"))


@given(st.text(max_size=300))
def test_fuzz_random_text(text):
    try:
        config.loads(text)
    except ConfigError:
        pass


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 2**40), st.floats(allow_nan=False),
                     st.text(max_size=12))
_values = st.recursive(_scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                     st.dictionaries(st.text(max_size=8), c,
                                                                     max_size=4)), max_leaves=20)


@given(st.sampled_from(["user_sets", "process_sets", "resource_sets", "time_sets", "policies",
                        "guard_points", "agent", "keys", "audit", "version", "bogus"]), _values)
def test_fuzz_structured(section, value):
    base = yaml.safe_load(GOOD)
    base[section] = value
    try:
        config.loads(yaml.safe_dump(base))
    except ConfigError:
        pass


@given(st.integers(0, len(GOOD) - 1), st.text(max_size=5))
def test_fuzz_mutations(pos, insert):
    try:
        config.loads(GOOD[:pos] + insert + GOOD[pos + 1:])
    except ConfigError:
        pass


def test_docs_policy_examples_are_valid():
    """Every complete example in docs/policy.md passes validation."""
    import re
    from pathlib import Path
    text = (Path(__file__).parents[1] / "docs" / "policy.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "guard_points:" in b
              and "policies:" in b]
    assert len(blocks) >= 3
    for b in blocks:
        cfg = config.loads(b, source="docs/policy.md")
        assert cfg.guard_points and cfg.policies


def test_packaged_example_config_is_valid():
    from pathlib import Path
    cfg = config.load(str(Path(__file__).parents[1] / "packaging" / "takakrypt.yaml.example"))
    assert cfg.guard_points[0].policy == "pgdata"


def test_unit_file_is_type_notify_with_watchdog():
    import configparser
    from pathlib import Path
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read(Path(__file__).parents[1] / "packaging" / "takakryptd.service")
    svc = cp["Service"]
    assert svc["Type"] == "notify" and svc["WatchdogSec"] and "--foreground" in svc["ExecStart"]
    assert svc["ExecReload"].endswith("-HUP $MAINPID") and svc["LimitCORE"] == "0"

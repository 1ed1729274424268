"""Config loading: defaults, merging, and errors that name file, line and key."""
import os
import stat

import pytest

from zevents import config


def write(tmp_path, text, name="zevents.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_embedded_default_is_valid_and_complete():
    cfg = config.load(text="")
    assert cfg.get("bus", "replay_ring") >= 100000
    assert cfg.get("printer", "port") == "VIRTUAL"
    assert cfg.get("events", "subscriptions") == []
    assert cfg.get("parser", "blocked_commands") == ["M0", "M1"]


def test_user_file_merges_over_default(tmp_path):
    cfg = config.load(write(tmp_path, "bus:\n  node: farm-1\n  heartbeat: 0.5\n"))
    assert cfg.node == "farm-1"
    assert cfg.bus.heartbeat == 0.5
    assert cfg.bus.replay_ring == 100000


def test_default_endpoints_are_ipc_in_a_private_runtime_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    bus = config.load(text="bus: {node: n9}").bus
    for endpoint in (bus.publish, bus.ingest, bus.replay):
        assert endpoint.startswith(f"ipc://{tmp_path}/zevents/n9/")
    mode = stat.S_IMODE((tmp_path / "zevents").stat().st_mode)
    assert mode == 0o700


def test_runtime_dir_permissions_are_tightened(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    (tmp_path / "zevents").mkdir(mode=0o777)
    os.chmod(tmp_path / "zevents", 0o777)
    config.runtime_dir()
    assert stat.S_IMODE((tmp_path / "zevents").stat().st_mode) == 0o700


def test_every_problem_is_reported_with_file_line_and_key(tmp_path):
    path = write(tmp_path, "bus:\n  nodee: x\n  heartbeat: fast\nprinter:\n  virtual:\n    tools: two\nfoo: 1\n")
    problems = [str(p) for p in config.check(path)]
    assert f"{path}:2: bus.nodee: unknown key (did you mean 'node'?)" in problems
    assert f"{path}:3: bus.heartbeat: must be a number, not 'fast'" in problems
    assert f"{path}:6: printer.virtual.tools: must be an integer or null, not 'two'" in problems
    assert any(p.startswith(f"{path}:7: foo: unknown key") for p in problems)
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert err.value.line == 2 and err.value.key == "bus.nodee"


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "bus:\n  node: [a\nprinter: {}\n")
    problems = config.check(path)
    assert len(problems) == 1 and problems[0].file == str(path) and problems[0].line in (2, 3)
    assert "not valid YAML" in str(problems[0])


def test_wrong_top_level_and_missing_file(tmp_path):
    assert "top level must be a mapping" in str(config.check(write(tmp_path, "- a\n- b\n"))[0])
    with pytest.raises(config.ConfigError, match="no such file"):
        config.load(tmp_path / "absent.yaml")


def test_bool_is_not_an_integer(tmp_path):
    problems = config.check(write(tmp_path, "bus:\n  replay_ring: true\n"))
    assert problems and problems[0].key == "bus.replay_ring"


def test_config_check_command(tmp_path, zevents_cmd):
    import subprocess

    bad = write(tmp_path, "bus:\n  nodee: x\n")
    result = subprocess.run(zevents_cmd + ["config", "check", str(bad)], capture_output=True, text=True)
    assert result.returncode == 1
    assert f"{bad}:2: bus.nodee: unknown key" in result.stderr
    good = write(tmp_path, "bus:\n  node: x\n", "good.yaml")
    result = subprocess.run(zevents_cmd + ["config", "check", str(good)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- hostile and sloppy YAML: limits, duplicate keys, tags -----------------------------------------------------

BOMB = "".join(f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))
BOMB = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + BOMB


def check_limited(path, zevents_cmd, memory=1 << 30):
    """`zevents config check` in a process that may not grow beyond `memory` bytes of address space."""
    import resource
    import subprocess

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return subprocess.run(zevents_cmd + ["config", "check", str(path)], capture_output=True, text=True,
                          preexec_fn=limit, timeout=120)


def test_duplicate_key_is_an_error_naming_both_lines(tmp_path):
    path = write(tmp_path, "bus:\n  node: a\n  heartbeat: 2\n  node: b\n")
    problems = config.check(path)
    assert len(problems) == 1
    assert problems[0].line == 4 and problems[0].key == "bus.node"
    assert "duplicate key 'node' (first on line 2)" in str(problems[0])
    top = config.check(write(tmp_path, "bus: {}\nprinter: {}\nbus: {}\n", "top.yaml"))
    assert top and top[0].line == 3 and top[0].key == "bus"


def test_yaml_bomb_is_refused_with_bounded_memory(tmp_path, zevents_cmd):
    path = write(tmp_path, BOMB)
    assert len(BOMB) < 500
    result = check_limited(path, zevents_cmd)
    assert result.returncode == 1, result.stderr
    assert "billion laughs" in result.stderr and f"{path}:" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("depth", [100, 5000, 200_000])
def test_deep_nesting_is_refused_with_the_limit(tmp_path, zevents_cmd, depth):
    path = write(tmp_path, "bus:\n  node: " + "[" * depth + "]" * depth + "\n")
    result = check_limited(path, zevents_cmd)
    assert result.returncode == 1
    assert f"{path}:2: nested deeper than 64 levels" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_deep_block_nesting_and_deep_aliases_are_refused(tmp_path):
    block = "".join(" " * i + f"k{i}:\n" for i in range(80)) + " " * 80 + "x: 1\n"
    assert "nested deeper than 64 levels" in str(config.check(write(tmp_path, block))[0])
    # each anchor is shallow; the alias puts it deep
    text = "x: &x " + "[" * 40 + "1" + "]" * 40 + "\ny: " + "[" * 40 + "*x" + "]" * 40 + "\n"
    problem = config.check(write(tmp_path, text, "alias.yaml"))[0]
    assert "nested deeper than 64 levels (through the alias *x)" in str(problem) and problem.line == 2


def test_oversized_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as handle:
        handle.truncate(64 * 1024 * 1024)  # sparse: costs no disk
    problems = config.check(path)
    assert len(problems) == 1
    assert "larger than the limit of 16777216 bytes" in str(problems[0])
    with pytest.raises(config.ConfigError, match="larger than the limit"):
        config.load(path)


def test_unsafe_tags_and_second_documents_are_refused(tmp_path):
    problems = config.check(write(tmp_path, "bus:\n  node: !!python/object/apply:os.system [touch x]\n"))
    assert problems[0].line == 2 and "is not allowed in a config file" in str(problems[0])
    assert not (tmp_path / "x").exists()
    problems = config.check(write(tmp_path, "bus: {}\n---\nbus: {}\n", "two.yaml"))
    assert problems[0].line == 2 and "one YAML document" in str(problems[0])


def test_anchors_merge_keys_and_tags_still_load(tmp_path):
    text = ("hooks: &h {workers: 2}\n"
            "events:\n  subscriptions:\n"
            "    - &base {event: PrintDone, type: system, command: 'true', timeout: !!float 5}\n"
            "    - <<: *base\n      event: PrintFailed\n")
    cfg = config.load(write(tmp_path, text))
    subs = cfg.get("events", "subscriptions")
    assert subs[1] == {"event": "PrintFailed", "type": "system", "command": "true", "timeout": 5.0}
    assert cfg.get("hooks", "workers") == 2
    assert cfg.line_of("events", "subscriptions", 1, "event") == 6


# --- a type and a range for every key ---------------------------------------------------------------------------

BAD_VALUES = [
    ("bus:\n  heartbeat: 0\n", "bus.heartbeat", "must be between 0.01 and 3600, not 0"),
    ("bus:\n  heartbeat: .nan\n", "bus.heartbeat", "must be a number, not NaN"),
    ("bus:\n  heartbeat: .inf\n", "bus.heartbeat", "must be a finite number, not inf"),
    ("bus:\n  heartbeat: -1\n", "bus.heartbeat", "between 0.01 and 3600"),
    ("bus:\n  replay_ring: -1\n", "bus.replay_ring", "between 1 and"),
    ("bus:\n  replay_ring: 0\n", "bus.replay_ring", "between 1 and"),
    ("bus:\n  hwm: -1\n", "bus.hwm", "between 0 and"),
    ("bus:\n  max_payload: -1\n", "bus.max_payload", "between 1 and"),
    ("bus:\n  max_payload: 0\n", "bus.max_payload", "between 1 and"),
    ("bus:\n  node: ../etc\n", "bus.node", "letters, digits"),
    ("bus:\n  node: ''\n", "bus.node", "letters, digits"),
    ("bus:\n  publish: garbage://x\n", "bus.publish", "must be an ipc://PATH or tcp://HOST:PORT endpoint"),
    ("bus:\n  ingest: tcp://127.0.0.1\n", "bus.ingest", "needs a host and a port"),
    ("bus:\n  replay: tcp://127.0.0.1:99999\n", "bus.replay", "the port must be a number from 1 to 65535"),
    ("bus:\n  replay: 'ipc://'\n", "bus.replay", "has no socket path"),
    ("bus:\n  publish: ipc:///tmp/" + "x" * 120 + "\n", "bus.publish", "at most 107 fit"),
    ("printer:\n  timeout: -5\n", "printer.timeout", "must be > 0 and at most 3600, not -5"),
    ("printer:\n  timeout: 0\n", "printer.timeout", "must be > 0"),
    ("printer:\n  timeout: .nan\n", "printer.timeout", "NaN"),
    ("printer:\n  window: 0\n", "printer.window", "between 1 and 64, not 0"),
    ("printer:\n  retries: -1\n", "printer.retries", "between 0 and 100"),
    ("printer:\n  baudrate: -9600\n", "printer.baudrate", "between 0 and 4000000"),
    ("printer:\n  baudrate: 7\n", "printer.baudrate", "0 (auto) or a serial speed"),
    ("printer:\n  commands: 'printer.sock'\n", "printer.commands", "ipc://PATH or tcp://HOST:PORT"),
    ("printer:\n  name: a/b\n", "printer.name", "without '/'"),
    ("printer:\n  port: ''\n", "printer.port", "VIRTUAL, AUTO"),
    ("printer:\n  virtual:\n    speed: -1\n", "printer.virtual.speed", "between 0 and 1000000"),
    ("printer:\n  virtual:\n    tools: 0\n", "printer.virtual.tools", "between 1 and 8"),
    ("printer:\n  virtual:\n    firmware: marlyn\n", "printer.virtual.firmware", "must be one of marlin"),
    ("printer:\n  scripts:\n    afterPrintDone: [M104 S0]\n", "printer.scripts.afterPrintDone",
     "a script is G-code text"),
    ("parser:\n  blocked_commands: [hello]\n", "parser.blocked_commands.0", "not a G-code command name: 'hello'"),
    ("parser:\n  ignored_commands:\n    - M104\n    - 7\n", "parser.ignored_commands.1",
     "not a G-code command name: 7"),
    ("hooks:\n  workers: 0\n", "hooks.workers", "between 1 and 256"),
    ("hooks:\n  timeout: .inf\n", "hooks.timeout", "must be a finite number"),
    ("hooks:\n  timeout: -.inf\n", "hooks.timeout", "must be a finite number"),
    ("hooks:\n  max_queued: 0\n", "hooks.max_queued", "between 1 and"),
    ("events:\n  enabled: 1\n", "events.enabled", "must be true/false"),
    ("events:\n  subscriptions: {}\n", "events.subscriptions", "must be a list"),
    ("data_dir: ''\n", "data_dir", "must be a directory path"),
    ("data_dir: 5\n", "data_dir", "must be a string or null"),
]


@pytest.mark.parametrize("text, key, message", BAD_VALUES, ids=[f"{k}:{t.split(':')[-1].strip()[:20]}"
                                                               for t, k, _ in BAD_VALUES])
def test_every_key_has_a_type_and_range(tmp_path, text, key, message):
    path = write(tmp_path, text)
    problems = config.check(path)
    assert len(problems) == 1, problems
    assert problems[0].key == key and problems[0].file == str(path) and problems[0].line == text.count("\n")
    assert message in str(problems[0])
    with pytest.raises(config.ConfigError):  # and at start: every service loads its config through load()
        config.load(path)


def test_every_schema_key_is_ruled():
    """No key is left with a bare type where a range means something: every number and endpoint has a Key."""
    config._register_builtin_validators()

    def walk(schema, path=()):
        for key, rule in schema.items():
            if isinstance(rule, dict):
                yield from walk(rule, path + (key,))
            else:
                yield path + (key,), rule

    for path, rule in walk({k: v if isinstance(v, dict) else {"": v} for k, v in config.SCHEMA.items()}):
        types = rule.types if isinstance(rule, config.Key) else rule
        types = types if isinstance(types, tuple) else (types,)
        # true/false has nothing to range; a free-form mapping (plugins:) or the hook list is checked whole by its
        # section's validator
        if bool in types or types == (dict,) or list in types and path[-1] == "subscriptions":
            continue
        assert isinstance(rule, config.Key) and (rule.check or rule.min is not None or rule.above is not None
                                                 or rule.choices), f"{'.'.join(path)} has no range or check"


GOOD_VALUES = ["bus:\n  publish: tcp://*:5555\n  ingest: 'tcp://[::1]:5556'\n  replay: ipc:///tmp/x/c.sock\n"
               "  hwm: 0\n  heartbeat: 0.2\n  node: farm-1.lab_2\n",
               "printer:\n  baudrate: 0\n  timeout: 0.5\n  name: Prusa MK4 1\n",
               "printer:\n  virtual: {firmware: Klipper, speed: 0.5, tools: 8}\n"
               "  scripts: {afterPrintDone: 'M104 S0'}\n",
               "parser:\n  blocked_commands: [M0, g29.1, T1]\n",
               "hooks: {timeout: 0.5, workers: 256}\ndata_dir: ~/zevents\n"]


@pytest.mark.parametrize("text", GOOD_VALUES)
def test_sensible_values_pass(tmp_path, text):
    assert config.check(write(tmp_path, text)) == []


def test_without_libyaml_the_pure_parser_gives_the_same_answers(tmp_path, monkeypatch):
    import yaml

    from zevents import safe_yaml

    monkeypatch.setattr(safe_yaml, "_Loader", yaml.SafeLoader)
    assert config.check(write(tmp_path, "bus:\n  node: a\n  node: b\n"))[0].line == 3
    assert "nested deeper than 64" in str(config.check(write(tmp_path, "a: " + "[" * 5000 + "]" * 5000, "d.yaml"))[0])
    assert "billion laughs" in str(config.check(write(tmp_path, BOMB, "bomb.yaml"))[0])
    test_anchors_merge_keys_and_tags_still_load(tmp_path)

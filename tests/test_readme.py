"""What a newcomer copies: every YAML block of README.md and every config in deploy/ must pass `zevents config
check`, and the commands in deploy/zevents.service's comments must look where the service really keeps things."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO

README = REPO / "README.md"
DEPLOY = REPO / "deploy"


def yaml_blocks(markdown: str) -> list:
    """(line, text) of each ```yaml fenced block."""
    return [(markdown[:m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(r"^```ya?ml\n(.*?)^```", markdown, re.M | re.S)]


def config_check(path):
    return subprocess.run([sys.executable, "-P", "-m", "zevents", "config", "check", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_yaml_blocks_are_found():
    blocks = yaml_blocks("x\n```yaml\na: 1\n```\n```python\nb\n```\n```yml\nc: 2\n```\n")
    assert blocks == [(3, "a: 1\n"), (9, "c: 2\n")]


@pytest.mark.parametrize("line,block", yaml_blocks(README.read_text()) if README.exists() else [])
def test_every_readme_yaml_block_passes_config_check(line, block, tmp_path):
    path = tmp_path / f"README.md-line-{line}.yaml"
    path.write_text(block)
    result = config_check(path)
    assert result.returncode == 0, f"README.md's YAML block at line {line}:\n{result.stderr}"


def test_readme_has_yaml_blocks():
    assert len(yaml_blocks(README.read_text())) >= 1


@pytest.mark.parametrize("path", sorted(DEPLOY.glob("*.yaml")), ids=lambda p: p.name)
def test_every_deploy_config_passes_config_check(path):
    result = config_check(path)
    assert result.returncode == 0, result.stderr


def test_the_deploy_hook_is_one_command_not_one_per_argument():
    from zevents import config as zconfig

    subscriptions = zconfig.load(DEPLOY / "zevents.yaml").get("events", "subscriptions")
    system = [s for s in subscriptions if s.get("type", "system") == "system"]
    assert system and all(isinstance(s["command"], str) for s in system)


def test_the_service_file_status_command_looks_where_the_service_runs():
    """The unit sets XDG_RUNTIME_DIR and the config; the `zevents status` in its comments must use the same
    ones, or it reports "no supervisor running" beside a running node."""
    unit = (DEPLOY / "zevents.service").read_text()
    environment = dict(item.split("=", 1) for item in
                       shlex.split(re.search(r"^Environment=(.*)$", unit, re.M).group(1)))
    exec_start = shlex.split(re.search(r"^ExecStart=(.*)$", unit, re.M).group(1))
    config = exec_start[exec_start.index("-c") + 1]
    status_line = next(line for line in unit.splitlines() if line.startswith("#") and " status" in line)
    command = shlex.split(status_line[status_line.index("sudo -u"):])
    assert command[:3] == ["sudo", "-u", "zevents"]
    env = dict(item.split("=", 1) for item in command[3:] if "=" in item and not item.startswith("-"))
    assert env.get("XDG_RUNTIME_DIR") == environment["XDG_RUNTIME_DIR"]
    rest = [item for item in command[3:] if item.split("=", 1)[0] not in env]
    assert rest[0] == exec_start[0].replace(" run", "") and rest[1] == "status"
    assert rest[rest.index("-c") + 1] == config


def test_the_hook_environment_variables_the_readme_names_are_the_real_ones(tmp_path):
    """README's hooks section names each variable; a real hook run (`env`) must see every one of them."""
    text = README.read_text()
    section = text[text.index("## Event hooks"):]
    section = section[:section.index("\n## ", 1)]
    documented = set(re.findall(r"`(ZEVENTS_[A-Z_]+)`", section)) - {"ZEVENTS_PAYLOAD_"}
    assert {"ZEVENTS_EVENT", "ZEVENTS_FILENAME", "ZEVENTS_PAYLOAD", "ZEVENTS_PAYLOAD_NAME"} <= documented
    config = tmp_path / "env.yaml"
    config.write_text("events:\n  subscriptions:\n    - event: PrintDone\n      command: env\n      type: system\n")
    result = subprocess.run([sys.executable, "-P", "-m", "zevents", "hooks", "test", "PrintDone", "--run",
                             "--payload", '{"name": "a.gcode", "time": 3.5}', "-c", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    seen = set(re.findall(r"^(ZEVENTS_[A-Z_]+)=", result.stdout, re.M))
    assert documented <= seen, f"documented but not set: {documented - seen}"

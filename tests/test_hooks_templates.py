"""Hook templates and subscription checks: values reach commands exactly, through a real /bin/sh when ``shell: true``,
and every mistake in a subscription is named."""
from __future__ import annotations

import os
import subprocess

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from zevents import config as zconfig
from zevents import placeholders as ph
from zevents.hooks import runner as hook_runner, subscriptions as hook_subscriptions

NASTY = ["x'; touch pwned; '.gcode", "$(touch pwned).gcode", "`touch pwned`", 'a"b\\"c', "two\nlines", "*", "~",
         "$HOME", "-n", "", " lead and trail ", "a\\", "'", '"', "{}", "$((1+1))", "!event"]


def values(**payload):
    return ph.Values("PrintDone", payload)


def run_sh(template: ph.Template, vals, cwd) -> list:
    script = template.render(vals)
    out = subprocess.run(["/bin/sh", "-c", script], capture_output=True, cwd=cwd, check=True).stdout
    return out.decode().split("\0")[:-1]


@pytest.mark.parametrize("value", NASTY)
def test_shell_templates_quote_every_value_for_its_context(value, tmp_path):
    template = ph.compile_shell("printf '%s\\0' {v} pre{v}post \"dq {v}\" 'sq {v}' \"$(printf %s {v})\" "
                                "\"$(printf %s \"{v}\")\"")
    got = run_sh(template, values(v=value), tmp_path)
    command_substituted = value.rstrip("\n")  # $( ) and ` ` drop trailing newlines, as in any shell
    assert got == [value, f"pre{value}post", f"dq {value}", f"sq {value}", command_substituted,
                   command_substituted]
    assert list(tmp_path.iterdir()) == []


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=30))
def test_any_value_survives_a_shell_template_unchanged(tmp_path_factory, value):
    cwd = tmp_path_factory.mktemp("sh")
    template = ph.compile_shell("printf '%s\\0' {v} \"in dq {v}\" 'in sq {v}'")
    assert run_sh(template, values(v=value), cwd) == [value, f"in dq {value}", f"in sq {value}"]
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("value", NASTY)
def test_argv_templates_put_a_value_into_one_argument(value, tmp_path):
    argv = [word.render(values(v=value)) for word in ph.compile_argv("printf '%s\\0' {v} \"with {v}\" x{v}")]
    assert argv == ["printf", "%s\\0", value, f"with {value}", f"x{value}"]
    result = hook_runner.run(argv, dict(os.environ), cwd=str(tmp_path))
    assert result.ok and result.stdout.decode().split("\0")[:-1] == [value, f"with {value}", f"x{value}"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("source, why", [
    ("notify {name} | tee log", "shell syntax ('|')"),
    ("echo $HOME", "shell syntax ('$H')"),
    ("echo $(date)", "shell syntax ('$(')"),
    ("run {name} > out", "shell syntax ('>')"),
    ("a && b", "shell syntax ('&&')"),
    ("{name} --flag", "must be written out"),
    ("echo {0}", "positional placeholders are not supported"),
    ("echo {}", "positional placeholders are not supported"),
    ("echo {name", "expected '}'"),
    ("echo name}", "Single '}'"),
    ("echo {name!x}", "unknown conversion"),
    ("echo {name:{width}}", "nested placeholders"),
    ("echo 'unclosed", "cannot split"),
])
def test_argv_templates_refuse_what_they_cannot_do_safely(source, why):
    with pytest.raises(ph.TemplateError) as info:
        ph.compile_argv(source)
    assert why in str(info.value)


def test_quoted_shell_characters_are_fine_without_a_shell():
    argv = [w.render(values(name="n")) for w in ph.compile_argv("sh -c 'echo a | tr a b' \"$ {name}\" ~/x")]
    assert argv == ["sh", "-c", "echo a | tr a b", "$ n", os.path.expanduser("~/x")]


def test_here_documents_and_backquotes_cannot_take_placeholders():
    with pytest.raises(ph.TemplateError, match="here-document"):
        ph.compile_shell("cat <<EOF\n{name}\nEOF")
    for source in ("echo `echo {name}`", "echo \"`echo '{name}'`\"", "echo `echo $(echo {name})`"):
        with pytest.raises(ph.TemplateError, match="write \\$\\(...\\) instead"):
            ph.compile_shell(source)


def test_text_templates_escape_braces_and_format_values():
    template = ph.compile_text("{{x}} {__progress:.0f}% {name!r} {a.b.c} {lst[1]}")
    vals = ph.Values("E", {"name": "n", "a": {"b": {"c": 3}}, "lst": [1, 2]}, {"progress": 41.6})
    assert template.render(vals) == "{x} 42% 'n' 3 2"


# --- subscription checks ----------------------------------------------------------------------------------------

def problems_of(tmp_path, subscriptions, **sections) -> list:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"events": {"subscriptions": subscriptions}, **sections}))
    return [str(p) for p in zconfig.check(path)]


def sub(**fields):
    base = {"event": "PrintDone", "type": "system", "command": "true"}
    base.update(fields)
    return base


@pytest.mark.parametrize("event", ["Dwelling", "Dwell", "GcodeScriptAfterPrintDoneRunning", "plugin_x_PrintDon",
                                   "MyVeryOwnThing", ["PrintDone", "HookFailed", "LayerChanged"]])
def test_accepted_event_names(tmp_path, event):
    assert problems_of(tmp_path, [sub(event=event)]) == []


@pytest.mark.parametrize("fields, message", [
    ({"event": "printdone"}, "did you mean 'PrintDone'?"),
    ({"event": "GcodeScript${ScriptName}Running"}, "is a template"),
    ({"event": []}, "empty list"),
    ({"event": "print/PrintDone"}, "is not an event name"),
    ({"type": "System"}, "did you mean 'system'?"),
    ({"command": ["true", 3]}, "events.subscriptions.0.command.1: each command must be a non-empty string"),
    ({"command": []}, "empty list"),
    ({"timeout": -1}, "must be a number of seconds > 0"),
    ({"min_interval": "often"}, "must be a number of seconds between 0 and 86400"),
    ({"timeout": float("nan")}, "must be a number of seconds > 0 and at most 86400, not nan"),
    ({"timeout": float("inf")}, "must be a number of seconds > 0 and at most 86400, not inf"),
    ({"timeout": 0}, "must be a number of seconds > 0"),
    ({"min_interval": float("-inf")}, "must be a number of seconds between 0 and 86400"),
    ({"enabled": "no"}, "must be true or false"),
    ({"env": {"1BAD": "x"}}, "is not an environment variable name"),
    ({"env": {"GOOD": "{name"}}, "expected '}'"),
    ({"filter": {"origin": {"nested": 1}}}, "a payload key"),
    ({"filter": {"nope": 1}}, "the filter never matches"),
    ({"command": "echo {__filenmae}"}, "did you mean {__filename}?"),
    ({"type": "gcode", "shell": True, "command": "M117 {name}"}, "only applies to system hooks"),
    ({"cwd": "/nonexistent/dir"}, "does not exist"),
    ({"shell": True, "command": "cat <<EOF\n{name}\nEOF"}, "here-document"),
])
def test_subscription_problems_are_named_with_their_key(tmp_path, fields, message):
    found = problems_of(tmp_path, [sub(**fields)])
    assert len(found) == 1, found
    assert message in found[0]
    assert found[0].startswith(f"{tmp_path / 'config.yaml'}:")


def test_a_bad_subscription_is_reported_but_does_not_stop_loading(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"events": {"subscriptions": [sub(event="PrintDon"), sub(name="good")]}}))
    config = zconfig.load(path)  # other services load the file in spite of a bad hook
    subscriptions, problems = hook_subscriptions.compile_section(config)
    assert [s.name for s in subscriptions] == ["good"]
    assert len(problems) == 1 and problems[0].skips
    assert len(zconfig.check(path)) == 1


def test_warnings_keep_the_subscription(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"events": {"subscriptions": [sub(command="echo {nmae}")]}}))
    subscriptions, problems = hook_subscriptions.compile_section(zconfig.load(path))
    assert len(subscriptions) == 1 and not problems[0].skips


@pytest.mark.parametrize("hooks_section, message", [({"workers": 0}, "between 1 and 256"),
                                                    ({"timeout": 0}, "must be > 0"),
                                                    ({"max_queued": 0}, "between 1 and 10000000")])
def test_hooks_section_limits_are_fatal(tmp_path, hooks_section, message):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"hooks": hooks_section}))
    with pytest.raises(zconfig.ConfigError, match=message):
        zconfig.load(path)


def test_default_name_and_timeout(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"hooks": {"timeout": 7}, "events": {"subscriptions": [
        sub(event=["PrintDone", "PrintFailed"]), sub(timeout=2, name="mine")]}}))
    first, second = hook_subscriptions.compile_section(zconfig.load(path))[0]
    assert first.name == "#0 PrintDone,PrintFailed" and first.timeout == 7
    assert second.name == "mine" and second.timeout == 2


# --- spawning ---------------------------------------------------------------------------------------------------

def test_hook_processes_lead_their_own_session_with_default_signals():
    result = hook_runner.run(["sh", "-c", "cat /proc/$$/stat; grep SigIgn /proc/$$/status"], dict(os.environ))
    assert result.ok, result.stderr
    stat, ignored = result.stdout.decode().splitlines()
    pid, pgrp, session = (int(x) for x in [stat.split()[0], *stat.rsplit(")", 1)[1].split()[2:4]])
    assert pid == pgrp == session  # killpg at the timeout reaches the hook and everything it started
    sigpipe = 1 << (13 - 1)
    assert not int(ignored.split()[1], 16) & sigpipe  # Python ignores SIGPIPE; the hook must not inherit that


def test_embedded_nul_bytes_are_refused_not_cut():
    result = hook_runner.run(["echo", "a\x00b"], dict(os.environ))
    assert result.returncode == 126 and "embedded null byte" in result.error


# --- warnings of `config check`: what would fail on this machine ------------------------------------------------

DEPLOY_STYLE = """events:
  subscriptions:
    - event: PrintDone
      command: ["logger", "-t", "zevents", "print {name} done in {time} s"]
      type: system
"""


def warnings_of(tmp_path, text) -> list:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    found = zconfig.check(path, warnings=True)
    assert all(problem.warning for problem in found), found
    assert zconfig.check(path) == []  # warnings never make a file invalid
    return found


def test_an_argv_style_command_list_is_warned_about_once(tmp_path):
    found = warnings_of(tmp_path, DEPLOY_STYLE)
    assert len(found) == 1
    assert found[0].line == 4 and found[0].key == "events.subscriptions.0.command.1"
    assert "'-t' looks like an argument, but each item of a command list is a command of its own" in str(found[0])
    assert "command: logger -t zevents 'print {name} done in {time} s'" in str(found[0])


@pytest.mark.parametrize("command, warned", [
    ("no-such-program-zev {name}", "program 'no-such-program-zev' is not found on PATH"),
    ("/nonexistent/bin/tool {name}", "program '/nonexistent/bin/tool' is not an executable file here"),
    ("TMP/data.txt", "data.txt' is not an executable file here"),
    ("sh -c 'echo {name}'", None),
    (["true", "no-such-program-zev"], "program 'no-such-program-zev' is not found on PATH"),
])
def test_a_program_not_on_path_is_a_warning(tmp_path, command, warned):
    (tmp_path / "data.txt").write_text("not a program\n")
    if isinstance(command, str):
        command = command.replace("TMP", str(tmp_path))
    found = warnings_of(tmp_path, yaml.safe_dump({"events": {"subscriptions": [
        {"event": "PrintDone", "type": "system", "command": command}]}}))
    assert len(found) == (1 if warned else 0), found
    assert not found or warned in str(found[0]) and "the hook fails until it is installed" in str(found[0])


def test_path_of_the_subscription_env_is_searched(tmp_path):
    tool = tmp_path / "bin" / "my-tool"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    sub = {"event": "PrintDone", "type": "system", "command": "my-tool", "env": {"PATH": str(tool.parent)}}
    assert warnings_of(tmp_path, yaml.safe_dump({"events": {"subscriptions": [sub]}})) == []
    # a shell hook's program is /bin/sh, and G-code has none
    shell = {"event": "PrintDone", "type": "system", "shell": True, "command": "no-such-program-zev"}
    gcode = {"event": "PrintDone", "type": "gcode", "command": ["M117 -t", "-x"]}
    assert warnings_of(tmp_path, yaml.safe_dump({"events": {"subscriptions": [shell, gcode]}})) == []


def test_config_check_prints_warnings_and_passes(tmp_path, zevents_cmd):
    path = tmp_path / "deploy-style.yaml"
    path.write_text(DEPLOY_STYLE)
    result = subprocess.run(zevents_cmd + ["config", "check", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(f"warning: {path}:4: events.subscriptions.0.command.1:")
    assert result.stdout.strip() == f"{path}: OK (1 warning)"


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), 0, -1])
def test_a_timeout_that_never_kills_is_refused_before_anything_runs(tmp_path, timeout):
    with pytest.raises(ValueError, match="finite number of seconds > 0"):
        hook_runner.run(["touch", str(tmp_path / "ran")], dict(os.environ), timeout=timeout)
    with pytest.raises(ValueError, match="finite number of seconds > 0"):
        hook_runner.Commands([["true"]], {}, None, b"", timeout)
    assert not (tmp_path / "ran").exists()
    with pytest.raises(zconfig.ConfigError, match="hooks.timeout"):  # embedders get the file's ranges too
        zconfig.from_bus(zconfig.BusConfig.for_dir(tmp_path), hooks={"timeout": timeout})


# --- the fast split of plain commands ---------------------------------------------------------------------------

def _shape(argv) -> list:
    """What a compiled argv does: each word's literal parts and placeholders (their text, key path, format)."""
    return [(word.constant, word.shell_quoting, [part if isinstance(part, str) else (
        part.text, part.path, part.conversion, part.spec, part.context, part.whole_word) for part in word.parts])
        for word in argv]


def _compiled(compile_argv, source):
    try:
        return _shape(compile_argv(source))
    except ph.TemplateError as exc:
        return str(exc)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(["logger", "-t", " ", "  ", "\t", "\n", "{name}", "{__filename}", "{a.b}", "{l[0]}",
                                 "{v!r}", "{v:>4}", "{v!x}", "{0}", "{}", "{a b}", "{{", "}}", "{", "}", "~", "~/x",
                                 "x", "'", '"', "\\", "$", "|", "#", "=", "ü", "\x00", "{:d}", "{v:{w}}", "-"]),
                max_size=10).map("".join))
def test_plain_commands_split_as_the_general_path_does(source):
    """compile_argv splits a command without quotes or shell characters at its blanks and shares its words between
    hooks; the general path (marked placeholders, shlex) must give the same argv and refuse with the same words."""
    assert _compiled(ph.compile_argv, source) == _compiled(ph._compile_argv, source)


def test_plain_command_words_are_shared_and_expand_home():
    first, second = ph.compile_argv("notify {__filename} ~/log"), ph.compile_argv("notify  {__filename}\t~/log ")
    assert [w.render(values()) for w in first] == ["notify", "NO FILE", os.path.expanduser("~/log")]
    assert first[0] is second[0] and first[1] is second[1]


def test_a_backslash_before_a_placeholder(tmp_path):
    """Without a shell the backslash goes, as a shell's split drops it; in a script it would escape the quote that
    opens the value's quoting (`\\'x; rm ...'`), so it is refused.  Both once crashed `config check`."""
    assert [w.render(values(v="a b")) for w in ph.compile_argv("echo \\{v} x\\{v}")] == ["echo", "a b", "xa b"]
    for source in ("echo \\{v}", 'echo "\\{v}"'):
        with pytest.raises(ph.TemplateError, match="backslash before {v} would escape"):
            ph.compile_shell(source)
    assert run_sh(ph.compile_shell("printf '%s\\0' '\\{v}'"), values(v="x'; touch pwned; '"), tmp_path) == [
        "\\x'; touch pwned; '"]
    assert problems_of(tmp_path, [sub(command="echo \\{name}")]) == []
    problems = problems_of(tmp_path, [sub(command="echo \\{name}", shell=True)])
    assert len(problems) == 1 and ":3: events.subscriptions.0.command: command " in problems[0], problems


def test_home_is_looked_up_at_each_compile(monkeypatch, tmp_path):
    """Shared argv words do not keep a home directory: `~/x` follows HOME from one load to the next."""
    for home in ("/home/one", "/home/two"):
        monkeypatch.setenv("HOME", home)
        assert [w.render(values()) for w in ph.compile_argv("cp ~/x ~/{__filename}")] == [
            "cp", f"{home}/x", f"{home}/NO FILE"]

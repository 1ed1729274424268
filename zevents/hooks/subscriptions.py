"""The ``events:`` section: OctoPrint's ``events.subscriptions`` read, checked and compiled into subscriptions.

A subscription is OctoPrint's (``event`` a name or a list, ``command`` a string or a list, ``type`` system|gcode,
optional ``enabled``, ``name``, ``debug``, and OctoPrint's ``shell``/``cwd``) plus zevents' optional ``timeout``,
``filter``, ``min_interval``, ``env``, ``detach`` (what a run leaves running may outlive it) and
``allow_option_values`` (a placeholder filling a whole argument may begin with ``-``).

Every problem is reported with file, line and key.  Problems are *per subscription*: a bad subscription is left out
(``HookProblem.skips``) and the others run, so they never stop the node (``fatal = False`` tells
``zevents.config.load`` so); ``zevents config check`` still reports each one and fails.

Event names: catalogue names, zevents' extensions, concrete ``GcodeScript<Name>Running|Finished`` names and OctoPrint's
alias ``Dwelling`` (for ``Dwell``) are known.  Any other name is a *custom* event (plugins register those) and is
accepted, unless it looks like a typo of a known name (``events.suggest`` finds one) — then it is an error with a
"did you mean".  Custom names that deliberately resemble a catalogue name can be written OctoPrint's plugin way,
``plugin_<id>_<event>``, which is always accepted.
"""
from __future__ import annotations

import difflib
import os
import re
import shlex
import shutil
from dataclasses import dataclass, field

from zevents import events as _events
from zevents import placeholders
from zevents import config as zconfig
from zevents.config import ConfigError

KEYS = ("event", "command", "type", "enabled", "name", "debug", "shell", "cwd", "timeout", "filter", "min_interval",
        "env", "detach", "allow_option_values")
_KEY_SET = frozenset(KEYS)
TYPES = ("system", "gcode")
DEFAULT_TIMEOUT = 60.0
#: Payload keys hook result events carry beyond the catalogue's (see zevents.hooks.service).
HOOK_RESULT_EXTRAS = ("stdout", "depth", "started", "type")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_EVENT_NAME = re.compile(r"[^\s/]{1,128}\Z")
CUSTOM_PREFIX = "plugin_"


class HookProblem(ConfigError):
    """A problem in one subscription: reported by ``config check``, never fatal to loading the file."""

    fatal = False

    def __init__(self, message, file=None, line=None, key=None, skips: bool = True, warning: bool = False):
        super().__init__(message, file, line, key)
        self.skips = skips and not warning
        self.warning = warning


@dataclass(eq=False)
class Subscription:
    index: int
    name: str
    events: tuple
    type: str
    sources: tuple                    # the command strings as written
    commands: tuple                   # system: argv template lists (or shell Templates); gcode: line Templates
    enabled: bool = True
    debug: bool = False
    shell: bool = False
    cwd: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    filter: dict = field(default_factory=dict)     # key path → accepted values
    min_interval: float = 0.0
    env: dict = field(default_factory=dict)        # name → Template
    detach: bool = False               # what the run leaves running may outlive it (else killed when it ends)
    allow_option_values: bool = False  # a placeholder filling a whole argument may begin with '-'
    # Run-time state, owned by the thread that admits events (min_interval) or shared append-only (warned).
    last_admitted: float | None = None
    warned: set = field(default_factory=set)

    def matches_filter(self, payload: dict) -> bool:
        if not self.filter:
            return True
        values = placeholders.Values("", payload)
        for path, accepted in self.filter.items():
            actual = values.lookup(path)
            if actual is placeholders.MISSING:
                return False
            if not any(actual == want or str(actual) == str(want) for want in accepted):
                return False
        return True

    def describe(self) -> str:
        return f"{self.name!r} ({self.type}, on {', '.join(self.events)})"


_FLAG_DEFAULTS = (("enabled", True), ("debug", False), ("shell", False), ("detach", False),
                  ("allow_option_values", False))
_FLAG_KEYS = frozenset(key for key, _ in _FLAG_DEFAULTS)
_NO_INTERVAL = 0.0
_UNCHECKED = object()


def _problem(config, message, *keys, skips=True, warning=False) -> HookProblem:
    base = config.error(message, *keys)
    return HookProblem(base.message, base.file, base.line, base.key, skips=skips, warning=warning)


def _program_problem(program: str, env_path) -> str | None:
    """Why a hook's program would not start on this machine (not on PATH, not executable), or None."""
    path = env_path if isinstance(env_path, str) else _SERVICE_PATH
    key = (program, path)
    if key not in _program_checked:
        if "/" in program:
            found = os.path.isfile(program) and os.access(program, os.X_OK)
            why = None if found else f"program {program!r} is not an executable file here"
        else:
            why = None if shutil.which(program, path=path) else f"program {program!r} is not found on PATH"
        _program_checked[key] = why
    return _program_checked[key]


_program_checked: dict = {}
_SERVICE_PATH = os.environ.get("PATH", os.defpath)


def check_event_name(name) -> tuple[str | None, str | None]:
    """(canonical name, None) for a usable event name, or (None, why not)."""
    if name.__class__ is str:
        checked = _event_names_checked.get(name)
        if checked is None:
            checked = _check_event_name(name)
            if len(_event_names_checked) < 10_000:
                _event_names_checked[name] = checked
        return checked
    return _check_event_name(name)


_event_names_checked: dict = {}   # a large config names the same few events thousands of times


def _check_event_name(name) -> tuple[str | None, str | None]:
    if not isinstance(name, str):
        return None, f"an event name must be a string, not {name!r}"
    if not _EVENT_NAME.match(name):
        return None, f"{name!r} is not an event name (no spaces or '/', at most 128 characters)"
    if name in _events.SCRIPT_TEMPLATES:
        return None, (f"{name!r} is a template: name the script, e.g. "
                      f"{_events.script_event('afterPrintDone', name[-8:] if name.endswith('Finished') else 'Running')}")
    if _events.is_known(name):
        return _events.canonical(name), None
    if name.startswith(CUSTOM_PREFIX):
        return name, None
    near = _events.suggest(name)
    if near is not None:
        return None, (f"unknown event {name!r} (did you mean {near!r}?); a custom event that really is named so "
                      f"must be written {CUSTOM_PREFIX}<id>_<event>")
    return name, None


def _payload_keys(event_names) -> set | None:
    """Every payload key the events can carry, or None when one is custom (anything goes)."""
    names = tuple(event_names)
    if names not in _payload_keys_of:
        _payload_keys_of[names] = _collect_payload_keys(names)
    return _payload_keys_of[names]


_payload_keys_of: dict = {}


def _collect_payload_keys(event_names) -> set | None:
    keys = set()
    for name in event_names:
        spec = _events.lookup(name)
        if spec is None:
            return None
        keys.update(spec.payload)
        if spec.group == "hook":
            keys.update(HOOK_RESULT_EXTRAS)
    keys.update(k for k, target in placeholders.COMPAT_KEYS.items() if target in keys)
    return keys


def _check_keys(config, templates, known: set | None, event_names, keys_path) -> list:
    problems = []
    for template in templates:
        if template.constant is not None:
            continue
        for fld in template.fields:
            key = fld.key
            if key.startswith("__"):
                if key not in placeholders.GENERIC:
                    near = difflib.get_close_matches(key, placeholders.GENERIC, n=1)
                    hint = f" (did you mean {{{near[0]}}}?)" if near else \
                        f" (generic placeholders: {', '.join(placeholders.GENERIC)})"
                    problems.append(_problem(config, f"unknown generic placeholder {fld.text}{hint}; it would render "
                                                     "empty", *keys_path, skips=False))
            elif known is not None and key not in known:
                near = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f" (did you mean {{{near[0]}}}?)" if near else ""
                listed = ", ".join(sorted(known)) or "none"
                problems.append(_problem(
                    config, f"placeholder {fld.text}: {' / '.join(event_names)} has no payload key {key!r}{hint}; "
                            f"it would render empty (payload keys: {listed})", *keys_path, skips=False))
    return problems


def compile_subscription(config, index: int, raw, default_timeout: float, default_timeout_problem=_UNCHECKED,
                         build: bool = True) -> tuple[Subscription | None, list]:
    """One subscription and its problems; None when it has to be left out (or is not ``build``, for a check).
    ``default_timeout_problem`` is ``TIMEOUT.validate(default_timeout)`` when the caller has it (once for a whole
    section)."""
    if default_timeout_problem is _UNCHECKED:
        default_timeout_problem = TIMEOUT.validate(default_timeout)
    path = ("events", "subscriptions", index)
    problems: list = []

    def bad(message, *keys, skips=True):
        problems.append(_problem(config, message, *path, *keys, skips=skips))

    def warn(message, *keys):
        problems.append(_problem(config, message, *path, *keys, warning=True))

    if not isinstance(raw, dict):
        bad(f"a subscription must be a mapping (event:, command:, type:), not {raw!r}")
        return None, problems
    label = raw.get("name") if isinstance(raw.get("name"), str) else None
    for key in raw if not _KEY_SET.issuperset(raw) else ():
        if key not in _KEY_SET:
            near = difflib.get_close_matches(str(key), KEYS, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else f" (known: {', '.join(KEYS)})"
            bad(f"unknown key{hint}", key)

    # event
    names = []
    event = raw.get("event")
    if event is None:
        bad("missing `event` (an event name or a list of names)")
    else:
        items = event if isinstance(event, list) else [event]
        if not items:
            bad("`event` is an empty list", "event")
        for i, item in enumerate(items):
            name, why = check_event_name(item)
            if why:
                bad(why, *(("event", i) if isinstance(event, list) else ("event",)))
            elif name not in names:
                names.append(name)

    # type
    kind = raw.get("type")
    if kind is None:
        bad("missing `type`: system (run a command) or gcode (send to the printer)")
    elif kind not in TYPES:
        near = difflib.get_close_matches(str(kind).lower(), TYPES, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        bad(f"`type` must be system or gcode, not {kind!r}{hint}", "type")
        kind = None

    # flags
    flags = dict(_FLAG_DEFAULTS)
    for key, default in _FLAG_DEFAULTS if not _FLAG_KEYS.isdisjoint(raw) else ():
        value = raw.get(key, default)
        if not isinstance(value, bool):
            bad(f"must be true or false, not {value!r}", key)
            value = default
        flags[key] = value
    name = raw.get("name")
    if name is not None and not isinstance(name, str):
        bad(f"must be a string, not {name!r}", "name", skips=False)
        name = str(name)

    # numbers (the defaults are checked once per section: most subscriptions write neither)
    timeout = raw.get("timeout", default_timeout)
    if default_timeout_problem if timeout is default_timeout else TIMEOUT.validate(timeout):
        bad(f"must be a number of seconds {TIMEOUT.range_text()}, not {timeout!r}", "timeout")
    min_interval = raw.get("min_interval", _NO_INTERVAL)
    if min_interval is not _NO_INTERVAL and MIN_INTERVAL.validate(min_interval):
        bad(f"must be a number of seconds {MIN_INTERVAL.range_text()}, not {min_interval!r}", "min_interval")

    # cwd, env only make sense for system hooks
    cwd = raw.get("cwd")
    if cwd is not None:
        if not isinstance(cwd, str) or not cwd:
            bad(f"must be a directory path, not {cwd!r}", "cwd")
            cwd = None
        else:
            cwd = os.path.expanduser(cwd)
            if not os.path.isdir(cwd):
                bad(f"directory {cwd!r} does not exist (the hook will fail until it does)", "cwd", skips=False)
    env_templates = {}
    env = raw.get("env")
    if env is not None:
        if not isinstance(env, dict):
            bad(f"must be a mapping of NAME: value, not {env!r}", "env")
        else:
            for key, value in env.items():
                if not isinstance(key, str) or not _ENV_NAME.match(key):
                    bad(f"{key!r} is not an environment variable name", "env", key)
                elif isinstance(value, (dict, list)) or value is None:
                    bad(f"must be a string or a number, not {value!r}", "env", key)
                else:
                    value = str(value).lower() if isinstance(value, bool) else str(value)
                    try:
                        env_templates[key] = placeholders.compile_text(value)
                    except placeholders.TemplateError as exc:
                        bad(str(exc), "env", key)
    if kind == "gcode":
        for key in ("shell", "cwd", "env", "detach", "allow_option_values"):
            if key in raw:
                bad(f"`{key}` only applies to system hooks; ignored for gcode", key, skips=False)

    # filter
    filters = {}
    raw_filter = raw.get("filter")
    if raw_filter is not None:
        if not isinstance(raw_filter, dict) or not raw_filter:
            bad("must be a mapping of payload key → value (or list of values), e.g. {origin: local}", "filter")
        else:
            for key, want in raw_filter.items():
                accepted = want if isinstance(want, list) else [want]
                if not isinstance(key, str) or not key or any(isinstance(a, (dict, list)) for a in accepted):
                    bad(f"{key!r}: a payload key (dots for nested keys) and a value or a list of values", "filter",
                        str(key))
                    continue
                filters[tuple(key.split("."))] = tuple(accepted)

    # command
    known = _payload_keys(names)
    raw_env_path = env.get("PATH") if isinstance(env, dict) else None
    sources, commands = [], []
    command = raw.get("command")
    if command is None:
        bad("missing `command` (a string or a list of strings)")
    elif not isinstance(command, (str, list)):
        bad(f"must be a string or a list of strings, not {command!r}", "command")
    else:
        items = command if isinstance(command, list) else [command]
        if not items:
            bad("`command` is an empty list", "command")
        # A list in argv style (["logger", "-t", ...]) is OctoPrint's list of commands misread: one warning for it.
        argv_like = isinstance(command, list) and all(isinstance(i, str) for i in items) and any(
            i.lstrip().startswith("-") for i in items)
        argv_warned = False
        for i, item in enumerate(items):
            keys = ("command", i) if isinstance(command, list) else ("command",)
            if not isinstance(item, str) or not item or item.isspace():
                bad(f"each command must be a non-empty string, not {item!r}", *keys)
                continue
            try:
                if kind == "gcode":
                    compiled = [placeholders.compile_text(line) for line in item.splitlines() if line.strip()]
                elif flags["shell"]:
                    compiled = [placeholders.compile_shell(item)]
                else:
                    compiled = [placeholders.compile_argv(item)]
            except placeholders.TemplateError as exc:
                bad(f"command {item!r}: {exc}", *keys)
                continue
            sources.append(item)
            commands.extend(compiled)
            if kind == "system":
                if argv_like:
                    if item.lstrip().startswith("-") and not argv_warned:
                        argv_warned = True
                        warn(f"{item!r} looks like an argument, but each item of a command list is a command of "
                             f"its own, run in order (OctoPrint's format): write one command as one string, e.g. "
                             f"command: {shlex.join(command)}", *keys)
                elif not flags["shell"] and compiled[0][0].constant is not None:
                    why = _program_problem(compiled[0][0].constant, raw_env_path)
                    if why:
                        warn(f"{why} (the PATH `config check` sees; the service's may differ): the hook "
                             "fails until it is installed", *keys)
            templates = compiled if kind == "gcode" or flags["shell"] else compiled[0]
            problems.extend(_check_keys(config, templates, known, names, path + keys))
    if env_templates:
        problems.extend(_check_keys(config, env_templates.values(), known, names, path + ("env",)))
    if known is not None:
        for key_path in filters:
            if key_path[0] not in known:
                problems.append(_problem(config, f"{'.'.join(key_path)!r} is not a payload key of "
                                                 f"{' / '.join(names)}: the filter never matches", *path, "filter",
                                         skips=False))

    if label:
        for problem in problems:
            problem.message = f"(subscription {label!r}) {problem.message}"
    if not build or problems and any(p.skips for p in problems):
        return None, problems
    if not name:
        name = f"#{index} {','.join(names) or '?'}"
    return Subscription(index=index, name=name, events=tuple(names), type=kind, sources=tuple(sources),
                        commands=tuple(commands), enabled=flags["enabled"], debug=flags["debug"],
                        shell=flags["shell"], cwd=cwd, timeout=float(timeout), filter=filters,
                        min_interval=float(min_interval), env=env_templates, detach=flags["detach"],
                        allow_option_values=flags["allow_option_values"]), problems


def compile_section(config, build: bool = True) -> tuple[list, list]:
    """(subscriptions that can run, every problem) of a loaded config's ``events:`` section; only the problems
    when not ``build`` (a check)."""
    section = config.get("events") or {}
    raw_list = section.get("subscriptions") or []
    default_timeout = config.get("hooks", "timeout", default=DEFAULT_TIMEOUT)
    if not isinstance(raw_list, list):
        return [], []  # the schema check reports it
    _program_checked.clear()  # a reload looks again: a program may have been installed since
    _event_names_checked.clear()
    subscriptions, problems = [], []
    default_timeout_problem = TIMEOUT.validate(default_timeout)
    for index, raw in enumerate(raw_list):
        subscription, found = compile_subscription(config, index, raw, default_timeout, default_timeout_problem,
                                                   build)
        problems.extend(found)
        if subscription is not None:
            subscriptions.append(subscription)
    return subscriptions, problems


def validate_events(config, section) -> list:
    """The ``SECTION_VALIDATORS["events"]`` entry."""
    return compile_section(config, build=False)[1]


# A hook's time limits: a day at most (a longer wait is a hung hook); NaN, infinity, 0 and negative are refused.
TIMEOUT = zconfig.Key(zconfig.NUMBER, above=0, max=86400)
MIN_INTERVAL = zconfig.Key(zconfig.NUMBER, min=0, max=86400)

zconfig.register_section("events", {"enabled": bool, "subscriptions": list}, validate_events)
zconfig.register_section("hooks", {"workers": zconfig.Key(int, min=1, max=256), "timeout": TIMEOUT,
                                   "max_queued": zconfig.Key(int, min=1, max=10_000_000)})

"""Hook templates: parsing, checking and filling OctoPrint's ``{placeholder}`` syntax, safely.

This module owns the template language of ``events.subscriptions[].command`` (and ``env``):

* ``{key}`` is a payload key, ``{position.x}`` / ``{position[x]}`` a nested one, ``{__currentZ}`` and the other
  generic placeholders (:data:`GENERIC`) the state of the printer; ``{{`` and ``}}`` are literal braces; a format
  spec and conversion work as in ``str.format`` (``{__progress:.0f}``, ``{name!r}``).
* A *system* command is split into argv **before** filling, so a value is only ever part of one argv item
  (:func:`compile_argv`); with ``shell: true`` the template is one ``/bin/sh -c`` script in which every value is
  quoted for the shell quoting context it sits in (:func:`compile_shell`).
* A value that is missing renders as an empty string and is reported to the caller once (OctoPrint drops the whole
  command instead); a key the payload has with no value (``None``) renders as an empty string silently.

Nothing here runs anything: :mod:`zevents.hooks.service` does.
"""
from __future__ import annotations

import _string
import json
import os
import re
import shlex
import string
from datetime import datetime

#: The generic placeholders of OctoPrint's documentation, plus its undocumented ``__json`` and zevents' ``__printer``
#: (which printer of the node the event came from).
GENERIC = ("__currentZ", "__eventname", "__filename", "__filepath", "__fileorigin", "__progress", "__data",
           "__now", "__json", "__printer")
DEFAULT_PRINTER = "printer"     # the only printer of a node that names none (its events carry no printer)
NO_FILE = "NO FILE"

#: Payload keys OctoPrint < 1.4 sent and its documentation's examples still use (``Starting {file}``): filled from
#: the modern keys when an event's payload lacks them.
COMPAT_KEYS = {"file": "path", "filename": "name"}

_FORMATTER = string.Formatter()
_MARK = "\x00"
_MARKER_RE = re.compile("\x00([0-9]+)\x00")
_PLAIN_WORDS = re.compile("[^'\"\\\\`$|&;<>()#]*\\Z")
_BLANKS = re.compile("[ \t\r\n]+")
_NAME_START = re.compile(r"[A-Za-z_{(0-9#?@*!$-]")


class TemplateError(ValueError):
    """A template that cannot be used; the message says why in the user's terms."""


class _Missing:
    __slots__ = ()

    def __repr__(self):
        return "MISSING"


MISSING = _Missing()


class Field:
    """One ``{...}`` of a template: where to look the value up and how to format and quote it."""

    __slots__ = ("text", "path", "conversion", "spec", "context", "whole_word")

    def __init__(self, text: str, path: tuple, conversion: str | None, spec: str, context: str = "N"):
        self.text = text
        self.path = path
        self.conversion = conversion
        self.spec = spec
        self.context = context
        # In a shell script: the placeholder is a whole word (bare or alone in its quotes) with no `--` before it,
        # so a value beginning with '-' would be read as an option (see zevents.hooks.service).
        self.whole_word = False

    @property
    def key(self) -> str:
        return self.path[0]


class Template:
    """A parsed template: literal strings and :class:`Field` s, in order."""

    __slots__ = ("source", "parts", "fields", "shell_quoting", "constant")

    def __init__(self, source: str, parts: list, shell_quoting: bool = False):
        self.source = source
        self.parts = tuple(parts)
        self.fields = tuple(p for p in self.parts if isinstance(p, Field))
        self.shell_quoting = shell_quoting
        self.constant = None if self.fields else "".join(self.parts)

    @classmethod
    def of_constant(cls, source: str, text: str) -> "Template":
        """Template(source, [text]), made directly: a large config makes 100 000s of them."""
        template = cls.__new__(cls)
        template.source, template.parts, template.fields = source, (text,), ()
        template.shell_quoting, template.constant = False, text
        return template

    def render(self, values: "Values", sanitize=None) -> str:
        """The filled template.  ``sanitize`` (str → str) is applied to every value (G-code strips newlines)."""
        if self.constant is not None:
            return self.constant
        out = []
        for part in self.parts:
            if part.__class__ is str:
                out.append(part)
                continue
            text = values.format(part)
            if sanitize is not None:
                text = sanitize(text)
            if self.shell_quoting:
                text = _shell_quote(text, part.context)
            out.append(text)
        return "".join(out)

    def __repr__(self):
        return f"<Template {self.source!r}>"


def _shell_quote(text: str, context: str) -> str:
    quoted = shlex.quote(text)
    if context == "SQ":
        return "'" + quoted + "'"   # close the single quotes, the quoted value, reopen them
    if context == "DQ":
        return '"' + quoted + '"'   # likewise for double quotes: inside them $ and ` would still expand
    return quoted


# --- parsing ---------------------------------------------------------------------------------------------------

def _parse_field(field_name: str, conversion, spec) -> Field:
    text = "{" + field_name + ("!" + conversion if conversion else "") + (":" + spec if spec else "") + "}"
    if field_name == "" or field_name[0].isdigit():
        raise TemplateError(f"{text}: positional placeholders are not supported; name a payload key "
                            "(e.g. {name}) or a generic placeholder (e.g. {__filename})")
    if conversion not in (None, "s", "r", "a"):
        raise TemplateError(f"{text}: unknown conversion !{conversion} (use !s, !r or !a)")
    if spec and ("{" in spec or "}" in spec):
        raise TemplateError(f"{text}: nested placeholders in a format spec are not supported")
    try:
        first, rest = _string.formatter_field_name_split(field_name)
        path = (first,) + tuple(key for _, key in rest)
    except ValueError as exc:
        raise TemplateError(f"{text}: {exc}") from None
    if any(isinstance(key, str) and key == "" for key in path):
        raise TemplateError(f"{text}: empty key in a dotted name")
    if spec:
        try:
            format("", spec) if not any(c in spec for c in "dbcoxXneEfFgG%") else format(0, spec)
        except ValueError as exc:
            raise TemplateError(f"{text}: bad format spec: {exc}") from None
    return Field(text, path, conversion, spec or "")


def _split(source: str) -> tuple[list, list]:
    """(literal pieces, fields): ``pieces[i]`` precedes ``fields[i]``; one more piece than fields."""
    if not isinstance(source, str):
        raise TemplateError(f"must be a string, not {type(source).__name__}")
    if _MARK in source:
        raise TemplateError("contains a NUL character")
    pieces, fields = [], []
    try:
        parsed = list(_FORMATTER.parse(source))
    except ValueError as exc:
        raise TemplateError(f"bad placeholder syntax in {source!r}: {exc} (write {{{{ and }}}} for literal "
                            "braces)") from None
    literal = []
    for text, field_name, spec, conversion in parsed:
        literal.append(text)
        if field_name is not None:
            pieces.append("".join(literal))
            literal = []
            fields.append(_parse_field(field_name, conversion, spec))
    pieces.append("".join(literal))
    return pieces, fields


def _marked(pieces: list, fields: list) -> str:
    out = []
    for i, field in enumerate(fields):
        out.append(pieces[i])
        out.append(f"{_MARK}{i}{_MARK}")
    out.append(pieces[-1])
    return "".join(out)


def _parts_of(text: str, fields: list) -> list:
    if _MARK not in text:
        return [text] if text else []
    parts = []
    pos = 0
    for match in _MARKER_RE.finditer(text):
        if match.start() > pos:
            parts.append(text[pos:match.start()])
        parts.append(fields[int(match.group(1))])
        pos = match.end()
    if pos < len(text):
        parts.append(text[pos:])
    return parts


def compile_text(source: str) -> Template:
    """A template filled as one string (G-code lines, environment values)."""
    pieces, fields = _split(source)
    return Template(source, _parts_of(_marked(pieces, fields), fields))


class ShellScan:
    """What a POSIX-shell reading of a template finds: the quoting context of each placeholder and the shell
    features used outside single quotes (operators, expansions, here-documents)."""

    def __init__(self, text: str):
        self.contexts: dict[int, str] = {}
        self.operators: list[str] = []
        self.expansions: list[str] = []
        self.heredoc_at: int | None = None
        self.escaped: set[int] = set()     # placeholders right after a backslash (outside single quotes)
        self._scan(text)

    def _scan(self, s: str):
        stack = ["N"]
        i, n = 0, len(s)
        word_start = True
        while i < n:
            c = s[i]
            top = stack[-1]
            if c == _MARK:
                end = s.index(_MARK, i + 1)
                # Inside `...` the shell reads backslashes and backquotes before quotes: no quoting is safe there.
                self.contexts[int(s[i + 1:end])] = "BQ" if "BQ" in stack else top
                i = end + 1
                word_start = False
                continue
            if top == "SQ":
                if c == "'":
                    stack.pop()
                i += 1
                continue
            if c == "\\":
                if s.startswith(_MARK, i + 1):  # the backslash escapes the placeholder's first character
                    self.escaped.add(int(s[i + 2:s.index(_MARK, i + 2)]))
                    i += 1
                    continue
                i += 2
                word_start = False
                continue
            if c == "`":
                self.expansions.append("`")
                if top == "BQ":
                    stack.pop()
                else:
                    stack.append("BQ")
            elif c == "$" and i + 1 < n and s[i + 1] == "(":
                self.expansions.append("$(")
                stack.append("CMD")
                i += 2
                word_start = True
                continue
            elif c == "$" and i + 1 < n and _NAME_START.match(s[i + 1]):
                self.expansions.append("$" + s[i + 1])
            elif top == "DQ":
                if c == '"':
                    stack.pop()
            elif c == "'":
                stack.append("SQ")
            elif c == '"':
                stack.append("DQ")
            elif c == ")" and top == "CMD":
                stack.pop()
            elif c == "#" and word_start:
                newline = s.find("\n", i)
                i = n if newline < 0 else newline
                continue
            elif c in "|&;<>()":
                j = i
                while j < n and s[j] in "|&;<>()":
                    j += 1
                operator = s[i:j]
                self.operators.append(operator)
                if "<<" in operator and self.heredoc_at is None:
                    self.heredoc_at = i
                i = j
                word_start = True
                continue
            word_start = c.isspace()
            i += 1


def compile_shell(source: str) -> Template:
    """A ``/bin/sh -c`` script whose placeholders are quoted for their context (plain, '...' or "...")."""
    pieces, fields = _split(source)
    marked = _marked(pieces, fields)
    scan = ShellScan(marked)
    if scan.heredoc_at is not None and _MARK in marked[scan.heredoc_at:]:
        raise TemplateError("placeholders inside a here-document cannot be quoted safely; read the value from "
                            "the ZEVENTS_* environment variables or the JSON on stdin instead")
    for index, field in enumerate(fields):
        field.context = scan.contexts.get(index, "N")
        if field.context == "BQ":
            raise TemplateError(f"{field.text} inside `...` cannot be quoted safely; write $(...) instead")
        if index in scan.escaped:
            raise TemplateError(f"a backslash before {field.text} would escape the quoting of its value: drop the "
                                "backslash (values are quoted for the shell already)")
        field.whole_word = _whole_word(marked, f"{_MARK}{index}{_MARK}", field.context)
    return Template(source, _parts_of(marked, fields), shell_quoting=True)


_WORD_BEFORE = " \t\n;|&("
_WORD_AFTER = " \t\n;|&)"
_END_OF_OPTIONS = re.compile(r"(?:^|\s)--(?:\s|$)")


def _whole_word(marked: str, marker: str, context: str) -> bool:
    """Whether the placeholder ``marker`` is a whole word of the script (``{x}``, ``"{x}"`` or ``'{x}'``) with no
    ``--`` word before it."""
    start = marked.index(marker)
    before, after = marked[:start], marked[start + len(marker):]
    if context in ("SQ", "DQ"):
        quote = "'" if context == "SQ" else '"'
        if not (before.endswith(quote) and after.startswith(quote)):
            return False
        before, after = before[:-1], after[1:]
    elif context != "N":
        return False
    whole = (not before or before[-1] in _WORD_BEFORE) and (not after or after[0] in _WORD_AFTER)
    return whole and not _END_OF_OPTIONS.search(before)


_CONSTANT_WORDS: dict = {}
_FIELD_WORDS: dict = {}
_WORD_CACHE_SIZE = 100_000
# A command a shell would split at its blanks alone: no quotes, escapes, shell characters or `{{`/`}}`, and no blank
# inside a placeholder.  Its words are its blank-separated pieces, each compiled on its own (see compile_argv).
_SIMPLE_ARGV = re.compile("{plain}*(?:\\{{[^{{}} \t\r\n\x00]*\\}}{plain}*)*\\Z".format(
    plain="[^'\"\\\\`$|&;<>()#{}\x00]"))  # unrolled (a plain run, then placeholder + plain run): linear


def compile_argv(source: str) -> list:
    """The argv templates of a command run without a shell: the template is split like a shell would split it
    (quotes, backslashes), then each word is filled on its own.  Shell syntax is refused with a hint."""
    if source.__class__ is str and _SIMPLE_ARGV.match(source):
        argv = _simple_argv(source)
        if argv is not None:
            return argv
    return _compile_argv(source)


def _simple_argv(source: str) -> list | None:
    """compile_argv of a command that ``_SIMPLE_ARGV`` matches, or None for one it must refuse (``_compile_argv``
    then says why, as it would have).  Every word is a shared immutable Template: words recur across the thousands
    of hooks of a large config (a program, its options, ``{__filename}``), and a config of 50 000 hooks is checked
    in about a second."""
    stripped = source.strip(" \t\r\n")
    if not stripped:
        return None
    argv = []
    for word in _BLANKS.split(stripped):
        template = _CONSTANT_WORDS.get(word)
        if template is None:
            if "{" not in word:
                template = _constant_word(word)
            elif word in _FIELD_WORDS:
                template = _FIELD_WORDS[word]
            else:
                parts = []
                try:
                    for literal, field_name, spec, conversion in _string.formatter_parser(word):
                        if literal:
                            parts.append(literal)
                        if field_name is not None:
                            parts.append(_parse_field(field_name, conversion, spec))
                except (ValueError, TemplateError):
                    return None
                template = _field_word(word, parts)
                if len(_FIELD_WORDS) < _WORD_CACHE_SIZE and not word.startswith("~"):
                    _FIELD_WORDS[word] = template
        argv.append(template)
    if argv[0].constant is None and isinstance(argv[0].parts[0], Field):
        return None  # the program comes from a placeholder
    return argv


def forget_words() -> None:
    """Forget the argv words shared so far (kept across loads, up to 100 000 of each kind): what a benchmark of a
    first load starts from."""
    _CONSTANT_WORDS.clear()
    _FIELD_WORDS.clear()


def _constant_word(word: str) -> Template:
    """A word without placeholders: an immutable constant that serves every hook that writes it."""
    template = _CONSTANT_WORDS.get(word)
    if template is None:
        home = word.startswith("~")  # not kept: the home directory is looked up at each load
        template = Template.of_constant(word, os.path.expanduser(word) if home else word)
        if len(_CONSTANT_WORDS) < _WORD_CACHE_SIZE and not home:
            _CONSTANT_WORDS[word] = template
    return template


def _field_word(word: str, parts: list) -> Template:
    if parts and isinstance(parts[0], str) and parts[0].startswith("~"):
        parts[0] = os.path.expanduser(parts[0])
    return Template(word, parts)


def _compile_argv(source: str) -> list:
    """compile_argv for any command: placeholders marked, then split as a shell would (shlex), syntax refused."""
    pieces, fields = _split(source)
    marked = _marked(pieces, fields)
    if _PLAIN_WORDS.match(marked):
        # Nothing a shell would read specially: split at blanks (what shlex does here, ten times faster).
        stripped = marked.strip(" \t\r\n")
        words = _BLANKS.split(stripped) if stripped else []
    else:
        scan = ShellScan(marked)
        used = scan.operators + scan.expansions
        if used:
            raise TemplateError(f"uses shell syntax ({', '.join(repr(u) for u in dict.fromkeys(used))}) but runs "
                                "without a shell: add `shell: true` (placeholders are then quoted) or drop it")
        try:
            words = shlex.split(marked)
        except ValueError as exc:
            raise TemplateError(f"cannot split {source!r} into arguments: {exc}") from None
    if not words:
        raise TemplateError("is empty")
    argv = [_constant_word(word) if _MARK not in word else _field_word(word, _parts_of(word, fields))
            for word in words]
    program = argv[0].parts
    if not program or isinstance(program[0], Field):
        raise TemplateError("the program to run must be written out, not come from a placeholder")
    return argv


# --- values ----------------------------------------------------------------------------------------------------

class Values:
    """The values a template sees for one event: generic placeholders (computed only when used) and the payload.

    ``on_missing(field)`` is called for every placeholder that has no value; the caller decides how often to warn.
    """

    __slots__ = ("event", "payload", "state", "ts_us", "on_missing", "_generic")

    def __init__(self, event: str, payload: dict, state: dict | None = None, ts_us: int | None = None,
                 on_missing=None):
        self.event = event
        self.payload = payload
        self.state = state or {}
        self.ts_us = ts_us
        self.on_missing = on_missing
        self._generic: dict = {}

    def generic(self, name: str):
        value = self._generic.get(name, MISSING)
        if value is MISSING:
            value = self._generic[name] = self._compute(name)
        return value

    def _compute(self, name: str):
        state = self.state
        if name == "__eventname":
            return self.event
        if name == "__currentZ":
            z = state.get("currentZ")
            return -1 if z is None else z
        if name in ("__filename", "__filepath", "__fileorigin"):
            value = state.get(name[2:])
            return NO_FILE if value is None else value
        if name == "__progress":
            progress = state.get("progress")
            return 0 if progress is None else progress
        if name == "__data":
            return str(self.payload)
        if name == "__json":
            return to_json(self.payload)
        if name == "__now":
            return iso_time(self.ts_us)
        if name == "__printer":  # zevents' own: which printer of the node the event came from
            return state.get("printer") or DEFAULT_PRINTER
        return MISSING

    def lookup(self, path: tuple):
        key = path[0]
        if key.startswith("__") and key in GENERIC:
            value = self.generic(key)
        else:
            value = self.payload.get(key, MISSING)
            if value is MISSING and key in COMPAT_KEYS:
                value = self.payload.get(COMPAT_KEYS[key], MISSING)
        for key in path[1:]:
            if value is MISSING or value is None:
                break  # a known key without a value has no nested values either: empty, not missing
            if isinstance(value, dict):
                value = value.get(key, value.get(str(key), MISSING))
            elif isinstance(value, (list, tuple)):
                try:
                    value = value[int(key)]
                except (ValueError, IndexError):
                    value = MISSING
            else:
                value = MISSING
        return value

    def format(self, field: Field) -> str:
        value = self.lookup(field.path)
        if value is MISSING:
            if self.on_missing is not None:
                self.on_missing(field)
            return ""
        if value is None:
            return ""
        if field.conversion == "r":
            value = repr(value)
        elif field.conversion == "a":
            value = ascii(value)
        elif field.conversion == "s":
            value = str(value)
        try:
            return format(value, field.spec)
        except (ValueError, TypeError):
            # A spec that does not suit this value ({__progress:.0f} on a string): the plain value beats nothing.
            return str(value)


def to_json(payload) -> str:
    return json.dumps(payload, default=_json_default, ensure_ascii=False, separators=(",", ":"))


def _json_default(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def iso_time(ts_us: int | None) -> str:
    """ISO 8601 in the local time zone, with its offset (OctoPrint's ``__now`` has no offset)."""
    moment = datetime.now().astimezone() if ts_us is None else datetime.fromtimestamp(ts_us / 1e6).astimezone()
    return moment.isoformat()


def keys_used(templates) -> set:
    """The first keys of every placeholder in some templates (for checks against an event's payload)."""
    return {field.key for template in templates for field in template.fields}

"""zevents.safe_yaml against PyYAML itself: the same data as ``yaml.load(text, SafeLoader)``, the line of every key
and list item as PyYAML's composer marks it, and, through libyaml and through the pure-Python parser (the fallback
when libyaml is missing), the same data, lines and errors."""
from __future__ import annotations

import datetime

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from zevents import safe_yaml

LOADERS = [pytest.param(yaml.SafeLoader, id="pure")]
if getattr(yaml, "__with_libyaml__", False):
    LOADERS.insert(0, pytest.param(yaml.CSafeLoader, id="libyaml"))


@pytest.fixture(params=LOADERS)
def loader(request, monkeypatch):
    monkeypatch.setattr(safe_yaml, "_Loader", request.param)
    return request.param


class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data):
        return True


def _oracle_lines(text: str) -> dict:
    """{container path: {key or index: line}} from PyYAML's own node tree (a document without aliases)."""
    constructor = yaml.SafeLoader("")
    tables = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            table = tables[path] = {}
            for key_node, value_node in node.value:
                key = constructor.construct_object(key_node, deep=True)
                table[key] = key_node.start_mark.line + 1
                walk(value_node, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            table = tables[path] = {}
            for index, item in enumerate(node.value):
                table[index] = item.start_mark.line + 1
                walk(item, path + (index,))

    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if node is not None:
        walk(node, ())
    return tables


def _same_as_pyyaml(text: str):
    data, marks = safe_yaml.load(text)
    assert data == yaml.load(text, Loader=yaml.SafeLoader)
    assert marks.tables == _oracle_lines(text)


# Strings that an implicit resolver reads as something else, or nearly: each first character the resolvers know.
TRICKY = ["yes", "No", "on", "OFF", "true", "False", "~", "null", "Null", "", "0", "-1", "+2", "0x1F", "0o17", "1_000",
          ".5", "-.inf", ".NaN", "1e3", "1.5e-3", "2001-12-14", "2001-12-14t21:59:43.10-05:00", "=", "<<", "y", "n",
          "-", ".", "1:20", "190:20:30", "tRue", "nUll", "0b101", "!x", "&x", "*x", "%x", "@x", "`x", "a: b", "#c",
          " lead", "trail ", "multi\nline", "tab\there", "ünïcödé", "\u2028", "'", '"']
scalars = st.one_of(st.sampled_from(TRICKY), st.text(max_size=12), st.integers(), st.booleans(), st.none(),
                    st.floats(allow_nan=False), st.dates(min_value=datetime.date(1900, 1, 1)))
keys = st.one_of(st.sampled_from(TRICKY), st.text(max_size=8), st.integers(-5, 5), st.booleans())
documents = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(keys, inner, max_size=4)), max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(documents, st.sampled_from([False, True, None]), st.sampled_from([None, "'", '"']))
def test_data_and_lines_are_pyyaml_s(data, flow, style):
    for loader in [parameter.values[0] for parameter in LOADERS]:
        safe_yaml._Loader = loader
        try:
            _same_as_pyyaml(yaml.dump(data, Dumper=_NoAliases, default_flow_style=flow, default_style=style,
                                      allow_unicode=True, width=40))
        finally:
            safe_yaml._Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


HANDWRITTEN = [
    "a: 1\nb: [x, 'y', \"z\", !!str 3, !!int '4', !!float 5, !!binary aGk=, !!null '', !!bool yes]\n",
    "- a\n-\n  - b\n  - {c: d, e: [f]}\n- &s scalar\n- plain text\n  over lines\n"
    "- |\n  literal\n  block\n- >\n  folded\n",
    "x: &m {a: 1, b: 2}\ny: *m\nz:\n  <<: *m\n  b: 3\nw:\n  <<: [*m, {c: 4}]\n  c: 5\n",
    "? complex\n: value\n",
    "t: 2001-12-14 21:59:43.10 -5\nd: 2002-12-14\nn: ~\ne: ''\nq: '~'\nk: !!str yes\n",
    "%YAML 1.1\n---\na: !!map {b: !!seq [c]}\n...\n",
    "",
    "# only a comment\n",
    "just a scalar",
    "[1, [2, [3, []]], {}]",
]


@pytest.mark.parametrize("text", HANDWRITTEN)
def test_handwritten_documents_are_pyyaml_s(loader, text):
    data, marks = safe_yaml.load(text)
    assert data == yaml.load(text, Loader=yaml.SafeLoader)
    if "*m" not in text:  # an alias adds no lines of its own where PyYAML's node tree repeats the anchored ones
        assert marks.tables == _oracle_lines(text)


def test_merged_and_aliased_content_keeps_its_own_lines(loader):
    data, marks = safe_yaml.load(HANDWRITTEN[2])
    assert data["z"] == {"a": 1, "b": 3} and data["w"] == {"a": 1, "b": 2, "c": 5}
    assert marks[("z", "b")] == 5 and marks[("w", "c")] == 8 and ("y", "a") not in marks


BAD = [
    ("a: 1\nb: 2\na: 3\n", safe_yaml.YamlProblem, "duplicate key 'a' (first on line 1)", 3, ("a",)),
    ("a:\n  - {x: 1, x: 2}\n", safe_yaml.YamlProblem, "duplicate key 'x'", 2, ("a", 0, "x")),
    ("a: [1, 2\n", safe_yaml.YamlProblem, "not valid YAML", 2, ()),
    ("a: !!python/name:os.system x\n", safe_yaml.YamlProblem, "is not allowed in a config file", 1, ()),
    ("a: !!int x\n", safe_yaml.YamlProblem, "not a valid int: 'x'", 1, ()),
    ("a: !custom {b: 1}\n", safe_yaml.YamlProblem, "is not allowed in a config file", 1, ()),
    ("a: *nowhere\n", safe_yaml.YamlProblem, "unknown alias *nowhere", 1, ()),
    ("? [k]\n: v\n", safe_yaml.YamlProblem, "a mapping key must be a plain value", 1, ()),
    ("x: 1\n<<: [1]\n", safe_yaml.YamlProblem, "a `<<` merge key takes a mapping", 2, ()),
    ("a: [x, <<]\n", safe_yaml.YamlProblem, "`<<` is a merge key: it can only be a mapping's key", 1, ()),
    ("a:\n  b: <<\n", safe_yaml.YamlProblem, "`<<` is a merge key: it can only be a mapping's key", 2, ()),
    ("<<\n", safe_yaml.YamlProblem, "`<<` is a merge key: it can only be a mapping's key", 1, ()),
    ("a: 1\n---\nb: 2\n", safe_yaml.YamlProblem, "one YAML document", 2, ()),
    ("a:\n" + "".join(" " * (i + 1) + f"k{i}:\n" for i in range(70)), safe_yaml.YamlLimit,
     "nested deeper than 64 levels", 65, ()),
    ("x: &x " + "[" * 40 + "1" + "]" * 40 + "\ny: " + "[" * 30 + "*x" + "]" * 30 + "\n", safe_yaml.YamlLimit,
     "nested deeper than 64 levels (through the alias *x)", 2, ()),
    ("a: &a [" + ", ".join(["x"] * 50) + "]\n" + "".join(
        f"{n}: &{n} [{', '.join([f'*{p}'] * 50)}]\n" for p, n in zip("abcd", "bcde")), safe_yaml.YamlLimit,
     "billion laughs", 4, ()),
]


@pytest.mark.parametrize("text, kind, message, line, key", BAD)
def test_errors_name_their_line_and_key(loader, text, kind, message, line, key):
    with pytest.raises(safe_yaml.YamlProblem) as info:
        safe_yaml.load(text)
    assert type(info.value) is kind
    assert message in info.value.message and info.value.line == line and info.value.key == key


def test_an_anchored_key_may_be_aliased(loader):
    assert safe_yaml.load("&a x: *a\n")[0] == {"x": "x"}


def test_both_parsers_refuse_alike():
    """The pure parser is the fallback: every refusal above reads the same through it, word for word."""
    if len(LOADERS) < 2:
        pytest.skip("PyYAML without libyaml: only the pure parser here")
    for text, *_ in BAD:
        seen = []
        for loader in (yaml.CSafeLoader, yaml.SafeLoader):
            safe_yaml._Loader = loader
            try:
                safe_yaml.load(text)
            except safe_yaml.YamlProblem as exc:
                seen.append((type(exc), exc.message if "not valid YAML" not in exc.message else "syntax", exc.line,
                             exc.key))
            finally:
                safe_yaml._Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        assert seen[0] == seen[1], text


def test_without_libyaml_config_check_falls_back_and_says_the_same(tmp_path):
    """PyYAML built without libyaml has no CSafeLoader: `zevents config check` then reads through the pure parser
    and reports the same problems, with the same file, line and key."""
    import subprocess
    import sys

    values = tmp_path / "values.yaml"
    values.write_text("bus:\n  node: a\n  heartbeat: 0\nprinter: {window: 0}\n")
    hooks = tmp_path / "hooks.yaml"
    hooks.write_text("events:\n  subscriptions:\n    - {event: PrintDone, type: system, command: 'true'}\n"
                     "    - {event: PrintDone, type: system, command: 'echo {nokey}', timeout: -1}\n")
    duplicate = tmp_path / "duplicate.yaml"
    duplicate.write_text("printer: {window: 0}\nprinter: {}\n")
    script = ("import sys\n"
              "if sys.argv[1] == 'pure':\n"
              "    sys.modules['yaml._yaml'] = None  # as if PyYAML had been built without libyaml\n"
              "import yaml\n"
              "from zevents import config, safe_yaml\n"
              "assert yaml.__with_libyaml__ == (sys.argv[1] != 'pure')\n"
              "assert (safe_yaml._Loader is yaml.SafeLoader) == (sys.argv[1] == 'pure')\n"
              "for path in sys.argv[2:]:\n"
              "    print('\\n'.join(map(str, config.check(path, warnings=True))))\n")
    pure, default = [subprocess.run([sys.executable, "-c", script, kind, str(values), str(hooks), str(duplicate)],
                                    capture_output=True, text=True, check=True, timeout=120).stdout
                     for kind in ("pure", "default")]
    assert pure == default
    assert f"{values}:3: bus.heartbeat: must be between" in pure and f"{values}:4: printer.window: " in pure
    assert f"{hooks}:4: events.subscriptions.1.timeout: " in pure and "has no payload key 'nokey'" in pure
    assert f"{duplicate}:2: printer: duplicate key 'printer' (first on line 1)" in pure


def test_a_resolver_added_later_is_heard(loader, monkeypatch):
    """Plain strings skip the resolver by their first character; the characters are asked at each load."""
    import re

    assert safe_yaml.load("a: hello")[0] == {"a": "hello"}
    monkeypatch.setattr(yaml.resolver.Resolver, "yaml_implicit_resolvers",
                        dict(yaml.resolver.Resolver.yaml_implicit_resolvers))
    yaml.resolver.Resolver.add_implicit_resolver("tag:yaml.org,2002:null", re.compile("^hello$"), list("h"))
    assert safe_yaml.load("a: hello")[0] == {"a": None}

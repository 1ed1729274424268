"""Reading a config file's YAML safely and fast: bounded in size, depth and alias expansion, duplicate keys refused,
and the line of every key and list item kept for error messages.

PyYAML's own loaders are unsafe for a file anyone may hand to ``zevents config check``: a 432-byte "billion laughs"
(nested aliases) grew to 3.7 GB as the validator walked the shared objects, a list nested 5 000 deep overflowed
the recursive composer, and a duplicate key silently replaced the first.  They are also slow: the pure-Python
scanner took 38 s for a 5 MB file.  This module reads the event stream of libyaml's parser (the pure one when
libyaml is missing) and builds the data in one iterative pass, so that:

* the file is refused before parsing when it is larger than :data:`MAX_BYTES`;
* nesting deeper than :data:`MAX_DEPTH` is refused at the event that crosses it (no recursion anywhere);
* every alias adds the size of what it refers to (counted once per anchor) to the document's expanded size, and a
  document that would expand beyond :data:`MAX_NODES` values is refused as soon as it would;
* a key written twice in one mapping is an error (``<<`` merge keys fill only keys that are not written);
* only the safe tags are constructed (``!!python/...`` and unknown tags are errors).

Errors are :class:`YamlLimit` / :class:`YamlProblem` with the 1-based line; :mod:`zevents.config` adds the file.
"""
from __future__ import annotations

import gc

import yaml
from yaml import events as ev
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

MAX_BYTES = 16 * 1024 * 1024     # a 52 651-subscription config is 5 MB
MAX_DEPTH = 64                   # zevents' deepest key is 6 levels down
MAX_NODES = 4_000_000            # values in the document once aliases are expanded (the 5 MB config has 0.4 M)

_STR, _MAP, _SEQ, _MERGE = ("tag:yaml.org,2002:str", "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq",
                            "tag:yaml.org,2002:merge")
_SCALAR_TAGS = {tag: fn for tag, fn in SafeConstructor.yaml_constructors.items()
                if tag in ("tag:yaml.org,2002:null", "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int",
                           "tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:binary")}
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _AnyCharacter:
    def __contains__(self, character) -> bool:
        return True


def _implicit_first(resolver: Resolver):
    """The first characters of the plain scalars the resolver may read as something else than a string (bool, int,
    null...); any character when it has a resolver for every value.  Asked at each load: resolvers can be added."""
    resolvers = resolver.yaml_implicit_resolvers
    return _AnyCharacter() if None in resolvers else frozenset(resolvers)


class YamlProblem(ValueError):
    """A document that is not a usable config (syntax, duplicate key, unsupported tag); ``line`` is 1-based."""

    def __init__(self, message: str, line: int | None = None, key: tuple = ()):
        super().__init__(message)
        self.message = message
        self.line = line
        self.key = key


class YamlLimit(YamlProblem):
    """A document refused because it broke one of the limits (size, depth, alias expansion)."""


class _Frame:
    """A mapping or list being built.  Its expanded size is the growth of the document's running count while it
    is open (``base``); its depth below is kept by its collection and alias children only (a scalar child makes it
    1): scalars, nine events in ten, then cost no bookkeeping."""

    __slots__ = ("value", "path", "line", "key", "has_key", "lines", "merges", "anchor", "base", "depth", "is_list")

    def __init__(self, value, path, line, anchor, lines, base):
        self.value = value
        self.path = path
        self.line = line
        self.key = None
        self.has_key = False
        self.lines = lines       # key or list index -> its line
        self.merges = None
        self.anchor = anchor
        self.base = base
        self.depth = 0
        self.is_list = value.__class__ is list


class Marks:
    """The line of every key and list item, by key path (a tuple of keys and list indexes): one table per mapping
    or list, so that reading a large file makes no tuple per key."""

    __slots__ = ("tables",)

    def __init__(self, tables: dict | None = None):
        self.tables = tables or {}   # container path -> {key or index: line}

    def __contains__(self, path) -> bool:
        table = self.tables.get(path[:-1])
        return table is not None and path[-1] in table

    def __getitem__(self, path) -> int:
        table = self.tables.get(path[:-1])
        if table is None or path[-1] not in table:
            raise KeyError(path)
        return table[path[-1]]

    def get(self, path, default=None):
        return self[path] if path in self else default


def check_size(size: int):
    if size > MAX_BYTES:
        raise YamlLimit(f"the file is {size} bytes: larger than the limit of {MAX_BYTES} bytes (a config file "
                        "this large is a mistake or an attack)")


def load(text: str) -> tuple:
    """(data, marks) of one YAML document: ``marks`` maps each key path (a tuple of keys and list indexes) to the
    line of its key or list item.  Raises YamlProblem / YamlLimit."""
    check_size(len(text.encode("utf-8", "surrogatepass")) if len(text) * 4 > MAX_BYTES else len(text))
    enabled = gc.isenabled()
    gc.disable()  # a large file builds 100 000s of containers: generational collections would walk them in vain
    try:
        return _build(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        if "nesting depth" in str(exc.problem):  # libyaml's own limit (1000) is met before ours on long lines
            raise YamlLimit(f"nested deeper than {MAX_DEPTH} levels", mark.line + 1 if mark else None) from None
        raise YamlProblem(f"not valid YAML: {exc.problem or exc}", mark.line + 1 if mark else None) from None
    except yaml.YAMLError as exc:
        raise YamlProblem(f"not valid YAML: {exc}") from None
    finally:
        if enabled:
            gc.enable()


def _build(text: str) -> tuple:
    resolver = Resolver()
    resolve = resolver.resolve
    implicit_first = _implicit_first(resolver)
    constructor = SafeConstructor()
    tables: dict = {}
    anchors: dict = {}          # anchor -> (value, expanded size, depth below it)
    plain_tags: dict = {}       # plain scalar -> its implicit tag (the same short values recur thousands of times)
    stack: list = []
    total = 0
    root = None
    documents = 0

    def construct(tag, event, line):
        if tag == _MERGE:
            return _MERGE_KEY
        function = _SCALAR_TAGS.get(tag)
        if function is None:
            raise YamlProblem(f"the tag {tag!r} is not allowed in a config file", line)
        try:
            return function(constructor, yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark))
        except (yaml.YAMLError, ValueError) as exc:
            raise YamlProblem(f"not a valid {tag.rsplit(':', 1)[-1]}: {event.value!r} ({exc})", line) from None

    def place(parent, value, line):
        """A finished value in its parent mapping (as its key, or as the value of the pending key)."""
        if not parent.has_key:
            if value.__class__ is _MergeKey:
                parent.key = value
            elif isinstance(value, (dict, list)):
                raise YamlProblem("a mapping key must be a plain value, not a mapping or a list", line,
                                  parent.path)
            else:
                lines = parent.lines
                if value in lines:
                    raise YamlProblem(f"duplicate key {value!r} (first on line {lines[value]}): the first value "
                                      "would be silently replaced", line, parent.path + (value,))
                lines[value] = line
                parent.key = value
            parent.has_key = True
            return
        parent.has_key = False
        key = parent.key
        if key.__class__ is _MergeKey:
            sources = value if isinstance(value, list) else [value]
            if not all(isinstance(source, dict) for source in sources):
                raise YamlProblem("a `<<` merge key takes a mapping or a list of mappings", line, parent.path)
            parent.merges = (parent.merges or []) + sources
        else:
            parent.value[key] = value

    loader = _Loader(text)
    get_event = loader.get_event  # not yaml.parse(): its generator asks check_event() before every event
    ScalarEvent, AliasEvent = ev.ScalarEvent, ev.AliasEvent
    starts = (ev.MappingStartEvent, ev.SequenceStartEvent)
    ends = (ev.MappingEndEvent, ev.SequenceEndEvent)
    while True:
        event = get_event()
        cls = event.__class__
        if cls is ScalarEvent:
            # The hot path: a plain string placed in its mapping or list, no call made.
            total += 1
            value = event.value
            tag = event.tag
            if tag is None:
                if not event.implicit[0]:
                    tag = _STR                  # quoted: a string (what the resolver answers)
                elif value and value[0] not in implicit_first:
                    tag = _STR                  # no implicit type (bool, int, null...) starts so
                else:
                    tag = plain_tags.get(value)
                    if tag is None:
                        tag = resolve(yaml.ScalarNode, value, event.implicit)
                        if len(value) <= 64:
                            plain_tags[value] = tag
            elif tag == "!":
                tag = _STR
            if tag != _STR:
                value = construct(tag, event, event.start_mark.line + 1)
                if value is _MERGE_KEY and (not stack or stack[-1].is_list or stack[-1].has_key):
                    raise YamlProblem("`<<` is a merge key: it can only be a mapping's key (quote it for the text)",
                                      event.start_mark.line + 1)
            if event.anchor is not None:
                anchors[event.anchor] = (value, 1, 0)
            if total > MAX_NODES:
                raise YamlLimit(f"the document expands to more than {MAX_NODES} values (its aliases repeat "
                                "anchored content: a 'billion laughs' YAML bomb?)", event.start_mark.line + 1)
            if not stack:
                root = value
                continue
            parent = stack[-1]
            if parent.is_list:
                container = parent.value
                parent.lines[len(container)] = event.start_mark.line + 1
                container.append(value)
            elif parent.has_key:
                if parent.key.__class__ is _MergeKey:
                    place(parent, value, event.start_mark.line + 1)
                else:
                    parent.has_key = False
                    parent.value[parent.key] = value
            elif value.__class__ is _MergeKey or value in parent.lines:
                place(parent, value, event.start_mark.line + 1)  # says why a key is written twice
            else:
                parent.lines[value] = event.start_mark.line + 1
                parent.key = value
                parent.has_key = True
            continue
        elif cls in starts:
            line = event.start_mark.line + 1
            total += 1
            is_map = cls is ev.MappingStartEvent
            tag = event.tag
            if tag is not None and tag != "!" and tag != (_MAP if is_map else _SEQ):
                raise YamlProblem(f"the tag {tag!r} is not allowed in a config file", line)
            if len(stack) >= MAX_DEPTH:
                raise YamlLimit(f"nested deeper than {MAX_DEPTH} levels", line)
            if stack:
                parent = stack[-1]
                if parent.is_list:
                    path = parent.path + (len(parent.value),)
                elif parent.has_key:
                    path = parent.path + (parent.key,)
                else:
                    path = parent.path + ("?",)
            else:
                path = ()
            lines = tables[path] = {}
            stack.append(_Frame({} if is_map else [], path, line, event.anchor, lines, total - 1))
            continue
        elif cls in ends:
            frame = stack.pop()
            value = frame.value
            if frame.merges:  # explicit keys win, then the first merged mapping that has the key
                for source in frame.merges:
                    for key, item in source.items():
                        if key not in value:
                            value[key] = item
            size, line = total - frame.base, frame.line
            below = frame.depth or (1 if value else 0)
            if frame.anchor is not None:
                anchors[frame.anchor] = (value, size, below)
        elif cls is AliasEvent:
            line = event.start_mark.line + 1
            try:
                value, size, below = anchors[event.anchor]
            except KeyError:
                raise YamlProblem(f"unknown alias *{event.anchor}", line) from None
            if len(stack) + below > MAX_DEPTH:
                raise YamlLimit(f"nested deeper than {MAX_DEPTH} levels (through the alias *{event.anchor})", line)
            total += size
        elif cls is ev.DocumentStartEvent:
            documents += 1
            if documents > 1:
                raise YamlProblem("a config file holds one YAML document (found a second `---`)",
                                  event.start_mark.line + 1)
            continue
        elif cls is ev.StreamEndEvent:
            break
        else:
            continue
        # a finished collection or an alias: placed in its parent
        if total > MAX_NODES:
            raise YamlLimit(f"the document expands to more than {MAX_NODES} values (its aliases repeat anchored "
                            "content: a 'billion laughs' YAML bomb?)", line)
        if not stack:
            root = value
            continue
        parent = stack[-1]
        if below >= parent.depth:
            parent.depth = below + 1
        if parent.is_list:
            container = parent.value
            parent.lines[len(container)] = line
            container.append(value)
        else:
            place(parent, value, line)
    loader.dispose()
    if total > MAX_NODES:
        raise YamlLimit(f"the document expands to more than {MAX_NODES} values", None)
    return root, Marks(tables)


class _MergeKey:
    __slots__ = ()


_MERGE_KEY = _MergeKey()

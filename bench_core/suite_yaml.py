"""Read a suite file safely: every failure becomes one :class:`SuiteFileError` listing what is wrong.

Plain ``yaml.safe_load`` keeps the last of two duplicate keys without a word, expands an alias bomb ("billion
laughs") into more nodes than memory holds, and raises RecursionError on deep nesting.  Here:

- the file must be a regular file of at most ``MAX_SUITE_BYTES``, in UTF-8;
- nesting deeper than ``MAX_DEPTH`` is refused while composing (before Python's recursion limit);
- the composed document, aliases expanded, may hold at most ``MAX_NODES`` nodes (counted once per node, so a
  bomb is refused in time proportional to its size on disk) and no recursive alias;
- a duplicate key in a mapping is refused, naming the key and both lines (every duplicate at once).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

MAX_SUITE_BYTES = 1_000_000   # the shipped suites are 1-20 kB
MAX_DEPTH = 64                # nesting of mappings and sequences (a suite needs about 8)
MAX_NODES = 1_000_000         # nodes of the document with every alias expanded


class SuiteFileError(ValueError):
    """A suite file that cannot be read or parsed; ``problems`` lists every reason found."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


def _where(mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "unknown position"


class _Loader(yaml.SafeLoader):
    """SafeLoader with a nesting limit and duplicate keys collected, both while composing."""

    def __init__(self, stream, name: str | None = None):
        super().__init__(stream)
        if name:
            self.name = name  # (the marks of error messages carry it)
        self._depth = 0
        self.duplicates: list[tuple[int, int, str]] = []  # (line, column, message): reported in file order

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise SuiteFileError([f"nested deeper than {MAX_DEPTH} levels (at {_where(mark)})"])
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_mapping_node(self, anchor):
        """The mapping as composed (before '<<' merges are flattened), its duplicate keys noted."""
        node = super().compose_mapping_node(anchor)
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, ScalarNode):
                continue  # '<<' merges (explicit keys may override merged ones); complex keys: the constructor's
            try:
                key = self.construct_object(key_node, deep=True)  # '1' and '01' are one key, as in the result
                first = seen.get(key)
            except (yaml.YAMLError, TypeError):
                continue
            if first is not None:
                m = key_node.start_mark
                self.duplicates.append((m.line, m.column, f"duplicate key {key!r} at {_where(m)} (first at "
                                                          f"{_where(first)}); keep one"))
            else:
                seen[key] = key_node.start_mark
        return node


def _expanded_size(root: Node) -> int:
    """Nodes of the document with every alias expanded, each distinct node visited once (iterative: no recursion
    limit); raises SuiteFileError for a recursive alias or more than ``MAX_NODES`` nodes."""
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children = [n for pair in node.value for n in pair] if isinstance(node, MappingNode) else \
            list(node.value) if isinstance(node, SequenceNode) else []
        if done:
            on_path.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)
            if size[key] > MAX_NODES:
                raise SuiteFileError([f"more than {MAX_NODES:_} nodes once its aliases are expanded (an alias "
                                      f"bomb?); write the values out or split the suite"])
            continue
        if key in size:
            continue
        if key in on_path:
            raise SuiteFileError([f"a recursive alias (a node that contains itself) at {_where(node.start_mark)}"])
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in size)
    return size[id(root)]


def _yaml_error(e: yaml.YAMLError) -> str:
    """A PyYAML error on one line: the problem and where, and its context and where."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem:
        text = f"{e.problem} at {_where(e.problem_mark)}"
        if e.context:
            text += f" ({e.context}" + (f" at {_where(e.context_mark)})" if e.context_mark else ")")
        return text
    return " ".join(str(e).split())


def parse_yaml_text(text: str, name: str | None = None) -> Any:
    """The document in ``text`` (``name``: its file, for messages), or SuiteFileError with every problem found."""
    loader = _Loader(text, name)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        data = loader.construct_document(node)
    except SuiteFileError:
        raise
    except yaml.YAMLError as e:
        raise SuiteFileError([f"not valid YAML: {_yaml_error(e)}"]) from None
    except RecursionError:  # (MAX_DEPTH keeps far below it; kept as a last guard)
        raise SuiteFileError([f"nested too deeply (more than {MAX_DEPTH} levels)"]) from None
    finally:
        loader.dispose()
    if loader.duplicates:
        raise SuiteFileError([m for _, _, m in sorted(loader.duplicates)])
    return data


def read_suite_file(path: Path) -> Any:
    """Read and parse a suite file: a regular UTF-8 file of at most ``MAX_SUITE_BYTES``, valid YAML under the
    limits above.  SuiteFileError (one message, every problem) for anything else."""
    path = Path(path)
    if path.is_dir():
        raise SuiteFileError([f"{path} is a folder, not a suite file; give a .yaml file or a suite name"])
    if not path.exists():
        raise SuiteFileError([f"suite file {path} does not exist"])
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SUITE_BYTES + 1)
    except OSError as e:
        raise SuiteFileError([f"cannot read {path}: {e.strerror or e}"]) from None
    if len(raw) > MAX_SUITE_BYTES:
        raise SuiteFileError([f"the file is larger than {MAX_SUITE_BYTES:_} bytes (MAX_SUITE_BYTES in "
                              f"bench_core/suite_yaml.py); a suite is a few kB of YAML"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise SuiteFileError([f"not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} (line {line}); "
                              f"save the file as UTF-8"]) from None
    return parse_yaml_text(text, str(path))

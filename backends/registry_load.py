"""Reading a registry file into plain data: UTF-8 only, bounded size and depth, no duplicate keys.

Every problem becomes a RegistryError naming the file, the line and (inside `models:`) the entry and field,
instead of a raw UnicodeDecodeError, a RecursionError, or a duplicate key that silently wins.
"""

from __future__ import annotations

import stat
from pathlib import Path

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode


class RegistryError(ValueError):
    """The registry file is invalid; the message names the file, the entry and the field."""


MAX_BYTES = 16 * 1024 * 1024  # a 10,000-entry registry is about 1 MB
MAX_DEPTH = 32  # a registry needs 5 levels (top, models, entry, sampling, value)
MAX_NODES = 1_000_000  # values after expanding aliases (stops "billion laughs" documents)


def describe_kind(mode: int) -> str | None:
    """What a non-regular file is ('a directory', 'a FIFO (named pipe)', ...), or None for a regular file."""
    kinds = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket")]
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def read_yaml(path: Path) -> object:
    """The registry file's YAML data; RegistryError for anything that is not a sane UTF-8 YAML file."""
    text = _read_text(path)
    loader = _Loader(text)
    loader.name = str(path)  # YAML error marks name the file
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_tree(path, node)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise RegistryError(f"{path}: not valid YAML: {exc}") from None
    finally:
        loader.dispose()


def _read_text(path: Path) -> str:
    """The file as text: a regular file (never opens a FIFO), at most MAX_BYTES, valid UTF-8."""
    try:
        st = path.stat()
        kind = describe_kind(st.st_mode)
        if kind:
            raise RegistryError(f"{path}: cannot read the registry: it is {kind}, not a file")
        if st.st_size > MAX_BYTES:
            raise RegistryError(f"{path}: the registry is {st.st_size:,} bytes, more than the "
                                f"{MAX_BYTES:,} a registry may have")
        data = path.read_bytes()[:MAX_BYTES + 1]
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read the registry: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise RegistryError(f"{path}: line {line}, column {column}: not UTF-8 text (byte "
                            f"0x{data[exc.start]:02x}); save the registry as UTF-8") from None


class _Loader(yaml.SafeLoader):
    """SafeLoader whose composer refuses nesting deeper than MAX_DEPTH (instead of a RecursionError)."""

    _depth = 0

    def compose_node(self, parent: Node | None, index: object) -> Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep",
                                                  mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def where(parts: list[object], ident: object = None) -> str:
    """'models[0] (id 'a'): field 'sampling.top_k'', 'templates['x']: field 'user'' or 'top level'."""
    head, rest = "top level", parts
    if len(parts) >= 2 and parts[0] == "models" and isinstance(parts[1], int):
        head = f"models[{parts[1]}]" + (f" (id {ident!r})" if isinstance(ident, str) else "")
        rest = parts[2:]
    elif len(parts) >= 2 and parts[0] == "templates":
        head, rest = f"templates[{parts[1]!r}]", parts[2:]
    if not rest:
        return head
    field = ".".join(str(p) for p in rest)
    return f"field '{field}'" if head == "top level" else f"{head}: field '{field}'"


def _entry_id(node: Node) -> object:
    """The `id:` scalar of a mapping node, if it has one."""
    if isinstance(node, MappingNode):
        for key, value in node.value:
            if isinstance(key, ScalarNode) and key.value == "id" and isinstance(value, ScalarNode):
                return value.value
    return None


def _check_tree(path: Path, root: Node) -> None:
    """Walk the node graph (iteratively): no duplicate keys, bounded depth and size after aliases."""
    stack: list[tuple[Node, list[object], object, int]] = [(root, [], None, 1)]
    seen_nodes = 0
    while stack:
        node, parts, ident, depth = stack.pop()
        seen_nodes += 1
        if depth > MAX_DEPTH or seen_nodes > MAX_NODES:
            what = (f"nested more than {MAX_DEPTH} levels deep" if depth > MAX_DEPTH
                    else f"more than {MAX_NODES:,} values once its aliases are expanded")
            raise RegistryError(f"{path}: line {node.start_mark.line + 1}: {where(parts, ident)}: "
                                f"the registry is {what}")
        if isinstance(node, SequenceNode):
            for i, item in enumerate(node.value):
                sub_ident = _entry_id(item) if parts == ["models"] else ident
                stack.append((item, [*parts, i], sub_ident, depth + 1))
        elif isinstance(node, MappingNode):
            first: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                if isinstance(key, ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    line = key.start_mark.line + 1
                    if (key.tag, key.value) in first:
                        raise RegistryError(
                            f"{path}: line {line}: {where(parts, ident)}: duplicate key {key.value!r} "
                            f"(first on line {first[key.tag, key.value]}); each key may appear once")
                    first[key.tag, key.value] = line
                stack.append((value, [*parts, key.value if isinstance(key, ScalarNode) else "?"], ident,
                              depth + 1))

"""A YAML node tree walked with its path: the machinery behind raftlb's config errors.

`Cursor` wraps a composed YAML node and the path to it (`clusters[0].nodes[2].url`); every accessor
converts or raises a ConfigError naming the path and the line. `expand_env` replaces `${NAME}` and
`${NAME:-default}` line by line, so an error names its line too.

While `collecting()` is active (the whole file is being checked), `attempt` and `report` record an error
and let the walk carry on with the next setting, item or section, so that one run names every error;
`ConfigErrors` then holds them all in file order.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from contextvars import ContextVar
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml
from yaml.constructor import SafeConstructor

from raftlb.errors import ConfigError

T = TypeVar("T")
D = TypeVar("D")
Conv = Callable[["Cursor"], object]
NULL, STR, _MERGE = "tag:yaml.org,2002:null", "tag:yaml.org,2002:str", "tag:yaml.org,2002:merge"
NAME = re.compile(r"[A-Za-z0-9_.-]+")
_NUMBER_UNIT = re.compile(r"(-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))\s*([A-Za-z]*)")
_DURATION_MS = {"": 1000, "ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_ENV_REF = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{")



_problems: ContextVar[list[ConfigError] | None] = ContextVar("raftlb_config_problems", default=None)


class ConfigErrors(ConfigError):
    """Several errors of one file, in file order; its own path, message and line are the first one's."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = errors
        first = errors[0]
        super().__init__(first.path, first.message, line=first.line, file=first.file)

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


class Reported(Exception):
    """Unwinds a part of the file whose errors are already recorded (it is no error of its own)."""


@contextlib.contextmanager
def collecting() -> Iterator[list[ConfigError]]:
    """Record errors instead of stopping at the first one, for the `with` block."""
    errors: list[ConfigError] = []
    token = _problems.set(errors)
    try:
        yield errors
    finally:
        _problems.reset(token)


def combined(errors: list[ConfigError]) -> ConfigError:
    """The recorded errors as one exception: duplicates dropped, in file order (errors without a line, about
    the whole file, first)."""
    unique = list({(e.line, e.path, e.message): e for e in errors}.values())
    unique.sort(key=lambda e: e.line or 0)
    return unique[0] if len(unique) == 1 else ConfigErrors(unique)


def report(error: ConfigError) -> None:
    """Record `error` and carry on while collecting; raise it otherwise."""
    if (errors := _problems.get()) is None:
        raise error
    errors.append(error)


def attempt(convert: Callable[[], T], default: D) -> T | D:
    """`convert()`, or `default` once its error is recorded (while collecting; otherwise it raises)."""
    try:
        return convert()
    except ConfigError as exc:
        report(exc)
    except Reported:
        pass
    return default


def mark() -> int:
    """How many errors are recorded so far: pass it to `give_up_if_failed` at the end of a part."""
    errors = _problems.get()
    return 0 if errors is None else len(errors)


def give_up_if_failed(since: int) -> None:
    """Raise `Reported` when errors were recorded since `mark()` returned `since`: the part built from
    them would be incomplete."""
    if mark() > since:
        raise Reported


def expand_env(text: str, environ: Mapping[str, str], source: str | None) -> str:
    # Line by line, so that an error can name its line. Comment lines are left alone: they show examples.
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if "${" in line and not line.lstrip().startswith("#"):
            fail = partial(ConfigError, "", line=i + 1, file=source)
            lines[i] = _ENV_REF.sub(partial(_env_value, environ, fail), line)
    return "\n".join(lines)


def _env_value(environ: Mapping[str, str], fail: Callable[[str], ConfigError], m: re.Match[str]) -> str:
    if m[0] == "$${":
        return "${"
    name, default = m[1], m[2]
    if name is None:
        raise fail("malformed ${...}: write ${NAME} or ${NAME:-default}, or $${ for a literal ${")
    value = environ.get(name)
    if not value and default is not None:  # `:-` as in the shell: an empty value takes the default too
        value = default
    if value is None:
        raise fail(f"environment variable {name} is not set (write ${{{name}:-default}} to give a default)")
    if "\n" in value or "\r" in value:  # it would shift every line number after it
        raise fail(f"environment variable {name} contains a line break")
    return value


class Cursor:
    """A YAML node and its path in the document; every accessor raises a ConfigError naming both."""

    def __init__(self, node: yaml.Node, path: str, file: str | None) -> None:
        self.node, self.path, self.file = node, path, file

    @property
    def line(self) -> int | None:
        return self.node.start_mark.line + 1 if self.node.start_mark else None

    def at(self, node: yaml.Node, key: str | int) -> Cursor:
        path = f"{self.path}[{key}]" if isinstance(key, int) else f"{self.path}.{key}" if self.path else key
        return Cursor(node, path, self.file)

    def error(self, message: str) -> ConfigError:
        return ConfigError(self.path, message, line=self.line, file=self.file)

    def bad(self, expected: str) -> ConfigError:
        node = self.node
        if isinstance(node, yaml.CollectionNode):
            got = "a mapping" if isinstance(node, yaml.MappingNode) else "a list"
        elif node.tag == NULL:
            got = "nothing"
        else:
            got = repr(node.value) if node.tag == STR else str(node.value)
        return self.error(f"must be {expected}, got {got}")

    def mapping(self, keys: Collection[str], extensions: bool = False) -> Map:
        """The entries of a mapping (nothing counts as empty). Unknown keys are errors; with `extensions`,
        keys starting with `x-` are ignored (a place for YAML anchors)."""
        if self.node.tag == NULL:
            return Map(self, {})
        if not isinstance(self.node, yaml.MappingNode):
            raise self.bad("a mapping")
        seen: dict[str, int | None] = {}
        for key_node, _ in self.node.value:  # a key written twice is a mistake; a merged-in key is not
            if key_node.tag != _MERGE:
                key = self._key(key_node)
                attempt(partial(claim, seen, key, self.at(key_node, key), "key"), None)
        try:
            SafeConstructor().flatten_mapping(self.node)  # resolves `<<: *anchor`; own keys come last
        except yaml.YAMLError as exc:
            raise self.error(f"invalid merge: {getattr(exc, 'problem', exc)}") from None
        entries: dict[str, Cursor] = {}
        for key_node, value_node in self.node.value:
            key = self._key(key_node)
            if key in keys:
                entries[key] = self.at(value_node, key)
            elif not (extensions and key.startswith("x-")):
                report(self.at(key_node, key).error(f"unknown key{suggest(key, keys)}"))
        return Map(self, entries)

    def _key(self, node: yaml.Node) -> str:
        if not isinstance(node, yaml.ScalarNode) or node.tag == NULL:
            raise Cursor(node, self.path, self.file).error("keys must be plain names")
        return str(node.value)

    def items(self, allow_empty: bool = False) -> list[Cursor]:
        if allow_empty and self.node.tag == NULL:
            return []
        if not isinstance(self.node, yaml.SequenceNode) or not (self.node.value or allow_empty):
            raise self.bad("a list" if allow_empty else "a non-empty list")
        return [self.at(node, i) for i, node in enumerate(self.node.value)]

    def scalar(self) -> object:
        if not isinstance(self.node, yaml.ScalarNode):
            raise self.bad("a single value")
        try:
            return SafeConstructor().construct_object(self.node)  # fresh: constructors cache every node
        except yaml.YAMLError as exc:  # e.g. an unknown !tag
            raise self.error(str(getattr(exc, "problem", exc))) from None

    def text(self, expected: str = "a string") -> str:
        """The scalar as written, so that `id: 010` is "010", not 8."""
        if not isinstance(self.node, yaml.ScalarNode) or self.node.tag == NULL:
            raise self.bad(expected)
        return str(self.node.value)

    def name(self) -> str:
        expected = "a name made of letters, digits, '_', '.' and '-'"
        if not NAME.fullmatch(value := self.text(expected)):
            raise self.bad(expected)
        return value

    def choice(self, options: tuple[str, ...]) -> str:
        expected = f"one of {', '.join(options)}"
        if (value := self.text(expected).lower()) not in options:
            raise self.error(f"must be {expected}, got {self.node.value!r}{suggest(value, options, False)}")
        return value

    def boolean(self) -> bool:
        if not isinstance(value := self.scalar(), bool):
            raise self.bad("true or false")
        return value

    def integer(self, minimum: int = 0) -> int:
        value = self.scalar()
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.bad("a whole number")
        if value < minimum:
            raise self.error(f"must be at least {minimum}, got {value}")
        return value

    def duration(self, allow_zero: bool = False) -> float:
        """Seconds, from `250ms`, `1.5s`, `1m`, `2h` or a bare number of seconds."""
        value, expected = self.scalar(), "a duration like 250ms, 5s, 1m or a number of seconds"
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            seconds = float(value)
        elif isinstance(value, str) and (m := _NUMBER_UNIT.fullmatch(value.strip())):
            if m[2] not in _DURATION_MS:
                raise self.error(f"unknown duration unit {m[2]!r} (use ms, s, m or h), got {value!r}")
            seconds = float(m[1]) * _DURATION_MS[m[2]] / 1000
        else:
            raise self.bad(expected)
        if seconds < 0 or (seconds == 0 and not allow_zero):
            raise self.bad("zero or more" if allow_zero else "more than zero")
        return seconds

    def size(self, minimum: int = 0) -> int:
        """Bytes, from `64KiB`, `16MiB`, `1GiB`, `10KB`, `1MB` or a bare number of bytes."""
        value = self.scalar()
        if isinstance(value, int) and not isinstance(value, bool):
            size = value
        elif isinstance(value, str) and (m := _NUMBER_UNIT.fullmatch(value.strip())):
            if (unit := _SIZE_UNITS.get(m[2].lower())) is None:
                units = "B, KB, MB, GB, KiB, MiB or GiB"
                raise self.error(f"unknown size unit {m[2]!r} (use {units}), got {value!r}")
            size = int(m[1]) * unit if m[1].lstrip("-").isdigit() else int(float(m[1]) * unit)
        else:
            raise self.bad("a size like 64KiB, 16MiB or a number of bytes")
        if size < minimum:
            raise self.bad(f"at least {minimum} bytes")
        return size

    def address(self) -> tuple[str, int]:
        """`host:port` to bind (IPv6 in brackets); port 0 picks a free port."""
        expected = "host:port, like 127.0.0.1:8080"
        host, _, port = self.text(expected).rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else "" if ":" in host else host
        valid_port = port.isascii() and port.isdigit() and int(port) <= 65535
        if not host or any(c.isspace() for c in host) or not valid_port:
            raise self.bad(expected)
        return host, int(port)

    def url(self) -> tuple[str, str, int]:
        """A node's URL: (`scheme://host:port`, host, port), the port defaulting to 80 or 443."""
        raw, expected = self.text(), "an http:// or https:// URL with host and port"
        try:
            parts = urlsplit(raw)
            host, port = parts.hostname, parts.port
        except ValueError:
            raise self.bad(expected) from None
        if parts.scheme not in ("http", "https") or not host or port == 0 or any(c.isspace() for c in raw):
            raise self.bad(expected)
        if parts.path not in ("", "/") or parts.query or parts.fragment or "?" in raw or "#" in raw:
            raise self.bad("a URL without path, query or fragment")
        if parts.username is not None:
            raise self.error("must not carry credentials")
        port = port or (443 if parts.scheme == "https" else 80)
        return f"{parts.scheme}://{f'[{host}]' if ':' in host else host}:{port}", host, port


_FAILED = object()


class Map:
    """The checked entries of one YAML mapping."""

    def __init__(self, owner: Cursor, entries: dict[str, Cursor]) -> None:
        self.owner, self.entries = owner, entries

    def get(self, key: str) -> Cursor | None:
        return self.entries.get(key)

    def require(self, key: str, message: str = "is required") -> Cursor:
        if key not in self.entries:
            owner = self.owner
            raise ConfigError(owner.at(owner.node, key).path, message, line=owner.line, file=owner.file)
        return self.entries[key]

    def opt(self, key: str, conv: Callable[[Cursor], T], default: T) -> T:
        """The converted value, or `default` when absent (or, collecting, when its error is recorded)."""
        return default if (cur := self.entries.get(key)) is None else attempt(partial(conv, cur), default)

    def fields(self, spec: Mapping[str, Conv]) -> dict[str, Any]:
        """Converted values of the keys in `spec` that are present; absent keys keep dataclass defaults (as
        do keys whose error is recorded, while collecting)."""
        fields: dict[str, Any] = {}
        for key, conv in spec.items():
            if key in self.entries:
                value = attempt(partial(conv, self.entries[key]), _FAILED)
                if value is not _FAILED:
                    fields[key] = value
        return fields


def make_conv(make: Callable[..., T], spec: Mapping[str, Conv]) -> Callable[[Cursor], T]:
    return lambda cur: make(**cur.mapping(spec).fields(spec))


def at_least_one(cur: Cursor) -> int:
    return cur.integer(minimum=1)


def suggest(word: str, options: Collection[str], list_all: bool = True) -> str:
    if close := difflib.get_close_matches(word, options, n=1):
        return f" (did you mean {close[0]}?)"
    return f" (expected one of: {', '.join(options)})" if list_all else ""


def claim(seen: dict[str, int | None], value: str, cur: Cursor, what: str) -> None:
    if value in seen:
        raise cur.error(f"duplicate {what} {value!r} (first at line {seen[value]})")
    seen[value] = cur.line

"""A subset of Consul's `?filter=` expressions (go-bexpr), evaluated over the JSON answer items."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from meshserve.registry.dev.schema import BadRequest

Predicate = Callable[[Any], bool]
MAX_FILTER_LEN = 4096

_TOKEN_RE = re.compile(
    r"""\s*(?:
        (?P<str>"(?:[^"\\]|\\.)*"|`[^`]*`)
      | (?P<op>==|!=|\(|\)|\[|\]|\.)
      | (?P<word>[A-Za-z0-9_\-/:+@]+)
    )""",
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "not", "in", "contains", "matches", "is", "empty"}


def _fail(detail: str) -> BadRequest:
    return BadRequest(f"Failed to create boolean expression evaluator: {detail}")


def _tokenize(expr: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        if expr[pos:].strip() == "":
            break
        m = _TOKEN_RE.match(expr, pos)
        if not m or m.end() == pos:
            raise _fail(f"unexpected character {expr[pos:].lstrip()[:1]!r} at {pos}")
        pos = m.end()
        if m.group("str") is not None:
            raw = m.group("str")
            text = raw[1:-1]
            if raw[0] == '"':
                text = re.sub(r"\\(.)", r"\1", text)
            tokens.append(("str", text))
        elif m.group("op") is not None:
            tokens.append(("op", m.group("op")))
        else:
            word = m.group("word")
            tokens.append(("kw" if word in _KEYWORDS else "word", word))
    return tokens


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]]):
        self.tokens = tokens
        self.pos = 0

    def peek(self, offset: int = 0) -> tuple[str, str] | None:
        i = self.pos + offset
        return self.tokens[i] if i < len(self.tokens) else None

    def take(self, kind: str | None = None, value: str | None = None) -> tuple[str, str]:
        tok = self.peek()
        if tok is None or (kind and tok[0] != kind) or (value and tok[1] != value):
            want = value or kind or "a token"
            raise _fail(f"expected {want}, got {tok[1] if tok else 'end of expression'!r}")
        self.pos += 1
        return tok

    def accept(self, kind: str, value: str) -> bool:
        if self.peek() == (kind, value):
            self.pos += 1
            return True
        return False

    def parse(self) -> Predicate:
        pred = self.parse_or()
        if self.peek() is not None:
            raise _fail(f"unexpected {self.peek()[1]!r}")  # type: ignore[index]
        return pred

    def parse_or(self) -> Predicate:
        parts = [self.parse_and()]
        while self.accept("kw", "or"):
            parts.append(self.parse_and())
        return parts[0] if len(parts) == 1 else (lambda item: any(p(item) for p in parts))

    def parse_and(self) -> Predicate:
        parts = [self.parse_not()]
        while self.accept("kw", "and"):
            parts.append(self.parse_not())
        return parts[0] if len(parts) == 1 else (lambda item: all(p(item) for p in parts))

    def parse_not(self) -> Predicate:
        if self.accept("kw", "not"):
            inner = self.parse_not()
            return lambda item: not inner(item)
        if self.accept("op", "("):
            inner = self.parse_or()
            self.take("op", ")")
            return inner
        return self.parse_match()

    def parse_selector(self) -> list[str]:
        path = [self.take("word")[1]]
        while True:
            if self.accept("op", "."):
                tok = self.take()
                if tok[0] not in ("word", "kw", "str"):
                    raise _fail(f"bad selector part {tok[1]!r}")
                path.append(tok[1])
            elif self.accept("op", "["):
                path.append(self.take("str")[1])
                self.take("op", "]")
            else:
                return path

    def parse_value(self) -> str:
        tok = self.take()
        if tok[0] not in ("str", "word"):
            raise _fail(f"expected a value, got {tok[1]!r}")
        return tok[1]

    def parse_match(self) -> Predicate:
        tok = self.peek()
        if tok is None:
            raise _fail("expression ends early")
        if tok[0] == "str" or (tok[0] == "word" and self.peek(1) in (("kw", "in"), ("kw", "not"))):
            value = self.parse_value()
            negate = self.accept("kw", "not")
            self.take("kw", "in")
            path = self.parse_selector()
            return lambda item: negate != _contains(_select(item, path), value)
        path = self.parse_selector()
        if self.accept("op", "=="):
            value = self.parse_value()
            return lambda item: _equals(_select(item, path), value)
        if self.accept("op", "!="):
            value = self.parse_value()
            return lambda item: not _equals(_select(item, path), value)
        if self.accept("kw", "is"):
            negate = self.accept("kw", "not")
            self.take("kw", "empty")
            return lambda item: negate != _empty(_select(item, path))
        negate = self.accept("kw", "not")
        if self.accept("kw", "contains"):
            value = self.parse_value()
            return lambda item: negate != _contains(_select(item, path), value)
        if self.accept("kw", "matches"):
            pattern = self.parse_value()
            try:
                rx = re.compile(pattern)
            except re.error as exc:
                raise _fail(f"invalid regular expression {pattern!r}: {exc}") from None
            return lambda item: negate != any(
                isinstance(v, str) and rx.search(v) is not None for v in _flat(_select(item, path)))
        raise _fail(f"expected an operator after selector {'.'.join(path)!r}")


_MISSING = object()


def _select(item: Any, path: list[str]) -> Any:
    current = item
    for part in path:
        if isinstance(current, list):
            current = [_select(x, [part]) for x in current]
            current = [x for x in current if x is not _MISSING]
        elif isinstance(current, dict):
            current = current.get(part, _MISSING)
            if current is _MISSING:
                return _MISSING
        else:
            return _MISSING
    return current


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _flat(value: Any) -> list[Any]:
    if value is _MISSING or value is None:
        return []
    return value if isinstance(value, list) else [value]


def _equals(value: Any, want: str) -> bool:
    if value is _MISSING:
        return want == ""
    return any(_text(v) == want for v in _flat(value)) if isinstance(value, list) else (
        _text(value) == want)


def _contains(value: Any, want: str) -> bool:
    if isinstance(value, dict):
        return want in value
    if isinstance(value, list):
        return any(_text(v) == want for v in value)
    if isinstance(value, str):
        return want in value
    return False


def _empty(value: Any) -> bool:
    return value is _MISSING or value is None or (hasattr(value, "__len__") and len(value) == 0)


def compile_filter(expr: str) -> Predicate:
    """A predicate over one JSON answer item; BadRequest with bexpr's wording when invalid."""
    if len(expr) > MAX_FILTER_LEN:
        raise _fail(f"expression longer than {MAX_FILTER_LEN} characters")
    tokens = _tokenize(expr)
    if not tokens:
        raise _fail("empty expression")
    try:
        return _Parser(tokens).parse()
    except RecursionError:
        raise _fail("expression nested too deeply") from None

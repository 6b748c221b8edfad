"""A generic walker: raw YAML -> frozen dataclasses, driven by their fields.

A field's type annotation says how a value converts (str, int, float, bool, a
`Secret`-like class built from text, `X | None`, `Mapping[str, X]`, `tuple[X, ...]`,
a nested dataclass); its metadata, written with `setting(...)`, says what else must
hold. Every mapping is first checked against the allow-list of its dataclass's
fields, then each field is read in declaration order; problems are collected with
their paths, never raised, so one run reports them all.

Rules a `setting` may carry (anything else is a TypeError at import):
  doc           what the setting means
  minimum       lowest number allowed (0 unless said); `exclusive`: excluding it
  maximum       highest number allowed
  choices       the allowed strings
  required      True (reason "is required"), or the reason, when the key is missing
  fallback      placeholder for a required value missing or unusable (never checked)
  default_from  fn(values so far) -> the default, for defaults derived from other fields
  check         fn(value, values so far) -> reason or None: a cross-field or semantic check
  normalize     fn(value) -> value, applied after the checks
  simulated     the value of an unset ${VAR} when simulating, instead of an error
  internal      not a key in the file: given by the caller (for mapping items: their key)
  non_empty     reason when a mapping or list is empty (for mappings: or no mapping)
  key_reason    reason when a mapping key is not a name (NAME)
  fixed_keys    the mapping's keys are those of its default; the file overrides some
  unique        for a list of dataclasses: the attribute that must differ between items
  yaml_name     the key in the file, when it cannot be the attribute's name (`class`)
"""

from __future__ import annotations

import difflib
import functools
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, field, fields, is_dataclass
from typing import Any

ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RULES = frozenset({
    "doc", "minimum", "exclusive", "maximum", "choices", "required", "fallback",
    "default_from", "check", "normalize", "simulated", "internal", "non_empty",
    "key_reason", "fixed_keys", "unique", "yaml_name"})
Check = Callable[[Any, Mapping[str, Any]], str | None]

_UNSET: Any = object()  # no usable value: the field's default (or fallback) applies


def setting(default: Any = MISSING, doc: str = "", *, factory: Any = MISSING,
            **rules: Any) -> Any:
    """A dataclass field carrying its own validation rules (see the module docstring)."""
    unknown = set(rules) - RULES
    if unknown:  # a misspelt rule would silently check nothing
        raise TypeError(f"unknown setting rule(s): {', '.join(sorted(unknown))}")
    return field(default=default, default_factory=factory, metadata={"doc": doc, **rules})


def file_keys(cls: type) -> set[str]:
    """The keys a mapping for `cls` may hold: the allow-list."""
    return {_key(f) for f in fields(cls) if not f.metadata.get("internal")}


def _key(f: Field[Any]) -> str:
    """A field's key in the file: its name, unless its `yaml_name` says otherwise."""
    return f.metadata.get("yaml_name", f.name)


def expand_env(text: str, env: Mapping[str, str]) -> tuple[str, list[str]]:
    """`${VAR}` and `${VAR:-default}` replaced from `env`; also the unset names."""
    missing: list[str] = []

    def sub(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        missing.append(name)
        return ""

    return ENV_REF.sub(sub, text), missing


class Walker:
    """Builds dataclasses from raw YAML, collecting every problem instead of the first."""

    def __init__(self, env: Mapping[str, str], simulate: bool = False):
        self.env = env
        self.simulate = simulate
        self.problems: list[tuple[str, str]] = []

    def fail(self, path: str, reason: str) -> None:
        self.problems.append((path, reason))

    def build(self, cls: type, raw: Any, path: str, given: Mapping[str, Any] | None = None
              ) -> Any:
        """`cls` from the mapping `raw` (None: every default); `given`: internal fields."""
        m = self.mapping(raw, path, file_keys(cls))
        values = dict(given or {})
        for f in fields(cls):
            if f.name not in values and not f.metadata.get("internal"):
                values[f.name] = self.field(f, _hints(cls)[f.name], m.get(_key(f)),
                                            _join(path, _key(f)), values)
        return cls(**values)

    def field(self, f: Field[Any], tp: Any, raw: Any, path: str, values: Mapping[str, Any]
              ) -> Any:
        meta = f.metadata
        if is_dataclass(tp):  # a section: absent means all its defaults
            return self.build(tp, raw, path)
        default = _default(f, values)
        value, unusable = _UNSET, False
        if raw is not None:
            value = self.value(tp, raw, path, meta, default)
            unusable = value is _UNSET  # and said why: its check would only add noise
        elif meta.get("required"):
            self.fail(path, "is required" if meta["required"] is True else meta["required"])
        text_default = default if default is not _UNSET else meta.get("fallback")
        if value == "" and text_default and isinstance(text_default, str) \
                and "choices" not in meta:
            value = _UNSET  # `host: ""` means the default; a blank choice is a wrong one
        if value is _UNSET:
            if default is _UNSET:  # required, and missing or unusable: not worth checking
                return meta.get("fallback")
            value = default
        check: Check | None = meta.get("check")
        if check and not unusable and (reason := check(value, values)):
            self.fail(path, reason)
        normalize = meta.get("normalize")
        return normalize(value) if normalize else value

    def value(self, tp: Any, raw: Any, path: str, meta: Mapping[str, Any], default: Any
              ) -> Any:
        """`raw` converted to `tp`, or _UNSET once the reason is reported."""
        tp = _optional(tp)
        origin = typing.get_origin(tp)
        if origin is tuple:
            return self.items(typing.get_args(tp)[0], raw, path, meta)
        if origin is Mapping:
            return self.entries(typing.get_args(tp)[1], raw, path, meta, default)
        if tp is bool:
            return self.boolean(raw, path)
        if tp in (int, float):
            return self.number(raw, path, integer=tp is int, minimum=meta.get("minimum", 0.0),
                               exclusive=meta.get("exclusive", False),
                               maximum=meta.get("maximum"))
        text = self.text(raw, path, meta)
        if tp is not str:  # e.g. Secret: built from the text; a blank one is none
            return text if text is _UNSET else tp(text) if text else None
        choices = meta.get("choices")
        if choices and text is not _UNSET and text not in choices:
            self.fail(path, f"must be one of {', '.join(choices)}, got {text!r}")
            return _UNSET
        return text

    # -- collections ---------------------------------------------------------------

    def mapping(self, value: Any, path: str, allowed: set[str]) -> dict[Any, Any]:
        """The allow-list pass: `value` must be a mapping of known string keys."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(path, f"must be a mapping, got {_kind(value)}")
            return {}
        for key in value:
            if not isinstance(key, str):
                self.fail(path, f"keys must be strings, got {key!r}")
            elif key not in allowed:
                hint = _closest(key, allowed)
                suffix = f" (did you mean {hint!r}?)" if hint else ""
                self.fail(_join(path, key), "unknown key" + suffix)
        return value

    def entries(self, item_tp: Any, raw: Any, path: str, meta: Mapping[str, Any],
                default: Any) -> Any:
        if meta.get("fixed_keys"):
            given = self.mapping(raw, path, set(default))
            return {**default, **{key: self.item(item_tp, value, _join(path, str(key)), key)
                                  for key, value in given.items()}}
        if not isinstance(raw, dict) or not raw:
            self.fail(path, meta["non_empty"])
            return _UNSET
        out = {}
        for key, value in raw.items():
            p = _join(path, str(key))
            if not isinstance(key, str) or not NAME.match(key):
                self.fail(p, meta["key_reason"])
                continue
            out[key] = self.item(item_tp, value, p, key)
        return out

    def item(self, tp: Any, raw: Any, path: str, key: Any) -> Any:
        if is_dataclass(tp):
            internal = {f.name: key for f in fields(tp) if f.metadata.get("internal")}
            return self.build(tp, raw, path, internal)
        # A null or unusable entry still counts (as 0): no knock-on errors, as before
        value = _UNSET if raw is None else self.value(tp, raw, path, {}, _UNSET)
        return tp() if value is _UNSET else value

    def items(self, tp: Any, raw: Any, path: str, meta: Mapping[str, Any]) -> Any:
        if not isinstance(raw, list):
            self.fail(path, f"must be a list, got {_kind(raw)}")
            return _UNSET
        if not raw and meta.get("non_empty"):
            self.fail(path, meta["non_empty"])
        unique, seen, out = meta.get("unique"), set(), []
        for i, item in enumerate(raw):
            p = f"{path}[{i}]"
            if item is None:  # a bare `-`: skipped, as it always was
                continue
            if not isinstance(item, dict) or not item:
                self.fail(p, "is empty" if item == {} else f"must be a mapping, got {_kind(item)}")
                continue
            obj = self.build(tp, item, p)
            if unique:
                key = getattr(obj, unique)
                if key in seen:
                    self.fail(f"{p}.{unique}",
                              f"duplicate {tp.__name__.lower()} {unique} {key!r}")
                seen.add(key)
            out.append(obj)
        return tuple(out)

    # -- scalars -------------------------------------------------------------------

    def text(self, raw: Any, path: str, meta: Mapping[str, Any]) -> Any:
        if isinstance(raw, bool) or not isinstance(raw, str | int | float):
            self.fail(path, f"must be a string, got {_kind(raw)}")
            return _UNSET
        return self.expand(str(raw), path, meta)

    def expand(self, text: str, path: str, meta: Mapping[str, Any]) -> Any:
        """`text` with its ${VAR}s expanded, or _UNSET once each unset one is reported."""
        out, missing = expand_env(text, self.env)
        if missing and self.simulate and "simulated" in meta:
            return meta["simulated"]
        for name in missing:
            self.fail(path, f"environment variable {name} is not set")
        return _UNSET if missing else out

    def number(self, value: Any, path: str, *, integer: bool, minimum: float = 0.0,
               exclusive: bool = False, maximum: float | None = None) -> Any:
        if isinstance(value, str):
            value = self.expand(value, path, {})
            if value is _UNSET:
                return _UNSET
            try:
                value = float(value)
            except ValueError:
                self.fail(path, f"must be a number, got {value!r}")
                return _UNSET
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(path, f"must be a number, got {_kind(value)}")
            return _UNSET
        if integer and isinstance(value, float) and not value.is_integer():  # .inf, .nan too
            self.fail(path, f"must be a whole number, got {value}")
            return _UNSET
        if value < minimum or (exclusive and value == minimum):
            self.fail(path, f"must be {'>' if exclusive else '>='} {minimum:g}, got {value}")
            return _UNSET
        out = int(value) if integer else float(value)
        if maximum is not None and out > maximum:
            self.fail(path, f"must be <= {maximum:g}, got {out}")
            return _UNSET
        return out

    def boolean(self, value: Any, path: str) -> Any:
        if not isinstance(value, bool):
            self.fail(path, f"must be true or false, got {_kind(value)}")
            return _UNSET
        return value


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _default(f: Field[Any], values: Mapping[str, Any]) -> Any:
    if "default_from" in f.metadata:
        return f.metadata["default_from"](values)
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return _UNSET


def _optional(tp: Any) -> Any:
    """`X | None` -> X."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if isinstance(tp, types.UnionType) and len(args) == 1 else tp


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "nothing"}.get(type(value),
                                                                             type(value).__name__)


def _closest(key: str, allowed: set[str]) -> str | None:
    match = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.75)
    return match[0] if match else None

"""Suites: YAML files validated into frozen dataclasses before anything runs.

A suite names its ``kind`` (``micro``, the default, or ``train``); the kind brings the suite's
model, its checks and its cases (:mod:`attnbench.kinds`). What every kind shares is here: reading
the YAML (several suites per file, ``include:`` chains), the implementation entries and their
parameter sweeps, the checks of implementation names and parameters, and error messages that
name the file, the key path and what is allowed; ``attnbench validate`` reports them without
running anything.

    name: quick                 # default: the file's stem
    kind: micro
    include: common.yaml        # optional: shared settings, overridden by this file
    plugins: [mypackage.attn]   # optional: modules that register implementations
    implementations:
      - name: full.sdpa
      - name: gpa.torch
        params: {phase1_res: 16, topk: [4, 12]}   # a list sweeps the parameter
    ...                         # the kind's own keys (see attnbench.kinds.micro, .train)
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

CONFIG = ConfigDict(extra="forbid", strict=False)
PositiveInt = Annotated[int, Field(ge=1)]
MAX_VALUES = 100_000  # values a suite may expand to once its YAML aliases are resolved
MAX_SHOWN = 200  # characters of a bad value an error message shows
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a suite name is a file-name part


class SuiteLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping (YAML would keep the
    last value and drop the first without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})",
                    key_node.start_mark,
                )  # fmt: skip
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def expanded_size(value, sizes: dict | None = None) -> int:
    """How many values ``value`` holds with every alias expanded (shared objects counted at
    each place they appear), computed once per object."""
    sizes = {} if sizes is None else sizes
    if id(value) in sizes:
        return sizes[id(value)]
    children = value.values() if isinstance(value, dict) else value
    size = 1
    if isinstance(value, dict | list):
        size += sum(expanded_size(child, sizes) for child in children)
    sizes[id(value)] = size
    return size


def read_yaml(path: Path) -> list:
    """The documents of a YAML file, with duplicate keys and alias bombs refused."""
    try:
        documents = list(yaml.load_all(path.read_text(), Loader=SuiteLoader))
    except OSError as err:
        raise SuiteError([f"{path}: cannot be read ({err.strerror})"]) from err
    except UnicodeDecodeError as err:
        raise SuiteError([not_text(path, err)]) from err
    except yaml.YAMLError as err:
        raise SuiteError([f"{path}: not valid YAML: {err}"]) from err
    size = expanded_size(documents)
    if size > MAX_VALUES:
        raise SuiteError(
            [
                f"{path}: expands to {size:,} values once its aliases are resolved (allowed: at "
                f"most {MAX_VALUES:,}; aliases nested within aliases multiply)"
            ]
        )
    return [d for d in documents if d is not None]


def shown(value) -> str:
    """``repr(value)``, cut to :data:`MAX_SHOWN` characters."""
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + f"... ({len(text):,} characters)"


def check_name(name, where: str) -> None:
    """A suite's name becomes its results file's name: letters, digits, '.', '_', '-' only."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or set(name) == {"."}:
        raise SuiteError(
            [
                f"{where}: name: {shown(name)} cannot name a results file (allowed: letters, "
                "digits, '.', '_' and '-', starting with a letter or digit, at most 100 "
                "characters)"
            ]
        )


class SuiteError(ValueError):
    """A suite file is wrong; ``problems`` lists each as 'file: key.path: message'."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True, config=CONFIG)
class ImplEntry:
    """One implementation; a list value in ``params`` sweeps that parameter.

    ``generator`` (train suites) overrides generator settings for this entry alone, over the
    suite's ``generator`` (e.g. ``{small_attention: none}``: no copying at any level).
    """

    name: str
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    generator: dict[str, Any] = dataclasses.field(default_factory=dict)


class CaseIdentity:
    """What every case has: its parameters as a dict and a stable id.

    ``UNHASHED_DEFAULTS``: fields that hash only when they leave these values, so that a
    field added to a case keeps the ids of the cases that hold its default.
    """

    UNHASHED_DEFAULTS: typing.ClassVar[dict[str, Any]] = {}

    @property
    def params_dict(self) -> dict[str, Any]:
        return dict(self.params)

    def identity(self) -> dict[str, Any]:
        """Everything that determines the case, as plain values (the suite's name excluded)."""
        config = dataclasses.asdict(self)
        config.pop("suite")
        return config

    @property
    def case_id(self) -> str:
        """Stable hash of :meth:`identity`."""
        config = self.identity()
        for key, default in self.UNHASHED_DEFAULTS.items():
            if config[key] == default:
                del config[key]
        text = json.dumps(config, sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()[:16]


def sweep(params: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the list-valued parameters (others fixed)."""
    keys = list(params)
    values = [v if isinstance(v, list) else [v] for v in params.values()]
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def _loc_text(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _field_type_at(root: type, loc: tuple) -> type | None:
    """The dataclass that holds the last key of ``loc``, walking field annotations."""
    current: Any = root
    for part in loc:
        if isinstance(part, int):
            args = [a for a in typing.get_args(current) if a is not Ellipsis]
            current = args[0] if args else None
        elif dataclasses.is_dataclass(current):
            hints = typing.get_type_hints(current, include_extras=True)
            current = hints.get(part)
        else:
            return None
        while typing.get_origin(current) in (Annotated, Union, typing.Union) or (
            current is not None and type(current).__name__ == "UnionType"
        ):
            args = [a for a in typing.get_args(current) if a is not type(None)]
            current = args[0]
    return current if dataclasses.is_dataclass(current) else None


def _format_pydantic(file: str, root: type, err: ValidationError) -> list[str]:
    problems = []
    errors = err.errors()
    locs = [tuple(e["loc"]) for e in errors]
    for e in errors:
        loc = tuple(e["loc"])
        if any(other[: len(loc)] == loc and other != loc for other in locs):
            continue  # a container's complaint about a member already reported
        if e["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            owner = _field_type_at(root, loc[:-1])
            allowed = [f.name for f in dataclasses.fields(owner)] if owner else []
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(
                f"{file}: {_loc_text(loc)}: unknown key {loc[-1]!r}{hint} "
                f"(allowed: {', '.join(allowed)})"
            )
        elif e["type"] == "missing":
            problems.append(f"{file}: {_loc_text(loc)}: required key is missing")
        else:
            given = e.get("input")
            problems.append(f"{file}: {_loc_text(loc)}: {e['msg']} (got {shown(given)})")
    return problems


def not_text(path: Path, err: UnicodeDecodeError) -> str:
    return f"{path}: not a UTF-8 text file (byte {err.start}: {err.reason}); a suite is YAML text"


def _read_mapping(path: Path) -> dict:
    """The single YAML mapping in ``path``."""
    documents = read_yaml(path)
    data = documents[0] if len(documents) == 1 else documents or None
    if not isinstance(data, dict):
        raise SuiteError([f"{path}: (top level): must be a mapping of keys to values"])
    return data


def _resolve_includes(data: dict, path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """``data`` (read from ``path``) with its ``include:`` chain merged in; ``data`` wins."""
    include = data.get("include")
    if include is None:
        return data
    if not isinstance(include, str):
        raise SuiteError([f"{path}: include: must be a file path (got {include!r})"])
    target = (path.parent / include).resolve()
    if target in (*seen, path.resolve()):
        chain = " -> ".join(str(p) for p in (*seen, path, target))
        raise SuiteError([f"{path}: include: cycle ({chain})"])
    base = _resolve_includes(_read_mapping(target), target, (*seen, path.resolve()))
    base.pop("name", None)
    return {**base, **data}


def load_suites(path: str | Path) -> list:
    """Every suite in ``path``: one per YAML document (``---`` separates them)."""
    path = Path(path)
    documents = read_yaml(path)
    if len(documents) <= 1:
        return [load_suite(path)]
    suites, problems = [], []
    for number, document in enumerate(documents, 1):
        where = f"{path} (document {number})"
        if not isinstance(document, dict) or "name" not in document:
            problems.append(f"{where}: name: required when a file holds several suites")
            continue
        try:
            suites.append(build_suite(_resolve_includes(document, path), where))
        except SuiteError as err:
            problems += err.problems
    names = [s.name for s in suites]
    if len(set(names)) != len(names):
        problems.append(f"{path}: name: every suite in a file needs its own name (got {names})")
    if problems:
        raise SuiteError(problems)
    return suites


def load_suite(path: str | Path):
    """Read, merge includes, validate the schema and the implementations; raise SuiteError."""
    path = Path(path)
    data = _resolve_includes(_read_mapping(path), path)
    data.setdefault("name", path.stem)
    return build_suite(data, str(path))


def build_suite(data: dict, path: str):
    """Validate one suite's mapping (includes already merged) into its kind's model; raise
    SuiteError."""
    from attnbench.kinds import KINDS

    check_name(data.get("name"), path)
    name = data.get("kind", "micro")
    if name not in KINDS:
        raise SuiteError(
            [f"{path}: kind: {name!r} is not a suite kind (allowed: {', '.join(KINDS)})"]
        )
    kind = KINDS[name]
    root = kind.suite_model
    try:
        suite = root(**data)
    except ValidationError as err:
        raise SuiteError(_format_pydantic(str(path), root, err)) from err
    except TypeError as err:  # not a mapping of keyword arguments
        raise SuiteError([f"{path}: {err}"]) from err
    import_plugins(suite, str(path))
    problems = check_implementations(suite, str(path)) + kind.check(suite, str(path))
    if problems:
        raise SuiteError(problems)
    return suite


def import_plugins(suite, file: str) -> None:
    """Import the suite's ``plugins`` (they register implementations); SuiteError if one fails."""
    from attnbench import registry

    try:
        registry.import_plugins(list(suite.plugins))
    except ValueError as err:
        raise SuiteError([f"{file}: plugins: {err}"]) from None


def check_implementations(suite, file: str) -> list[str]:
    """What the schema cannot see of the implementations: names, parameter values and their
    combinations."""
    problems = []
    for i, entry in enumerate(suite.implementations):
        problems += check_entry(entry, f"{file}: implementations[{i}]")
    return problems


def check_entry(entry: ImplEntry, where: str) -> list[str]:
    """The entry's name is registered, each parameter value is allowed, every combination of
    its sweep can be created."""
    from attnbench import registry

    try:
        cls = registry.get(entry.name)
    except ValueError as err:
        return [f"{where}.name: {err}"]
    problems = []
    for key, value in entry.params.items():
        if key not in cls.PARAMS:
            accepted = ", ".join(sorted(cls.PARAMS)) or "none"
            problems.append(
                f"{where}.params.{key}: {entry.name} has no parameter {key!r} "
                f"(accepted parameters: {accepted})"
            )
            continue
        if isinstance(value, list) and not value:
            problems.append(f"{where}.params.{key}: an empty list sweeps nothing")
        for v in value if isinstance(value, list) else [value]:
            try:
                cls.PARAMS[key].validate(entry.name, key, v)
            except ValueError as err:
                problems.append(f"{where}.params.{key}: {err}")
    if problems:
        return problems
    combination_errors = []
    for combo in sweep(entry.params):
        try:
            registry.create(entry.name, **combo)
        except ValueError as err:
            if str(err) not in combination_errors:
                combination_errors.append(str(err))
    return [f"{where}.params: {e}" for e in combination_errors]

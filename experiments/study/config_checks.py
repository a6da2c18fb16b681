"""The checks every command runs on its configuration and flags before any compute.

One validation path for all of them: a configuration field (``config.ppo.num_envs``) or
a flag (``--seed``) is checked by the same functions, and a refusal is a
``ConfigError`` whose message names the field, what it must be and what it was; the
commands turn it into exit code 2 (``experiments.study.cli.exit_status_on_refusal``).

The rules, the same everywhere:

* integers are Python or numpy integers (never bools, floats or strings), at least a
  stated minimum and at most ``INT_LIMIT`` (2**31 - 1, int32 on the device) unless a
  field states its own maximum;
* reals are finite (NaN and infinities refused), within the field's bounds;
* seeds are integers in [0, 2**32): they become uint32 PRNG keys, so seed 2**32 + s
  would silently repeat seed s (``check_seeds``);
* output paths can be written: a file path that is not a folder, a folder path that is
  not a file, under an existing folder that can be written or a path that can be
  created (``check_output_file``, ``check_output_folder``).

``Fields(prefix)`` carries the prefix a message starts with: ``CONFIG`` ("config.")
for configuration files, ``FLAGS`` ("--") for plain flags. The module-level functions
are ``CONFIG``'s.
"""

from __future__ import annotations

import math
import numbers
import os
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any, NoReturn

import numpy as np

from experiments.study.cli import ConfigError
from orthorecall.validation import check_int as _library_int
from orthorecall.validation import check_real as _library_real

# The largest integer a field takes unless it says otherwise: counts and sizes end up
# as int32 on the device (optax's step count, array shapes, loop bounds).
INT_LIMIT = 2**31 - 1
# Seeds become uint32 PRNG keys (PRNGKey(s) keeps s mod 2**32: first_seed=2**32 would
# silently rerun seed 0).
SEED_LIMIT = 2**32


def reason(error: Exception, name: str) -> str:
    """The library's "NAME must ..." message without its leading NAME."""
    message = str(error)
    return message[len(name) + 1 :] if message.startswith(f"{name} ") else message


class Fields:
    """Checks whose refusals name fields as ``<prefix><field>``."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def fail(self, field: str, message: str) -> NoReturn:
        raise ConfigError(f"{self.prefix}{field}: {message}")

    def get(self, config, field: str, hint: str = "start from a preset of the configuration file"):
        """``config.<field>`` (dotted), or a refusal saying it is missing."""
        node = config
        for part in field.split("."):
            try:
                node = node[part]
            except (KeyError, AttributeError, TypeError):
                self.fail(field, f"is missing; {hint}.")
        return node

    def int(
        self,
        field: str,
        value,
        minimum: int | None = None,
        maximum: int | None = INT_LIMIT,
        hint: str = "",
    ) -> int:
        """``value`` as a Python int in [minimum, maximum] (maximum None: unbounded)."""
        try:
            value = _library_int(field, value, minimum=minimum)
        except ValueError as e:
            self.fail(field, f"{reason(e, field)}{hint}.")
        if maximum is not None and value > maximum:
            self.fail(field, f"must be <= {maximum}, got {value}{hint}.")
        return value

    def real(self, field: str, value, hint: str = "", **bounds) -> float:
        """``value`` as a finite float within ``bounds`` (``check_real``'s keywords)."""
        try:
            return _library_real(field, value, **bounds)
        except ValueError as e:
            self.fail(field, f"{reason(e, field)}{'; ' + hint if hint else ''}.")

    def optional_real(self, field: str, value, hint: str = "", **bounds) -> float | None:
        return None if value is None else self.real(field, value, hint, **bounds)

    def choice(self, field: str, value, choices) -> str:
        choices = tuple(choices)
        if not isinstance(value, str) or value not in choices:
            self.fail(field, f"{value!r} is not one of {choices}.")
        return value

    def boolean(self, field: str, value) -> bool:
        if not isinstance(value, (bool, np.bool_)):
            self.fail(field, f"must be True or False, got {value!r} ({type(value).__name__}).")
        return bool(value)

    def name(self, value, field: str = "name") -> str:
        """A run name that is one folder name (the default workdir is workdirs/<name>)."""
        if not isinstance(value, str) or not value.strip():
            self.fail(field, f"must be a non-empty string (the run's folder name), got {value!r}.")
        if value in (".", "..") or any(c in value for c in "/\\\0") or not value.isprintable():
            self.fail(
                field,
                f"{value!r} cannot be a folder name; use letters, digits, '_', '-' or '.', "
                "without '/' or '\\\\'.",
            )
        if value != value.strip() or len(value.encode()) > 255:
            self.fail(field, f"{value!r} has leading or trailing spaces or is over 255 bytes.")
        return value

    def section(self, config, section: str, known) -> dict:
        """The fields of ``config.<section>`` as a dict, refusing fields it does not know."""
        node = self.get(config, section)
        fields = node.to_dict() if hasattr(node, "to_dict") else node
        if not isinstance(fields, dict):
            self.fail(section, f"must be a ConfigDict of fields, got {node!r}.")
        unknown = sorted(set(fields) - set(known))
        if unknown:
            self.fail(section, f"unknown field(s) {unknown}; its fields are {sorted(known)}.")
        return fields

    def section_error(self, section: str, error: Exception, fields) -> NoReturn:
        """A library ValueError/TypeError about a section's field, as that field's refusal."""
        message = str(error)
        for field in sorted(fields, key=len, reverse=True):  # chunk_size before chunk
            if message.startswith(f"{field} ") or message.startswith(f"{field}="):
                text = message[len(field) :].lstrip(" =")
                self.fail(f"{section}.{field}", text if text.endswith(".") else f"{text}.")
        self.fail(section, message if message.endswith(".") else f"{message}.")

    def seeds(self, first_field: str, first, count=1, count_field: str | None = None):
        """``(first, count)`` checked so that seeds first .. first + count - 1 all lie in
        [0, 2**32): seeds are uint32 PRNG keys, so 2**32 + s would repeat seed s."""
        count = 1 if count_field is None else self.int(count_field, count, minimum=1)
        first = self.int(first_field, first, minimum=0, maximum=None)
        if first + count > SEED_LIMIT:
            last = first + count - 1
            shown = f"seed {first}" if count == 1 else f"seeds {first}..{last}"
            bound = (
                f"{self.prefix}{first_field} < {SEED_LIMIT}"
                if count_field is None
                else f"{self.prefix}{first_field} + {self.prefix}{count_field} <= {SEED_LIMIT}"
            )
            self.fail(
                first_field,
                f"{shown} go{'es' if count == 1 else ''} past 2**32 - 1: seeds are uint32 "
                f"PRNG keys, so seed 2**32 + s would repeat seed s; keep {bound}.",
            )
        return first, count

    def output_folder(self, field: str, path) -> pathlib.Path:
        """A folder the command may create or write into: not a file, and either existing
        and writable or creatable under its nearest existing ancestor."""
        path = self._path(field, path)
        if path.exists():
            if not path.is_dir():
                self.fail(field, f"{path} is a file, not a folder.")
            if not os.access(path, os.W_OK | os.X_OK):
                self.fail(field, f"cannot write into {path} (permission denied).")
            return path
        self._creatable(field, path)
        return path

    def output_file(self, field: str, path) -> pathlib.Path:
        """A file the command may write: not a folder, in a folder that exists and can be
        written or can be created."""
        path = self._path(field, path)
        if path.is_dir():
            self.fail(field, f"{path} is a folder; give the path of a file to write.")
        if path.exists() and not os.access(path, os.W_OK):
            self.fail(field, f"cannot write {path} (permission denied).")
        parent = path.parent
        if parent.exists():
            if not parent.is_dir():
                self.fail(field, f"{parent} is a file, not a folder.")
            if not os.access(parent, os.W_OK | os.X_OK):
                self.fail(field, f"cannot write into {parent} (permission denied).")
        else:
            self._creatable(field, parent)
        return path

    def _path(self, field: str, path) -> pathlib.Path:
        if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
            self.fail(field, f"must be a path, got {path!r}.")
        if "\0" in str(path):
            self.fail(field, f"{path!r} holds a NUL character.")
        path = pathlib.Path(path).absolute()
        for part in path.parts:
            if len(os.fsencode(part)) > 255:
                self.fail(field, f"{part[:40]!r}... is over 255 bytes: not a file name.")
        return path

    def _creatable(self, field: str, path: pathlib.Path) -> None:
        ancestor = path
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            self.fail(field, f"cannot create {path}: {ancestor} is a file, not a folder.")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            self.fail(field, f"cannot create {path}: {ancestor} is not writable.")


CONFIG = Fields("config.")
FLAGS = Fields("--")

fail = CONFIG.fail
get = CONFIG.get
check_int = CONFIG.int
check_real = CONFIG.real
check_choice = CONFIG.choice
check_name = CONFIG.name
section = CONFIG.section
section_error = CONFIG.section_error
check_seeds = CONFIG.seeds


def numeric_leaves(config, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted field, value) of every int or float leaf of a ConfigDict or dict (bools
    excluded): what a test feeds NaN, infinities and out-of-range integers."""
    items = config.items() if isinstance(config, Mapping) or hasattr(config, "items") else ()
    for key, value in items:
        field = f"{prefix}{key}"
        if hasattr(value, "items"):
            yield from numeric_leaves(value, f"{field}.")
        elif isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
            yield field, value


def bound_integers(config, exempt=(), prefix: Fields = CONFIG) -> None:
    """Refuses any integer leaf of ``config`` outside [-INT_LIMIT, INT_LIMIT], naming it:
    one pass that keeps a field added later (and checked nowhere else for size) from
    taking 2**64. ``exempt``: dotted fields with their own bound (seeds: below 2**32).

    Raises:
        ConfigError: naming the field.
    """
    for field, value in numeric_leaves(config):
        if field in exempt or not isinstance(value, numbers.Integral):
            continue
        if not -INT_LIMIT <= int(value) <= INT_LIMIT:
            prefix.fail(field, f"must lie in [-{INT_LIMIT}, {INT_LIMIT}], got {value}.")


def is_finite_number(value) -> bool:
    """A real (not a bool) with a finite value."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False

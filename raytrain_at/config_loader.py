"""The one reader of the project's YAML files: recipes, Tune search spaces, benchmark specs.

Every kind of file is read the same way: resolve a bundled name or a path, parse YAML, follow the
``base:`` chain (a file of the same kind, merged key by key under the file that names it), then
validate with a strict pydantic model whose first error becomes one line naming the file and the
key. Dotted names (``optim.lr``) are the one override syntax: ``--set optim.lr=5e-4`` on the
command line, ``fixed:`` keys in a space and a trial's sampled keys all become the same nested
dict, deep-merged into the recipe. Radii may be written as in papers (``4/255``) anywhere.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from raytrain_at.errors import UserError

Model = TypeVar("Model", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of every config section: an unknown key is an error, not a silent default, and
    every float is finite (``.inf``, ``inf`` or ``nan`` is refused naming the key: an infinite
    learning rate or radius would pass every bound and ruin a run hours later)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# --------------------------------------------------------------------------- values
def fraction_value(text: str) -> float:
    """``"4/255"`` or ``"0.5"`` as a float (papers write radii as fractions of 255).

    Raises:
        ValueError: not a number or a fraction.
    """
    try:
        return float(Fraction(text.strip()))
    except ZeroDivisionError:
        raise ValueError(f"{text!r} divides by zero") from None


def parse_radius(value: Any) -> Any:
    """A pydantic ``before`` hook: ``"4/255"`` becomes a float; anything else is left to the
    field's own validation (which then names the bad value)."""
    if isinstance(value, str) and "/" in value:
        try:
            return fraction_value(value)
        except ValueError:
            return value
    return value


# --------------------------------------------------------------------------- errors
def one_line(error: ValidationError, noun: str = "config key") -> str:
    """The first validation error as one line naming the key and the value.

    ``noun`` names what a location is: ``config key`` in a run config, ``field`` in a space or
    benchmark file. A check across keys has no location: its own message names the keys.
    """
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if not where:
        return message
    if first["type"] == "extra_forbidden":
        return f"unknown {noun} {where!r}"
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{noun} {where!r}: {message}{shown}"


def validate(model: type[Model], data: Mapping[str, Any], where: str = "",
             noun: str = "config key") -> Model:
    """``model.model_validate(data)``; a failure is a :class:`UserError` of one line, prefixed
    with ``where`` (e.g. the file) when given."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        line = one_line(exc, noun)
        raise UserError(f"{where}: {line}" if where else line) from None


# --------------------------------------------------------------------------- dotted keys
def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``, mapping by mapping (neither is changed)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def dotted_path(key: str, what: str) -> list[str]:
    """``"optim.lr"`` -> ``["optim", "lr"]``; ``what`` names the key's source in the error."""
    parts = key.split(".")
    if not key or any(not part for part in parts):
        raise UserError(f"{what} has an empty key")
    return parts


def nest(values: Mapping[str, Any], what: str = "override") -> dict[str, Any]:
    """Dotted keys as nested mappings: ``{"optim.lr": 1e-3}`` -> ``{"optim": {"lr": 1e-3}}``.

    Keys may already be nested (``{"optim": {"lr": ...}}``), so a Tune sample is accepted in
    either spelling; later keys win.
    """
    nested: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            value = nest(value, what)
        for part in reversed(dotted_path(str(key), f"{what} {key!r}")):
            value = {part: value}
        nested = deep_merge(nested, value)
    return nested


def flat_keys(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The leaves of nested mappings under dotted names (inverse of :func:`nest`)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(flat_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=5e-4"`` -> (["optim", "lr"], 0.0005); the value is read as YAML."""
    if "=" not in text:
        raise UserError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    path = dotted_path(key, f"override {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return path, value


def overrides_to_dict(overrides: list[str]) -> dict[str, Any]:
    """Command-line ``key=value`` overrides as one nested dict (later ones win)."""
    nested: dict[str, Any] = {}
    for text in overrides:
        path, value = parse_override(text)
        nested = deep_merge(nested, nest({".".join(path): value}))
    return nested


# --------------------------------------------------------------------------- files
@dataclass(frozen=True)
class FileKind:
    """One kind of YAML file the project ships, bundled in a package folder.

    Attributes:
        noun: how messages name one (``recipe``, ``search space``, ``benchmark``).
        folder: the package folder of the bundled files.
        listing: the end of the unknown-name message, given the bundled names.
        shape: what a file must hold, added to the "must be a mapping" message.
        hidden_prefix: bundled files that are only bases (``_imagenet``) are not listed.
    """

    noun: str
    folder: str
    listing: Callable[[list[str]], str]
    shape: str = ""
    hidden_prefix: str = "_"

    def bundled_dir(self) -> Path:
        """The bundled folder (package data: a regular ``pip install`` ships it)."""
        return Path(str(resources.files("raytrain_at").joinpath(self.folder)))

    def available(self) -> list[str]:
        """Names of the bundled files, without ``.yaml`` and without hidden bases."""
        return sorted(p.stem for p in self.bundled_dir().glob("*.yaml")
                      if not p.stem.startswith(self.hidden_prefix))

    def resolve(self, name_or_path: str | os.PathLike[str]) -> Path:
        """A file by path (``x.yaml``, ``dir/x``) or by bundled name (``x``, ``_base``).

        Raises:
            UserError: the path does not exist, or no bundled file has that name.
        """
        text = os.fspath(name_or_path)
        path = Path(text)
        if path.suffix in (".yaml", ".yml") or "/" in text or os.sep in text:
            if not path.is_file():
                raise UserError(f"{self.noun} file {text!r} does not exist")
            return path
        candidate = self.bundled_dir() / f"{text}.yaml"
        if not candidate.is_file():
            names = self.available()
            close = difflib.get_close_matches(text, names, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"unknown {self.noun} {text!r}{hint}; {self.listing(names)}")
        return candidate

    def read(self, name_or_path: str | os.PathLike[str]) -> tuple[dict[str, Any], Path]:
        """The file's mapping with its ``base:`` chain merged in, and the file's path."""
        path = self.resolve(name_or_path)
        return self._read(path, ()), path

    def chain(self, name_or_path: str | os.PathLike[str]) -> list[Path]:
        """The file and its ``base:`` chain, the file first (``[x.yaml, _table1.yaml,
        _imagenet.yaml]``).

        Raises:
            UserError: as :meth:`read` (a missing file or base, a loop, bad YAML).
        """
        paths = [self.resolve(name_or_path)]
        while True:
            data = self._load(paths[-1])
            base = data.get("base")
            if base is None:
                return paths
            parent = self.resolve(str(base))
            if parent.resolve() in {p.resolve() for p in paths}:
                raise UserError(f"{self.noun} {str(paths[-1])!r} inherits from itself")
            paths.append(parent)

    def _load(self, path: Path) -> dict[str, Any]:
        """One file's mapping, its ``base:`` key included."""
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"{self.noun} {str(path)!r} is not valid YAML: "
                            f"{str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise UserError(f"{self.noun} {str(path)!r} must be a mapping{self.shape}")
        return data

    def _read(self, path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
        if path.resolve() in seen:
            raise UserError(f"{self.noun} {str(path)!r} inherits from itself")
        data = self._load(path)
        base = data.pop("base", None)
        if base is None:
            return data
        parent = self.resolve(str(base))
        return deep_merge(self._read(parent, seen + (path.resolve(),)), data)


RECIPES = FileKind("recipe", "recipes", lambda names: "`raytrain-at recipes` lists them",
                   " of config sections")
SPACES = FileKind("search space", "tune_spaces",
                  lambda names: f"available: {', '.join(names)}",
                  " (description, recipe, fixed, search, metric, mode, scheduler, num_samples)")
FINETUNE_BENCHMARKS = FileKind("fine-tuning benchmark", "finetune_benchmarks",
                               lambda names: f"bundled: {', '.join(names)} (or give a YAML path)")

"""Reading a study file: bytes to TOML, with its `base` file merged in beneath it, then
the spec validated from it (spec.py)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from mnist_study.errors import SpecError
from mnist_study.study.spec import StudySpec, parse_raw


def load_spec(path: Path | str) -> StudySpec:
    """Read and validate a study file (and its base); any problem raises SpecError."""
    return parse_spec(read_spec_text(Path(path)), Path(path))


def parse_spec(text: str, path: Path) -> StudySpec:
    """A spec from its TOML text; a `base` is read relative to `path`'s folder."""
    return parse_raw(resolve_base(parse_toml(text, path), path, (path.resolve(),)), path)


def read_spec_text(path: Path) -> str:
    if path.is_dir():
        raise SpecError(f"{path}: is a folder; give an experiment file such as {path}/NAME.toml")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(
            f"{path}: no such experiment file (see experiments/ for examples)"
        ) from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        return data.decode("utf-8-sig")  # an editor's byte-order mark is harmless
    except UnicodeDecodeError as exc:
        raise SpecError(
            f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8 TOML"
        ) from None


def parse_toml(text: str, path: Path) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # Also catches a variant declared twice ("Cannot declare ... twice").
        raise SpecError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:
        raise SpecError(f"{path}: nested too deeply to be a study spec") from None


def resolve_base(raw: dict, path: Path, chain: tuple[Path, ...]) -> dict:
    """`raw` merged onto its base file, recursively. The base's `name` is not inherited:
    a derived spec is a study of its own (its file name, unless it sets `name`)."""
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base:
        raise SpecError(f"{path}: base = {base!r}; must be the file name of another spec")
    base_path = path.parent / base
    if base_path.resolve() in chain:
        raise SpecError(f"{path}: base = {base!r} leads back to itself")
    inherited = resolve_base(
        parse_toml(read_spec_text(base_path), base_path), base_path, (*chain, base_path.resolve())
    )
    inherited.pop("name", None)
    return merge(inherited, raw)


def merge(base: dict, changes: dict) -> dict:
    """Tables merge key by key; any other value in `changes` replaces the base's."""
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out

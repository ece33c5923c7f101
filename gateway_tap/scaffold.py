"""``gateway-tap new-collector`` / ``new-plugin``: a ready-to-install package for a plugin author.

The templates live in ``gateway_tap/templates/<kind>/`` (shipped as package data) and are
read with :mod:`importlib.resources`, so the scaffold works from an installed wheel. Every
file is named ``*.tmpl`` there (so the linters and the test runner leave the templates alone);
the suffix is dropped, ``__package__`` in a path becomes the import package, and the
``__NAME__``-style markers in the text are replaced.
"""

from __future__ import annotations

import keyword
import re
import sys
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Literal

from collectors.registry import BUILTINS
from gateway_tap import __version__

Kind = Literal["collector", "plugin"]
KINDS: tuple[Kind, ...] = ("collector", "plugin")
SUFFIX = ".tmpl"
# Names that would shadow what the scaffolded package imports at run time.
RESERVED = frozenset({"gateway_tap", "collectors", "schemas", "tests", "test"})
BUILTIN_COLLECTORS = frozenset(BUILTINS)
_VALID = re.compile(r"^[a-z][a-z0-9_]*$")


class ScaffoldError(ValueError):
    """The name is invalid or the target exists; the message says what to change."""


@dataclass(frozen=True)
class Names:
    """Every spelling of NAME the templates use."""

    kind: Kind
    name: str  # the entry point name, and the key under collectors: / the plugin's name:
    package: str  # import package
    dist: str  # distribution (pip) name
    cls: str  # the class

    def markers(self) -> dict[str, str]:
        return {"__NAME__": self.name, "__PACKAGE__": self.package, "__DIST__": self.dist, "__CLASS__": self.cls,
                "__GATEWAY_TAP_VERSION__": __version__, "__TITLE__": self.name.replace("_", " ").capitalize()}


def names_for(kind: Kind, raw: str) -> Names:
    """Validate NAME and derive the package, distribution and class names.

    NAME may use dashes; after turning them into underscores it must be a lower-case
    Python identifier that shadows neither the standard library nor gateway-tap itself.

    :raises ScaffoldError: naming what is wrong with NAME.
    """
    name = raw.strip().replace("-", "_")
    if not name.isidentifier() or not _VALID.match(name) or keyword.iskeyword(name):
        raise ScaffoldError(f"invalid name {raw!r}: use lower-case letters, digits, '-' or '_', starting with a "
                            "letter (it becomes a Python package name), e.g. 'audit-log'")
    if name in RESERVED or name in sys.stdlib_module_names:
        raise ScaffoldError(f"invalid name {raw!r}: the package {name!r} would shadow an existing module; "
                            "pick a more specific name")
    if kind == "collector" and name in BUILTIN_COLLECTORS:
        raise ScaffoldError(f"invalid name {raw!r}: {name!r} is a built-in collector, "
                            "`gateway-tap collect` would never pick the new one")
    suffix = "Collector" if kind == "collector" else "Plugin"
    cls = "".join(part.capitalize() for part in name.split("_") if part)
    if not cls.endswith(suffix):
        cls += suffix
    return Names(kind, name, name, name.replace("_", "-"), cls)


def _walk(root: Traversable, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Traversable]]:
    out = []
    for item in sorted(root.iterdir(), key=lambda t: t.name):
        if item.is_dir():
            out += _walk(item, (*prefix, item.name))
        elif item.name.endswith(SUFFIX):
            out.append(((*prefix, item.name[: -len(SUFFIX)]), item))
    return out


def template_files(kind: Kind) -> list[tuple[tuple[str, ...], Traversable]]:
    """The template of ``kind``: (relative path parts without the suffix, resource), in path order."""
    return _walk(files("gateway_tap") / "templates" / kind)


def render(text: str, names: Names) -> str:
    for marker, value in names.markers().items():
        text = text.replace(marker, value)
    return text


def scaffold(kind: Kind, raw_name: str, directory: Path | str = ".") -> tuple[Names, Path]:
    """Write a new ``kind`` package for NAME into ``directory/<dist name>``; returns its names and path.

    :raises ScaffoldError: NAME is invalid or the target directory already exists (nothing is overwritten).
    """
    names = names_for(kind, raw_name)
    target = Path(directory) / names.dist
    if target.exists():
        raise ScaffoldError(f"{target} already exists; remove it or choose another --dir or NAME")
    rendered = [(target.joinpath(*(names.package if p == "__package__" else p for p in parts)),
                 render(res.read_text(encoding="utf-8"), names)) for parts, res in template_files(kind)]
    if not rendered:
        raise ScaffoldError(f"no {kind} template found in the gateway_tap package (broken installation?)")
    for path, text in rendered:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return names, target


def next_steps(names: Names, target: Path) -> str:
    """What to run after scaffolding (printed by the CLI)."""
    if names.kind == "collector":
        run = (f"  gateway-tap collect {names.name} --config gateway-tap.yaml   "
               f"# settings under collectors.{names.name}")
    else:
        run = (f"  # attach it in gateway-tap.yaml:  plugins: [{{name: {names.name}, use: {names.name}}}]\n"
               "  gateway-tap serve --config gateway-tap.yaml")
    return (f"created {names.kind} package {names.dist} in {target}\n"
            f"  cd {target}\n"
            "  pip install -e '.[test]'\n"
            "  pytest\n"
            f"{run}\n"
            f"see {target / 'README.md'}")

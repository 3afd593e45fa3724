"""Imports go one way: ``stream`` at the bottom, ``learner`` and ``serving`` above it, ``sitn`` (the
composition root) on top. Every module's source is parsed with ``ast``, so imports inside functions,
``if TYPE_CHECKING:`` blocks and ``try:`` blocks count, and so do relative imports and
``importlib.import_module("...")`` / ``__import__("...")`` with a literal name.

``learner`` may import ``serving`` (it reuses ``serving.fused`` for the fused ranker it measures);
``serving`` may not import ``learner`` (a serving replica must not need PyTorch, see
``test_serving_no_torch``). Inside ``learner``, ``core`` (the model and one step of learning) is at the
bottom; ``online`` (the streaming loop) and ``offline`` (offline evaluation) import it, never each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("stream", "learner", "serving", "sitn")

# package -> the project packages (or subpackages) its modules must not import
FORBIDDEN = {
    "stream": ("learner", "serving", "sitn"),
    "learner": ("sitn",),
    "learner.core": ("learner.online", "learner.offline", "sitn"),
    "learner.online": ("learner.offline", "sitn"),
    "learner.offline": ("learner.online", "sitn"),
    "serving": ("learner", "sitn"),
}


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in ``source``, the source of ``module``.

    >>> src = "import os\\nfrom . import events\\ndef f():\\n    from sitn.errors import ConfigError\\n"
    >>> imported_modules(src, "stream.topics")
    [(1, 'os'), (2, 'stream.events'), (4, 'sitn.errors')]
    """
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.append((node.lineno, node.module or ""))
            else:  # relative: from .x import y, or from . import x (x may be a module)
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                if node.module:
                    found.append((node.lineno, f"{base}.{node.module}".lstrip(".")))
                else:
                    found.extend((node.lineno, f"{base}.{alias.name}".lstrip(".")) for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and _dynamic_import(node.func)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return sorted(found)


def _dynamic_import(func: ast.expr) -> bool:
    """``__import__``, ``import_module`` or ``importlib.import_module``."""
    if isinstance(func, ast.Name):
        return func.id in ("__import__", "import_module")
    return isinstance(func, ast.Attribute) and func.attr == "import_module"


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _within(name: str, package: str) -> bool:
    """``name`` is ``package`` or one of its modules.

    >>> _within("learner.online.trainer", "learner.online"), _within("learner.online_x", "learner.online")
    (True, False)
    """
    return name == package or name.startswith(f"{package}.")


def layer_violations(package: str) -> list[str]:
    """``path:line: imports module`` for every import of a package ``package`` must not import."""
    out = []
    for path in sorted((REPO / package.replace(".", "/")).rglob("*.py")):
        module, is_package = _module_name(path)
        for line, name in imported_modules(path.read_text(encoding="utf-8"), module, is_package):
            if any(_within(name, forbidden) for forbidden in FORBIDDEN[package]):
                out.append(f"{path.relative_to(REPO)}:{line}: imports {name}")
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_go_one_way(package: str) -> None:
    assert layer_violations(package) == [], (
        f"{package}/ must not import {', '.join(FORBIDDEN[package])}: imports go one way (sitn -> learner, "
        "serving -> stream; learner -> serving is allowed; learner.online and learner.offline -> learner.core). "
        "The errors and the metrics exporter every layer needs live in stream/errors.py and stream/exporter.py."
    )


def test_the_scan_sees_every_module_and_its_imports() -> None:
    """Guards against a check that passes because it read nothing: the allowed imports are found."""
    seen = {
        name.partition(".")[0]
        for package in FORBIDDEN
        for path in (REPO / package.replace(".", "/")).rglob("*.py")
        for _, name in imported_modules(path.read_text(encoding="utf-8"), *_module_name(path))
    }
    assert {"stream", "learner", "serving"} <= seen
    learner_imports = {
        name.rpartition(".")[0]
        for path in (REPO / "learner").rglob("*.py")
        for _, name in imported_modules(path.read_text(encoding="utf-8"), *_module_name(path))
    }
    assert {"learner.core", "learner.online", "learner.offline"} <= learner_imports


def test_the_source_contract_imports_no_implementation() -> None:
    """``stream.source`` is the contract: it imports no project module. The implementations import the
    contract, never the factory that chooses between them (``stream.source_factory``)."""
    def project_imports(module: str) -> set[str]:
        path = REPO / Path(*module.split(".")).with_suffix(".py")
        return {name for _, name in imported_modules(path.read_text(encoding="utf-8"), module)
                if name.partition(".")[0] in PACKAGES}

    assert project_imports("stream.source") == set()
    for implementation in ("stream.kafka_source", "stream.embedded_log"):
        imports = project_imports(implementation)
        assert "stream.source" in imports and "stream.source_factory" not in imports, (implementation, imports)
    assert {"stream.source", "stream.kafka_source", "stream.embedded_log"} <= project_imports("stream.source_factory")


def test_the_check_catches_imports_in_every_form() -> None:
    src = (
        "from __future__ import annotations\n"
        "import sitn.cli\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from learner.core.model import SITNModel\n"
        "class A:\n"
        "    def f(self):\n"
        "        from sitn import errors\n"
        "        return importlib.import_module('sitn.pipeline'), __import__('learner')\n"
        "from .. import sitn as s\n"
        "from ..learner import config\n"
    )
    assert imported_modules(src, "stream.events") == [
        (1, "__future__"),
        (2, "sitn.cli"),
        (3, "typing"),
        (5, "learner.core.model"),
        (8, "sitn"),
        (9, "learner"),
        (9, "sitn.pipeline"),
        (10, "sitn"),
        (11, "learner"),
    ]
    # a relative import inside a package's __init__ resolves against the package itself
    assert imported_modules("from .errors import SitnError\n", "stream", is_package=True) == [(1, "stream.errors")]

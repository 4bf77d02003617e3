"""What an installed copy needs, checked without building one: the package-data globs of
pyproject.toml ship every file the code loads from ``qeq_unroll/data``, every module lies in a
package the build finds, the library imports nothing but itself, the standard library and its
declared dependencies (no ``tests`` helpers), and the version is written in one place.

The checks on pyproject.toml need the checkout; run from a copy of ``tests/`` against an
installed wheel they are skipped and the version check still runs."""

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

import qeq_unroll
from calculators.cli import build_parser
from calculators.data import SHIPPED
from qeq_unroll.params import builtin_sets

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("qeq_unroll", "calculators")
needs_checkout = pytest.mark.skipif(
    not (ROOT / "pyproject.toml").is_file() or not (ROOT / "qeq_unroll").is_dir(),
    reason="checks pyproject.toml of the checkout; these tests run from a copy",
)


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def loaded_data_files() -> set[str]:
    """The files the code loads from the package, relative to ``qeq_unroll/``: the built-in
    parameter sets (``params.builtin_sets``) and the shipped reference data (``calculators.data``)."""
    return {f"data/{name}.json" for name in builtin_sets()} | {f"data/reference/{f}" for f in SHIPPED.values()}


def shipped_files(globs) -> set[str]:
    """The files of ``qeq_unroll/`` that package-data ``globs`` put into a wheel (setuptools globs
    them relative to the package directory)."""
    package = ROOT / "qeq_unroll"
    return {p.relative_to(package).as_posix() for g in globs for p in package.glob(g) if p.is_file()}


def missing_data(globs) -> list[str]:
    return sorted(loaded_data_files() - shipped_files(globs))


@needs_checkout
def test_package_data_ships_every_file_the_code_loads():
    globs = pyproject()["tool"]["setuptools"]["package-data"]["qeq_unroll"]
    assert loaded_data_files() and not missing_data(globs), (
        f"files the code loads but a wheel would lack: {missing_data(globs)}; add a glob to "
        f"[tool.setuptools.package-data] qeq_unroll = {globs} in pyproject.toml"
    )
    # the check can fail: without the glob of the reference data its files are missing
    assert missing_data([g for g in globs if "reference" not in g])


def library_modules():
    return [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py")) if "__pycache__" not in p.parts]


@needs_checkout
def test_every_module_is_in_a_package_the_build_finds():
    include = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    assert sorted(include) == sorted(f"{pkg}*" for pkg in PACKAGES)
    outside = [str(p.relative_to(ROOT)) for p in library_modules() if not (p.parent / "__init__.py").is_file()]
    assert not outside, f"modules in folders without __init__.py are left out of the wheel: {outside}"


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def undeclared_imports(dependencies) -> dict[str, str]:
    """``{top-level module: file}`` for every import of the library that is neither its own
    package, the standard library, nor provided by a distribution in ``dependencies`` (the
    requirement strings of pyproject.toml; a module that is not installed counts under its own name)."""
    declared = {_normalise(re.split(r"[\s<>=!~\[;]", d, maxsplit=1)[0]) for d in dependencies}
    provided_by = importlib.metadata.packages_distributions()
    found = {}
    for path in library_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for top in (n.split(".")[0] for n in names):
                if top in PACKAGES or top in sys.stdlib_module_names:
                    continue
                if not declared & {_normalise(d) for d in provided_by.get(top) or [top]}:  # not installed: its name
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


@needs_checkout
def test_library_imports_only_declared_dependencies():
    project = pyproject()["project"]
    optional = [d for extra in project.get("optional-dependencies", {}).values() for d in extra]
    dependencies = project["dependencies"] + optional  # an optional one is imported where it is used
    assert not undeclared_imports(dependencies), (
        f"imported by the library but in neither [project] dependencies nor an extra (or a test/example module): "
        f"{undeclared_imports(dependencies)}"
    )
    # the check can fail: without numpy declared, its imports are named
    assert "numpy" in undeclared_imports([d for d in dependencies if not d.startswith("numpy")])


@needs_checkout
def test_version_is_written_once():
    project = pyproject()["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "qeq_unroll.__version__"}


def test_installed_version_is_the_package_version(capsys):
    assert qeq_unroll.__version__ == importlib.metadata.version("qeq-unroll"), (
        "the installed metadata disagrees with qeq_unroll.__version__: reinstall (pip install -e .)"
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--version"])
    assert capsys.readouterr().out.strip() == f"qeq-unroll {qeq_unroll.__version__}"

"""Workspace rules (README.md, "Packages"): packages are complete, and imports only point down the graph."""

import ast
import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(p for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").exists())
TOOLS = ROOT / "tools"  # the cm-tools distribution (import cm_cli): the only place click may live


def _dist_and_import(pkg: Path) -> tuple[str, str]:
    return ("cm-tools", "cm_cli") if pkg == TOOLS else (pkg.name, pkg.name.replace("-", "_"))

# What each package may import among the workspace's own (the package graph in README.md).
ALLOWED = {
    "cm_kernels": set(),
    "cm_core": {"cm_kernels"},
    "cm_nets": {"cm_kernels"},
    "cm_train": {"cm_core", "cm_nets", "cm_kernels"},
    "cm_eval": {"cm_core", "cm_nets", "cm_kernels"},
    "cm_cli": {"cm_core", "cm_nets", "cm_kernels", "cm_train", "cm_eval"},
}
OWN = set(ALLOWED)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_there_are_packages():
    assert {p.name for p in PACKAGES} >= {"cm-core", "cm-kernels"}


@pytest.mark.parametrize("pkg", PACKAGES + [TOOLS], ids=lambda p: p.name)
def test_package_is_complete(pkg):
    meta = tomllib.loads((pkg / "pyproject.toml").read_text())["project"]
    dist, import_name = _dist_and_import(pkg)
    assert meta["name"] == dist
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["version"]), "static semantic version"
    assert any(d.startswith("torch>=") for d in meta["dependencies"]), "torch by range, never pinned"
    for f in ("README.md", "CHANGELOG.md"):
        assert (pkg / f).exists(), f"{pkg.name} lacks {f}"
    assert (pkg / "src" / import_name / "__init__.py").exists(), "src layout"
    tests = pkg / "tests"
    assert any(tests.glob("test_*.py")) and not (tests / "__init__.py").exists()


@pytest.mark.parametrize("pkg", PACKAGES + [TOOLS], ids=lambda p: p.name)
def test_imports_point_down_the_dag(pkg):
    import_name = _dist_and_import(pkg)[1]
    bad = []
    for path in (pkg / "src").rglob("*.py"):
        for name in _imports(path) & OWN - {import_name}:
            if name not in ALLOWED[import_name]:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "upward or sideways imports: " + "; ".join(bad)


@pytest.mark.parametrize("pkg", PACKAGES, ids=lambda p: p.name)
def test_libraries_do_not_parse_cli_or_exit(pkg):
    for path in (pkg / "src").rglob("*.py"):
        names = _imports(path)
        assert "click" not in names, f"{path}: only tools/ may import click"
        assert "sys.exit(" not in path.read_text(), f"{path}: libraries raise, never exit"


def test_tools_script_is_cm():
    meta = tomllib.loads((TOOLS / "pyproject.toml").read_text())["project"]
    assert meta["scripts"]["cm"] == "cm_cli.main:main"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = "CM_KERNELS_CUDA=1 bash scripts/install.sh && .venv/bin/python -m pytest --durations=15"
    assert command in readme and command in ci


def _versions() -> dict[str, str]:
    return {
        tomllib.loads((p / "pyproject.toml").read_text())["project"]["name"]: tomllib.loads(
            (p / "pyproject.toml").read_text()
        )["project"]["version"]
        for p in PACKAGES + [TOOLS]
    }


@pytest.mark.parametrize("pkg", PACKAGES + [TOOLS], ids=lambda p: p.name)
def test_sibling_ranges_admit_the_siblings_and_versions_agree(pkg):
    """A sibling range that excludes the sibling's own version breaks every fresh install."""
    from packaging.specifiers import SpecifierSet

    versions = _versions()
    project = tomllib.loads((pkg / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    for req in requirements:
        m = re.fullmatch(r"(cm-[a-z]+)\s*(?:\[[^\]]*\])?\s*([<>=!~].*)", req.split(";")[0].strip())
        if m:
            have = versions[m.group(1)]
            assert have in SpecifierSet(m.group(2)), f"{pkg.name}: {req} excludes {m.group(1)} {have}"
    dist, import_name = _dist_and_import(pkg)
    init = (pkg / "src" / import_name / "__init__.py").read_text()
    declared = re.search(r'__version__ = "([^"]+)"', init)
    assert declared and declared.group(1) == versions[dist], f"{import_name}.__version__ differs from pyproject"

"""Each package installs alone, with everything it needs (read statically: no package code runs).

Rules, over every ``*.py`` under ``packages/*/src`` and ``tools/src``:

1. Every absolute import that is not the standard library or the package itself (imports inside
   functions and ``try`` blocks included) maps, through ``IMPORT_TO_DIST``, to a distribution that
   the package's pyproject declares: in ``dependencies``, or in an extra other than ``test``/``dev``/
   ``docs``. An import name missing from the table fails, asking for a table entry.
2. An import whose distribution is only in an extra is guarded (inside a function, or in a ``try``
   that catches ImportError), and its install hint is spelled out: the strings of the ``except``
   clause name the distribution or ``<package>[<extra>]``; where that clause has no string of its
   own (a silent fallback, or a message built elsewhere), some non-docstring string of the module must.
3. Every hard dependency is imported somewhere in the package's ``src/``, or is justified in
   ``JUSTIFIED_HARD_DEPS``.
4. A sibling requirement with extras (``cm-eval[plots]``) names extras the sibling declares.
5. ``cm-tools``' hard requirements, followed through siblings and the extras they name, bring what
   ``cm demo`` needs (``DEMO_NEEDS``): a venv with only the six distributions runs the demo.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(p for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").exists())
TOOLS = ROOT / "tools"
ALL = PACKAGES + [TOOLS]

# Top-level import name (or a dotted prefix, longest wins) → distribution(s) that provide it.
IMPORT_TO_DIST: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "torch.utils.tensorboard": ("tensorboard",),
    "torchvision": ("torchvision",),
    "numpy": ("numpy",),
    "scipy": ("scipy",),
    "click": ("click",),
    "tqdm": ("tqdm",),
    "safetensors": ("safetensors",),
    "sklearn": ("scikit-learn",),
    "PIL": ("pillow",),
    "yaml": ("pyyaml",),
    "mpi4py": ("mpi4py",),
    "timm": ("timm",),
    "lpips": ("lpips",),
    "matplotlib": ("matplotlib",),
    "tensorboard": ("tensorboard",),
    "flash_attn": ("flash-attn",),
    "open_clip": ("open-clip-torch",),
    "pyarrow": ("pyarrow",),
    "xformers": ("xformers",),
    "diffusers": ("diffusers",),
    "transformers": ("transformers",),
    "peft": ("peft",),
    "accelerate": ("accelerate",),
    "huggingface_hub": ("huggingface-hub",),
    "einops": ("einops",),
    "packaging": ("packaging",),
    "h5py": ("h5py",),
    "pandas": ("pandas",),
    "imageio": ("imageio",),
    "skimage": ("scikit-image",),
    "cv2": ("opencv-python", "opencv-python-headless"),
    "wandb": ("wandb",),
    "pytest": ("pytest",),
    # the workspace's own packages
    "cm_kernels": ("cm-kernels",),
    "cm_core": ("cm-core",),
    "cm_nets": ("cm-nets",),
    "cm_train": ("cm-train",),
    "cm_eval": ("cm-eval",),
    "cm_cli": ("cm-tools",),
}

# Extras that exist for developers; they do not satisfy an import in src/.
DEV_EXTRAS = {"test", "tests", "dev", "docs", "lint"}

# Hard dependencies that src/ never imports, and why each is still needed.
JUSTIFIED_HARD_DEPS: dict[tuple[str, str], str] = {}  # (dist, dependency) → why it is needed without an import

# What `cm demo` needs beyond torch and the workspace: the digits data (cm_train.data, cm_eval's
# digits classifier) and the report's plots (cm_eval.plot_curves / plot_image_panels).
DEMO_NEEDS = {"scikit-learn", "matplotlib"}


def _dist(pkg: Path) -> str:
    return "cm-tools" if pkg == TOOLS else pkg.name


def _own_import(pkg: Path) -> str:
    return "cm_cli" if pkg == TOOLS else pkg.name.replace("-", "_")


def _project(pkg: Path) -> dict:
    return tomllib.loads((pkg / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _requirements(project: dict) -> tuple[list[Requirement], dict[str, list[Requirement]]]:
    hard = [Requirement(r) for r in project.get("dependencies", [])]
    extras = {
        canonicalize_name(e): [Requirement(r) for r in reqs]
        for e, reqs in project.get("optional-dependencies", {}).items()
    }
    return hard, extras


def _dists_for(module: str) -> tuple[str, ...] | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in IMPORT_TO_DIST:
            return IMPORT_TO_DIST[".".join(parts[:n])]
    return None


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    caught = handler.type
    if caught is None:
        return True
    names = caught.elts if isinstance(caught, ast.Tuple) else [caught]
    wide = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}
    return any(isinstance(n, ast.Name) and n.id in wide for n in names)


def _strings(nodes, skip: set[int] = frozenset()) -> list[str]:
    out = []
    for node in nodes:
        for n in ast.walk(node):
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip:
                out.append(n.value)
    return out


def _docstring_ids(tree: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


class _Import:
    """One import statement: the module, where it is, and what guards it."""

    def __init__(self, module, node, in_function, try_handlers):
        self.module, self.line = module, node.lineno
        self.in_function = in_function
        self.try_handlers = try_handlers  # except clauses (catching ImportError) of enclosing try blocks

    @property
    def guarded(self) -> bool:
        return self.in_function or bool(self.try_handlers)


def _imports(tree: ast.Module) -> list[_Import]:
    found = []

    def visit(node, in_function, handlers):
        for field, value in ast.iter_fields(node):
            children = value if isinstance(value, list) else [value]
            for child in children:
                if not isinstance(child, ast.AST):
                    continue
                inner_fn = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                inner_handlers = handlers
                if isinstance(node, (ast.Try, getattr(ast, "TryStar", ast.Try))) and field == "body":
                    inner_handlers = handlers + [h for h in node.handlers if _catches_import_error(h)]
                modules = []
                if isinstance(child, ast.Import):
                    modules = [a.name for a in child.names]
                elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                    modules = [child.module]
                elif (  # importlib.import_module("name") / __import__("name") with a literal name
                    isinstance(child, ast.Call)
                    and (
                        (isinstance(child.func, ast.Attribute) and child.func.attr == "import_module")
                        or (isinstance(child.func, ast.Name) and child.func.id in ("import_module", "__import__"))
                    )
                    and child.args
                    and isinstance(child.args[0], ast.Constant)
                    and isinstance(child.args[0].value, str)
                    and not child.args[0].value.startswith(".")
                ):
                    modules = [child.args[0].value]
                found.extend(_Import(m, child, inner_fn, inner_handlers) for m in modules)
                visit(child, inner_fn, inner_handlers)

    visit(tree, False, [])
    return found


def _names(text: str, dist: str) -> bool:
    """Whether ``text`` names distribution ``dist`` (``-``/``_`` and case do not matter)."""
    norm = re.sub(r"[-_]+", "-", text.lower())
    return re.search(rf"(?<![\w-]){re.escape(canonicalize_name(dist))}(?![\w-])", norm) is not None


def _names_extra(text: str, owner: str, extras: list[str]) -> bool:
    norm = re.sub(r"[-_]+", "-", text.lower()).replace(" ", "")
    return any(re.search(rf"{re.escape(owner)}\[[^\]]*\b{re.escape(e)}\b[^\]]*\]", norm) for e in extras)


def _rel(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def _sources(pkg: Path):
    for path in sorted((pkg / "src").rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _problems(pkg: Path) -> list[str]:
    dist, own = _dist(pkg), _own_import(pkg)
    pyproject = _rel(pkg / "pyproject.toml")
    hard, extras = _requirements(_project(pkg))
    hard_names = {canonicalize_name(r.name) for r in hard}
    in_extra: dict[str, list[str]] = {}
    for extra, reqs in extras.items():
        if extra not in DEV_EXTRAS:
            for r in reqs:
                in_extra.setdefault(canonicalize_name(r.name), []).append(extra)
    problems, imported = [], set()
    for path, tree in _sources(pkg):
        rel = _rel(path)
        docstrings = _docstring_ids(tree)
        module_strings = _strings([tree], skip=docstrings)
        for imp in _imports(tree):
            top = imp.module.split(".")[0]
            if top in sys.stdlib_module_names or top == own:
                continue
            where = f"{rel}:{imp.line}: `{imp.module}`"
            candidates = _dists_for(imp.module)
            if candidates is None:
                problems.append(
                    f"{where}: unknown import name {top!r}; add it with its distribution name to "
                    "IMPORT_TO_DIST in tests/test_dependencies.py"
                )
                continue
            names = [canonicalize_name(c) for c in candidates]
            imported.update(names)
            if any(n in hard_names for n in names):
                continue
            declared = [n for n in names if n in in_extra]
            if not declared:
                problems.append(
                    f"{where}: {candidates[0]!r} is not declared; add it to [project] dependencies of {pyproject} "
                    f"(or to an extra, with the import guarded and `pip install '{dist}[<extra>]'` in its error)"
                )
                continue
            name, extra_names = declared[0], in_extra[declared[0]]
            hint = f"pip install '{dist}[{extra_names[0]}]'"
            if not imp.guarded:
                problems.append(
                    f"{where}: {name!r} is only in extra(s) {extra_names} of {pyproject} but is imported at "
                    f"module level; import it inside the function that needs it, or in a try/except ImportError "
                    f"that says `{hint}` (or make it a hard dependency)"
                )
                continue
            handler_strings = _strings([s for h in imp.try_handlers for s in h.body])
            strings = handler_strings or module_strings
            if not any(_names(s, name) or _names_extra(s, dist, extra_names) for s in strings):
                scope = "its `except ImportError` clause" if handler_strings else f"{rel.name}"
                problems.append(
                    f"{where}: {name!r} comes from extra(s) {extra_names} but no message in {scope} names "
                    f"{name!r} or {dist}[{extra_names[0]}]; raise ImportError(\"... {hint}\")"
                )
    for r in hard:
        name = canonicalize_name(r.name)
        if name in imported and (dist, name) in JUSTIFIED_HARD_DEPS:
            problems.append(f"JUSTIFIED_HARD_DEPS[{(dist, name)}] is stale: {dist} imports {name} now; drop the entry")
        if name not in imported and (dist, name) not in JUSTIFIED_HARD_DEPS:
            problems.append(
                f"{pyproject}: hard dependency {r.name!r} is never imported in src/; remove it, move it to an "
                "extra, or justify it in JUSTIFIED_HARD_DEPS in tests/test_dependencies.py"
            )
    return problems


@pytest.mark.parametrize("pkg", ALL, ids=lambda p: p.name)
def test_every_import_is_declared(pkg):
    problems = _problems(pkg)
    assert not problems, "\n" + "\n".join(problems)


def test_justifications_are_current():
    """A justification for a dependency that is gone is stale (one now imported directly is
    reported by test_every_import_is_declared)."""
    stale = []
    for (dist, name), why in JUSTIFIED_HARD_DEPS.items():
        pkg = next(p for p in ALL if _dist(p) == dist)
        hard, _ = _requirements(_project(pkg))
        if name not in {canonicalize_name(r.name) for r in hard}:
            stale.append(f"JUSTIFIED_HARD_DEPS[{(dist, name)}]: {dist} no longer depends on {name}; drop the entry")
    assert not stale, "\n" + "\n".join(stale)


def _siblings() -> dict[str, tuple[list[Requirement], dict[str, list[Requirement]]]]:
    return {canonicalize_name(_project(p)["name"]): _requirements(_project(p)) for p in ALL}


@pytest.mark.parametrize("pkg", ALL, ids=lambda p: p.name)
def test_sibling_extras_exist(pkg):
    """pip only warns about an unknown extra (`cm-eval[plot]`), and installs nothing for it."""
    siblings = _siblings()
    hard, extras = _requirements(_project(pkg))
    bad = []
    for r in hard + [r for reqs in extras.values() for r in reqs]:
        name = canonicalize_name(r.name)
        if name in siblings:
            for e in sorted(canonicalize_name(e) for e in r.extras):
                if e not in siblings[name][1]:
                    bad.append(f"{pkg.name}/pyproject.toml: {r} names extra {e!r}, which {name} does not declare")
    assert not bad, "\n" + "\n".join(bad)


def _installs(dist: str, extras=(), seen=None) -> set[str]:
    """Every distribution a plain `pip install <dist>[extras]` brings, following the workspace's own."""
    siblings = _siblings()
    seen = set() if seen is None else seen
    hard, declared = siblings[dist]
    reqs = list(hard) + [r for e in extras for r in declared.get(canonicalize_name(e), [])]
    out = set()
    for r in reqs:
        name = canonicalize_name(r.name)
        out.add(name)
        key = (name, tuple(sorted(r.extras)))
        if name in siblings and key not in seen:
            seen.add(key)
            out |= _installs(name, r.extras, seen)
    return out


def test_cm_tools_brings_what_cm_demo_needs():
    missing = DEMO_NEEDS - _installs("cm-tools")
    assert not missing, (
        f"tools/pyproject.toml: `cm demo` needs {sorted(missing)}; add them to cm-tools' dependencies "
        "(directly, or through a sibling extra such as cm-eval[plots])"
    )


# --- the checker itself, on made-up packages ---------------------------------------------------

_PYPROJECT = """
[project]
name = "cm-fake"
version = "0.1.0"
dependencies = ["torch>=2.4"]
[project.optional-dependencies]
plots = ["matplotlib"]
test = ["scipy"]
"""


def _fake(tmp_path, code: str, pyproject: str = _PYPROJECT) -> tuple[Path, list[str]]:
    pkg = tmp_path / "cm-fake"
    (pkg / "src" / "cm_fake").mkdir(parents=True)
    (pkg / "pyproject.toml").write_text(pyproject)
    (pkg / "src" / "cm_fake" / "__init__.py").write_text("import torch\n" + code)
    return pkg, _problems(pkg)


@pytest.mark.parametrize(
    "code",
    [
        "import os, json\nfrom cm_fake import x\n",
        "def f():\n    import matplotlib\n\nWHY = \"plots need pip install 'cm-fake[plots]'\"\n",
        "try:\n    import matplotlib.pyplot\nexcept ImportError as e:\n    raise ImportError('no matplotlib.') from e",
        "try:\n    import matplotlib\nexcept ImportError:\n    plt = None\n\nX = 'cm-fake[plots]'\n",
    ],
    ids=["stdlib-and-self", "function-guard", "try-guard", "silent-handler"],
)
def test_checker_accepts(tmp_path, code):
    assert _fake(tmp_path, code)[1] == []


@pytest.mark.parametrize(
    "code, expect",
    [
        ("import frobnicate\n", "unknown import name 'frobnicate'"),
        ("def f():\n    import sklearn.datasets\n", "'scikit-learn' is not declared"),
        ("def f():\n    import scipy\n", "'scipy' is not declared"),  # a test extra does not count
        ("import matplotlib\nX = 'pip install matplotlib'\n", "imported at module level"),
        ("def f():\n    import matplotlib\n", "no message in __init__.py names 'matplotlib'"),
        ('def f():\n    """Needs matplotlib."""\n    import matplotlib\n', "no message in __init__.py names"),
        (
            "try:\n    import matplotlib\nexcept ImportError:\n    raise ImportError('no plots')\n\nX = 'matplotlib'\n",
            "no message in its `except ImportError` clause names",
        ),
        ("import importlib\n\nimportlib.import_module('timm')\n", "'timm' is not declared"),
    ],
    ids=["unknown", "undeclared", "test-extra", "module-level", "no-hint", "docstring", "handler", "import_module"],
)
def test_checker_rejects(tmp_path, code, expect):
    problems = _fake(tmp_path, code)[1]
    assert len(problems) == 1 and expect in problems[0], problems


def test_checker_flags_an_unused_hard_dependency(tmp_path):
    pkg, problems = _fake(tmp_path, "", _PYPROJECT.replace('["torch>=2.4"]', '["torch>=2.4", "numpy"]'))
    assert problems == [
        f"{pkg / 'pyproject.toml'}: hard dependency 'numpy' is never imported in src/; remove it, move it to an "
        "extra, or justify it in JUSTIFIED_HARD_DEPS in tests/test_dependencies.py"
    ]

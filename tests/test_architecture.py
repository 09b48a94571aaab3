"""Imports point one way: backend -> model, consensus -> labeling_config (DESIGN.md)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> top-level modules it must never import
FORBIDDEN = {
    "labeling_config": {"model", "consensus", "backend", "torch", "flask", "sqlalchemy"},
    "model": {"consensus", "backend", "flask", "sqlalchemy"},
    "consensus": {"model", "backend", "torch", "torchvision", "flask", "label_studio_sdk"},
    "backend": set(),
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_point_one_way(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    for path in files:
        bad = _imports(path) & FORBIDDEN[package]
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


# The one module that reads settings from the environment, and the launcher protocol that is not a
# setting: torchrun hands each process its rank in WORLD_SIZE / LOCAL_RANK.
SETTINGS_MODULE = "backend/settings.py"
LAUNCHER_VARIABLES = {("model/multitask/train.py", "WORLD_SIZE"), ("model/multitask/train.py", "LOCAL_RANK")}


def _environment_reads(source: str) -> list[tuple[int, str]]:
    """``os.environ.get(NAME)``, ``os.environ[NAME]``, ``os.getenv(NAME)``: (line, NAME or '?')."""

    def is_os_environ(node: ast.AST) -> bool:
        return (
            isinstance(node, ast.Attribute)
            and node.attr == "environ"
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
        )

    def name_of(node: ast.AST | None) -> str:
        return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else "?"

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target, method = node.func.value, node.func.attr
            if (is_os_environ(target) and method == "get") or (
                method == "getenv" and isinstance(target, ast.Name) and target.id == "os"
            ):
                found.append((node.lineno, name_of(node.args[0] if node.args else None)))
        elif isinstance(node, ast.Subscript) and is_os_environ(node.value) and isinstance(node.ctx, ast.Load):
            found.append((node.lineno, name_of(node.slice)))
    return found


def test_settings_are_read_from_the_environment_in_one_place():
    """Copying the environment for a child process is fine; reading a setting out of it is not."""
    offenders = []
    for package in FORBIDDEN:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = str(path.relative_to(ROOT))
            if relative == SETTINGS_MODULE:
                continue
            for line, name in _environment_reads(path.read_text()):
                if (relative, name) not in LAUNCHER_VARIABLES:
                    offenders.append(f"{relative}:{line} reads {name}")
    assert not offenders, "read these through backend.settings.Settings: " + "; ".join(offenders)
    planted = (
        'import os\na = os.environ.get("A")\nb = os.environ["B"]\nc = os.getenv("C")\nd = {**os.environ}\n'
    )
    assert [name for _, name in _environment_reads(planted)] == ["A", "B", "C"]  # the check can fail


def test_serve_imports_neither_the_demo_nor_the_synthetic_generator():
    """What `dermassist serve` loads: the service, not the demo, its Label Studio launcher or drawings."""
    import subprocess
    import sys

    probe = (
        "import sys; import backend.server, backend.api.app, backend.cli, backend.training.jobs, "
        "backend.training.retrain; "
        "print(sorted(m for m in sys.modules if m.startswith(('backend.demo', 'model.synthetic'))))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def _module_name(path: Path) -> str:
    """``model/lesion/dual.py`` -> ``model.lesion.dual``; a package's ``__init__.py`` is the package."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _model_imports(source: str) -> set[str]:
    """The ``model.*`` modules a source imports, lazy (function-level) imports included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "model" or node.module.startswith("model."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name == "model" or a.name.startswith("model."))
    return found


def _model_graph() -> dict[str, set[str]]:
    return {_module_name(p): _model_imports(p.read_text()) for p in sorted((ROOT / "model").rglob("*.py"))}


def test_model_modules_import_no_circle():
    """Inside model/ (its sub-packages included), module imports (lazy ones included) form no cycle."""
    graph = _model_graph()
    assert "model.lesion.dual" in graph and "model.common.checkpoint" in graph  # nested packages are read

    def cycle_from(start: str, node: str, seen: tuple[str, ...]) -> tuple[str, ...] | None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                return (*seen, nxt)
            if nxt not in seen:
                found = cycle_from(start, nxt, (*seen, nxt))
                if found:
                    return found
        return None

    cycles = [c for name in graph if (c := cycle_from(name, name, (name,)))]
    assert not cycles, cycles[0]


# Inside model/: what each part may import of model/ itself. The common part serves both systems and
# the synthetic generator and imports none of them; the two published systems never import each
# other; synthetic dermoscopy builds on the common part only. (model/__init__.py and model/systems.py,
# the table of systems, sit above them all.)
MODEL_PARTS = {
    "model.common": {"model.common"},
    "model.multitask": {"model.common", "model.multitask"},
    "model.lesion": {"model.common", "model.lesion"},
    "model.synthetic": {"model.common", "model.synthetic"},
}


def _direction_violations(module: str, imports: set[str]) -> list[str]:
    """The imports of ``module`` that leave what its part of model/ may import."""
    part = next((p for p in MODEL_PARTS if module == p or module.startswith(p + ".")), None)
    if part is None:
        return []
    allowed = MODEL_PARTS[part]
    return sorted(
        f"{module} imports {name}"
        for name in imports
        if (name == "model" or name.startswith("model."))
        and not any(name == a or name.startswith(a + ".") for a in allowed)
    )


def test_model_parts_import_one_way():
    """model.common imports no system, the two systems not each other, model.synthetic only model.common."""
    offenders = [
        v for module, imports in _model_graph().items() for v in _direction_violations(module, imports)
    ]
    assert not offenders, "; ".join(offenders)
    planted = "def lazy():\n    from model.multitask.network import DermNet\n    import model.synthetic\n"
    assert _direction_violations("model.lesion.dual", _model_imports(planted)) == [
        "model.lesion.dual imports model.multitask.network",
        "model.lesion.dual imports model.synthetic",
    ]  # the check can fail, lazy imports included
    assert _direction_violations("model.common.data", {"model.lesion"}) == [
        "model.common.data imports model.lesion"
    ]
    assert _direction_violations("model.synthetic.study", {"model.common.data", "labeling_config"}) == []


def test_the_routes_run_no_sql():
    """backend/api/ calls repositories (consensus/repository.py) and services; it builds no query."""
    builders = {"select", "insert", "update", "delete", "func", "text"}
    for path in sorted((ROOT / "backend" / "api").glob("*.py")):
        imported = {
            alias.name
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) and node.module == "sqlalchemy"
            for alias in node.names
        }
        assert not imported & builders, f"{path.name} imports {sorted(imported & builders)}"


def _project_imports(source: str, package: str) -> set[str]:
    """The ``package.*`` modules a source imports (lazy ones included); ``from package import x`` is
    ``package.x``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == package:
                found.update(f"{package}.{a.name}" for a in node.names)
            elif node.module.startswith(package + "."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(package + "."))
    return found


def _layer_violations(layers: list[set[str]], module: str, imports: set[str]) -> list[str]:
    """Imports of ``module`` that reach its own layer's neighbours or a layer above it (``layers``:
    lowest first; a module may import its own sub-modules and anything in a lower layer)."""

    def layer_of(name: str) -> tuple[int, str] | None:
        for i, layer in enumerate(layers):
            for unit in layer:
                if name == unit or name.startswith(unit + "."):
                    return i, unit
        return None

    own = layer_of(module)
    if own is None:
        return []
    found = []
    for name in sorted(imports):
        other = layer_of(name)
        if other is not None and other[1] != own[1] and other[0] >= own[0]:
            found.append(f"{module} imports {name}")
    return found


# backend/'s rooms, lowest first: each imports only rooms below it. Label Studio's formats and client
# know nothing of the service; images use Label Studio's auth; collection stores what LS sends; the
# serving core runs models; training runs jobs with the serving core; the HTTP boundary (api) calls
# them all; the demo and the CLI sit on top.
BACKEND_LAYERS = [
    {"backend.settings"},
    {"backend.metrics"},
    {"backend.label_studio"},
    {"backend.images"},
    {"backend.collection"},
    {"backend.serving"},
    {"backend.training"},
    {"backend.bundle"},
    {"backend.api"},
    {"backend.server"},
    {"backend.demo"},
    {"backend.cli"},
]
# consensus/: the estimators are pure (numpy / pandas), choosing among them above them, the store below the repository (its only
# queries), region fusion reads the repository's rows, the service joins estimators to the store, the
# region export reads a run's regions, the study export reads runs (and may show the regions).
CONSENSUS_LAYERS = [
    {"consensus._validate"},
    {
        "consensus.agreement",
        "consensus.dawid_skene",
        "consensus.staple",
        "consensus.exposure",
        "consensus.groups",
        "consensus.adjudication",
    },
    {"consensus.selection", "consensus.adaptive"},
    {"consensus.db", "consensus.models"},
    {"consensus.repository"},
    {"consensus.regions"},
    {"consensus.service", "consensus.region_export"},
    {"consensus.export"},
]


@pytest.mark.parametrize(
    ("package", "layers"), [("backend", BACKEND_LAYERS), ("consensus", CONSENSUS_LAYERS)]
)
def test_imports_inside_a_package_point_down(package, layers):
    modules = [p for p in sorted((ROOT / package).rglob("*.py")) if "migrations" not in p.parts]
    named = {_module_name(p) for p in modules}
    unplaced = sorted(
        m
        for m in named
        if m != package and not any(m == u or m.startswith(u + ".") for layer in layers for u in layer)
    )
    assert not unplaced, f"place these modules in a layer: {unplaced}"
    offenders = [
        v
        for p in modules
        for v in _layer_violations(layers, _module_name(p), _project_imports(p.read_text(), package))
    ]
    assert not offenders, "; ".join(offenders)
    # The check can fail: a lower layer reaching up, a layer's neighbours reaching each other.
    assert _layer_violations(BACKEND_LAYERS, "backend.serving.predict", {"backend.api.state"}) == [
        "backend.serving.predict imports backend.api.state"
    ]
    assert _layer_violations(CONSENSUS_LAYERS, "consensus.staple", {"consensus.dawid_skene"}) == [
        "consensus.staple imports consensus.dawid_skene"
    ]
    assert _layer_violations(BACKEND_LAYERS, "backend.api.app", {"backend.serving.holder"}) == []

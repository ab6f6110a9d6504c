"""The import directions docs/architecture.md allows, and no import cycle between modules.

Every `import`/`from ... import` in src/openpi_rl counts: at module level, inside functions and
under `TYPE_CHECKING` alike (a lazy import is still a dependency). And the tests use public API
only: no `x._name` in tests/ outside `self`/`cls`."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

TESTS = pathlib.Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
PKG = SRC / "openpi_rl"

LEAVES = {"secret", "config_file"}
BASE = {"rl", "replay", "client"} | LEAVES
SEAMS = {"models", "weights", "guards", "sdnotify", "logs", "curves"}
ROLES = {"policy_server", "reward_bridge", "daemon", "train", "eval"}
ALLOWED: dict[str, set[str]] = {
    "secret": set(),
    "config_file": {"secret"},
    "rl": LEAVES,
    "replay": LEAVES | {"client"},
    "models": LEAVES | {"rl"},
    "weights": LEAVES | {"rl", "models", "client"},
    "guards": LEAVES,
    "sdnotify": LEAVES | {"client"},
    "logs": LEAVES,
    "curves": LEAVES,
    **{role: SEAMS | BASE for role in ROLES},
    "service": ROLES | SEAMS | BASE,
    "demo": {"service"} | ROLES | SEAMS | BASE,
    "cli": {"service", "demo"} | ROLES | SEAMS | BASE,
    "openpi_rl": {"service", "demo", "cli"} | ROLES | SEAMS | BASE,
}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports (`from pkg import submodule` is the submodule)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - node.level + 1]
                    base = ".".join([*pkg, base] if base else pkg)
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    for a in node.names
                ]
            else:
                continue
            deps |= {t for t in targets if t.split(".")[0] in ("openpi_rl", "openpi_rl_client")}
        graph[name] = deps - {name}
    return graph


def _package(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "openpi_rl_client":
        return "client"
    return parts[1] if len(parts) > 1 else "openpi_rl"


def test_every_import_goes_a_way_the_architecture_allows():
    graph = _imports(_modules())
    forbidden = sorted(
        f"{m} -> {d}"
        for m, deps in graph.items()
        for d in deps
        if _package(d) != _package(m) and _package(d) not in ALLOWED[_package(m)]
    )
    assert not forbidden, "imports docs/architecture.md does not allow:\n" + "\n".join(forbidden)
    assert set(ALLOWED) >= {_package(m) for m in graph}, "a package the map does not know"


def test_no_import_cycle_between_modules():
    graph = _imports(_modules())
    graph = {m: {d for d in deps if d in graph} for m, deps in graph.items()}
    # Tarjan's strongly connected components; a component of two or more is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_policy_server_loads_no_training_code():
    """`openpi-rl serve` imports neither gymnasium (gym tasks) nor the trainer, and none of
    our modules imports rich (progress bars): flax (`flax.linen.summary`) loads rich itself."""
    code = """
import builtins, sys
importers = set()
real = builtins.__import__
def spy(name, globals=None, *args, **kwargs):
    if name.split(".")[0] == "rich":
        importers.add((globals or {}).get("__name__", "?"))
    return real(name, globals, *args, **kwargs)
builtins.__import__ = spy
import openpi_rl.policy_server.serve
loaded = sorted(m for m in ("gymnasium", "openpi_rl.train") if m in sys.modules)
print(loaded, sorted(m for m in importers if m.startswith("openpi_rl")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] []", out.stdout


# Third-party internals with no public alternative: file (under tests/) -> (names, why).
PRIVATE_ALLOWED: dict[str, tuple[set[str], str]] = {
    "fixtures/openpi_pi0_fast/make_pipeline_golden.py": (
        {"_sample_actions"},
        "openpi's Policy jits sample_actions with no static argument; the script re-jits it",
    ),
    "fixtures/tokenizers/make_fixtures.py": (
        {"_tokenizer"},
        "tokenizers' ByteLevelBPETokenizer trains with a custom alphabet only via its Tokenizer",
    ),
    "fixtures/tokenizers/make_openpi_golden.py": (
        {"_paligemma_tokenizer", "_fast_tokenizer", "_act_tokens_to_paligemma_tokens"},
        "openpi's FASTTokenizer keeps the steps its golden ids come from private",
    ),
}


def _private_uses(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, code) of each `x._name` (read or write; `getattr(x, "_name")` too) where `x` is
    not `self`/`cls` and `_name` is not a dunder."""

    def private(name: str) -> bool:
        return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))

    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                out.append((node.lineno, node.attr, ast.unparse(node)))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and private(node.args[1].value)
        ):
            out.append((node.lineno, node.args[1].value, ast.unparse(node)))
    return out


def test_tests_use_public_api_only():
    """A test that reads or sets another object's `_name` pins an implementation detail: use
    (or add) a public accessor. Third-party internals without one are listed above."""
    found = []
    for path in sorted(TESTS.rglob("*.py")):
        rel = path.relative_to(TESTS).as_posix()
        allowed = PRIVATE_ALLOWED.get(rel, (set(), ""))[0]
        for line, name, code in _private_uses(ast.parse(path.read_text(), str(path))):
            if name not in allowed:
                found.append(f"tests/{rel}:{line}: {code}")
    assert not found, "private names used in tests:\n" + "\n".join(found)

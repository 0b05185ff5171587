"""The launcher's imports run one way: from the entry points down to the leaves, with no cycle.

LAYERS is the one place the layers are named (README's code map describes them). A module may
import from its own layer and the layers below it, never from a layer above; no two modules, and
no two packages, import each other in a circle (imports inside functions count: they run too).
"""

import ast
from pathlib import Path
from typing import Dict, List, Set

REPO = Path(__file__).resolve().parents[2]

# Top to bottom. A module belongs to the first entry that is it or a package above it.
LAYERS: Dict[str, List[str]] = {
    "entry points": ["launcher.cli", "launcher.jobs", "launcher.sweep", "hydra_plugins"],  # sft, sft-jobs, the search
    "service": ["launcher.service", "launcher.facts", "launcher.run_state"],  # prepare/create runs; what a run is doing
    "launch": ["launcher.backends"],  # local ranks, Slurm jobs and every Slurm command
    "rank": ["launcher.rank", "launcher.harness", "launcher.trainer", "launcher.optim", "launcher.sequence_parallel", "launcher.moe", "launcher.trial"],  # what each rank runs
    "run": [  # what a run is made of: config checks, the plan, data, model, checkpoints, tracking
        "launcher.validate", "launcher.plan", "launcher.plan_report", "launcher.model_info", "launcher.data",
        "launcher.bundled", "launcher.resume", "launcher.checkpoint", "launcher.universal", "launcher.export",
        "launcher.loss", "launcher.attention", "launcher.ops", "launcher.tracking", "launcher.log_window",
        "launcher.rendezvous", "launcher.overrides", "launcher.schema", "launcher.harness_tasks",
    ],
    "base": [  # leaves: the run directory, atomic files, signals, errors and exit codes, devices
        "launcher.rundir", "launcher.metrics", "launcher.atomic", "launcher.secret_mask", "launcher.signals",
        "launcher.errors", "launcher.exit_codes", "launcher.devices", "launcher.caches", "launcher.snapshot",
        "launcher.rank_env", "launcher.harness_results", "launcher",
    ],
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> Dict[str, Path]:
    files = [*(REPO / "launcher").rglob("*.py"), *(REPO / "hydra_plugins").rglob("*.py")]
    return {module_name(p): p for p in files if "__pycache__" not in p.parts}


def imports_of(name: str, path: Path, modules: Dict[str, Path]) -> Set[str]:
    """The project modules `name` imports, wherever in the file the import statement is."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def layer_of(name: str) -> int:
    owners = [(len(prefix), rank) for rank, members in enumerate(LAYERS.values()) for prefix in members
              if name == prefix or name.startswith(prefix + ".")]
    assert owners, f"{name} is in no layer: add it to LAYERS in {Path(__file__).name}"
    return max(owners)[1]


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def import_graph() -> Dict[str, Set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_layer_and_imports_only_its_own_or_lower_layers():
    names = list(LAYERS)
    upward = [f"{a} ({names[layer_of(a)]}) imports {b} ({names[layer_of(b)]})"
              for a, targets in import_graph().items() for b in sorted(targets) if layer_of(b) < layer_of(a)]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_no_module_and_no_package_imports_itself_in_a_circle():
    graph = import_graph()
    assert cycles(graph) == []
    packages: Dict[str, Set[str]] = {}
    for a, targets in graph.items():
        pa = ".".join(a.split(".")[:2])
        packages.setdefault(pa, set()).update(".".join(b.split(".")[:2]) for b in targets)
        packages[pa].discard(pa)
    assert cycles(packages) == []


def test_the_checker_sees_a_cycle_and_an_upward_import():
    """The two tests above cannot pass vacuously: the same functions flag a made-up violation."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("launcher.cli") < layer_of("launcher.service") < layer_of("launcher.backends") < layer_of("launcher.rundir")
    graph = import_graph()
    assert "launcher.service" in graph["launcher.cli"] and "launcher.rundir" in graph["launcher.trainer"]

"""Imports go one way: a lower layer never imports a higher one (docs/architecture.md).

Every import in the package's source is read, function-level ones included (a lazy import is
still a dependency), so a layer cannot reach up even where it would only do so at run time."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCES = {"rlhf": "speechrl.rlhf", "rewards": "speechrl.rewards", "rollouts": "speechrl.rollouts",
           "data": "speechrl.data"}
# lowest first; a module belongs to the layer of its longest matching prefix
LAYERS = [
    ("core", ("speechrl.rlhf.core", "speechrl.rlhf")),
    ("model", ("speechrl.rlhf.model", "speechrl.rlhf.algos")),
    ("rollouts/rewards/data", ("speechrl.rollouts", "speechrl.rewards", "speechrl.data")),
    ("modes", ("speechrl.rlhf.modes",)),
    ("trainers/workers", ("speechrl.rlhf.trainers", "speechrl.rlhf.workers")),
    ("cli", ("speechrl.rlhf.cli",)),
]


def layer_of(module: str) -> int | None:
    best, level = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, level = len(p), i
    return level


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO)
    parts = [SOURCES[rel.parts[0]], *rel.parts[1:]]
    parts[-1] = parts[-1][:-3]
    return ".".join(p for p in parts if p != "__init__")


def imported(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            out += [(node.lineno, f"{base}.{a.name}" if layer_of(f"{base}.{a.name}") is not None
                     and base in {m for _, ps in LAYERS for m in ps} else base) for a in node.names]
    return [(line, name) for line, name in out if name.startswith("speechrl.")]


def sources() -> list[Path]:
    return sorted(p for top in SOURCES for p in (REPO / top).rglob("*.py"))


def test_the_layers_cover_every_module():
    assert sources(), "no source files found"
    for path in sources():
        assert layer_of(module_name(path)) is not None, f"{path} is in no layer"


def test_no_module_imports_a_higher_layer():
    upward = []
    for path in sources():
        module = module_name(path)
        own = layer_of(module)
        tree = ast.parse(path.read_text(), str(path))
        for line, name in sorted(set(imported(tree, module, path.name == "__init__.py"))):
            target = layer_of(name)
            if target is not None and target > own:
                upward.append(f"{path.relative_to(REPO)}:{line} ({LAYERS[own][0]}) imports {name} "
                              f"({LAYERS[target][0]})")
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


@pytest.mark.parametrize("module,layer", [("speechrl.rlhf.core.config", "core"), ("speechrl.rlhf", "core"),
                                          ("speechrl.rlhf.model.backbone", "model"),
                                          ("speechrl.rewards.asr", "rollouts/rewards/data"),
                                          ("speechrl.rlhf.modes.asr", "modes"), ("speechrl.rlhf.cli.main", "cli")])
def test_layer_of(module, layer):
    assert LAYERS[layer_of(module)][0] == layer

"""The package's layers import one way: no module imports from a layer above its own (README's layout
table states the order), and no module grows past 400 lines."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "replay_megatron"
# low to high; a module may import its own layer and those below
LAYERS = [
    {"atomic_io", "run_dir", "mcore_compat", "models.presets", "optim.registry"},  # ground floor: no project imports
    {"config"},
    {"platform"},
    {"models", "ops"},
    {"data", "replay"},
    {"optim"},
    {"training"},
    {"evaluation"},
    {"runs"},
    {"reporting"},
    {"demo"},
    {"cli", "__main__", "__init__"},
]
MAX_LINES = 400


def _layer(module: str) -> int:
    """The layer of a dotted module name below replay_megatron (the longest listed prefix decides)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        for i, names in enumerate(LAYERS):
            if ".".join(parts[:n]) in names:
                return i
    raise AssertionError(f"replay_megatron.{module} is in no layer of tests/test_layering.py")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and (node.module + ".").startswith("replay_megatron."):
            names = [node.module] if node.module != "replay_megatron" else [f"replay_megatron.{a.name}"
                                                                             for a in node.names]
            found.update(names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("replay_megatron."))
    return {name.split(".", 1)[1] for name in found}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        yield ".".join(p for p in rel.parts if p != "__init__") or "__init__", path


def test_no_module_imports_from_a_layer_above_its_own():
    upward = [f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
              for module, path in _modules() for target in sorted(_imports(path))
              if _layer(target) > _layer(module)]
    assert not upward, "\n".join(upward)


def test_ground_floor_modules_import_nothing_from_the_project():
    for module, path in _modules():
        if module in LAYERS[0]:
            assert not _imports(path), f"{module} imports {_imports(path)}"


def test_no_module_over_the_line_limit():
    long = {str(path.relative_to(PACKAGE)): n for _, path in _modules()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long

"""The package's layout: layers point one way (no import circles, not even inside functions),
and no module grows past ~500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"imageprompt": "imageprompt", "imageprompt.pipelines": "pipelines", "imageprompt.demo": "demo",
           "imageprompt.checkpoints": "checkpoints"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """Modules of ours that ``path`` imports anywhere (type-checking-only imports left out)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in
                   ast.unparse(node.test) for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known}
    return out


def test_no_import_circles():
    mods = modules()
    graph = {name: imports(path, set(mods)) - {name} for name, path in mods.items()}
    state, stack, circles = {}, [], []

    def visit(name):
        state[name] = "open"
        stack.append(name)
        for other in graph[name]:
            if state.get(other) == "open":
                circles.append(" -> ".join(stack[stack.index(other):] + [other]))
            elif other not in state:
                visit(other)
        stack.pop()
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name)
    assert len(mods) > 50 and not circles, circles


def test_the_library_does_not_import_the_layers_above_it():
    mods = modules()
    above = ("imageprompt.cli", "imageprompt.demo", "imageprompt.jobs", "imageprompt.bench", "imageprompt.world")
    support = ("imageprompt.pipelines", "imageprompt.__main__")  # __main__: the CLI
    core = [name for name in mods if not name.startswith((*above, *support))]
    for name in core:
        wrong = {m for m in imports(mods[name], set(mods)) if m.startswith((*above, "imageprompt.pipelines"))}
        assert not wrong, f"{name} imports {sorted(wrong)}"


def test_the_tiny_model_builders_do_not_import_the_world():
    """imageprompt.testing(_xl) are library code: the tokenizer writer they need is imageprompt.tokenizer_writer."""
    import subprocess
    import sys

    code = ("import sys, imageprompt.testing, imageprompt.testing_xl; "
            "print(sorted(m for m in sys.modules if m.startswith('imageprompt.world')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    from imageprompt.tokenizer_writer import write_clip_tokenizer
    from imageprompt.world.tokenizer import write_clip_tokenizer as world_writer

    assert world_writer is write_clip_tokenizer  # the world's users keep their import


def test_the_other_front_ends_do_not_import_the_command_line():
    mods = modules()
    fronts = ("imageprompt.demo", "imageprompt.jobs", "imageprompt.world", "imageprompt.bench")
    for name in (n for n in mods if n.startswith(fronts)):
        cli = {m for m in imports(mods[name], set(mods)) if m.startswith("imageprompt.cli")}
        assert not cli, f"{name} imports {sorted(cli)}"


def test_no_module_is_over_500_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > 500}
    assert not long, long

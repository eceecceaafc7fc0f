"""The shape of the code: one import namespace, layers that import only downwards, no loops.

The layers (docs/architecture.md): the shared base (`lookout_edge`'s own modules: protocol,
package format and graph contract, compile target, shared memory); the middle (agent, client,
trainer, components), which import the base; the top (cli), which may import everything.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.namespace import SUBPACKAGE_FOLDERS

from .conftest import ROOT, RunningAgent, lookout_edge_command, make_image

PACKAGE = ROOT / "lookout_edge"
BASE = "base"
LAYER = {BASE: 0, "agent": 1, "client": 1, "trainer": 1, "components": 1, "cli": 2}


def folder_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYER else BASE


def module_files() -> dict[str, Path]:
    """Every module of the installed namespace, by dotted name, through the folder symlinks."""
    modules = {}
    for directory, _, files in os.walk(PACKAGE, followlinks=True):
        for file in files:
            if file.endswith(".py"):
                relative = (Path(directory) / file).relative_to(ROOT).with_suffix("")
                parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
                modules[".".join(parts)] = Path(directory) / file
    return modules


def imported_modules(module: str, path: Path) -> set[str]:
    """The project modules `module` imports, at the top or inside functions."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
    return {name for name in found if name.split(".")[0] in ("lookout_edge", *SUBPACKAGE_FOLDERS, "tests")}


def test_every_import_goes_through_the_one_namespace_and_downwards() -> None:
    modules = module_files()
    assert {"lookout_edge.agent.server", "lookout_edge.cli.main", "lookout_edge.contract"} <= set(modules)
    wrong = []
    edges: dict[str, set[str]] = {}
    for module, path in modules.items():
        for target in imported_modules(module, path):
            if not target.startswith("lookout_edge"):
                wrong.append(f"{module} imports {target}: import it as part of lookout_edge, never bare")
                continue
            source_folder, target_folder = folder_of(module), folder_of(target)
            if LAYER[target_folder] > LAYER[source_folder]:
                wrong.append(f"{module} ({source_folder}) imports {target} ({target_folder}), a higher layer")
            if source_folder != target_folder:
                edges.setdefault(source_folder, set()).add(target_folder)
    assert not wrong, "\n".join(wrong)
    assert not _cycle(edges), f"import loop between folders: {_cycle(edges)}"


def _cycle(edges: dict[str, set[str]]) -> list[str]:
    """A loop in the folder graph, or [] when there is none."""

    def visit(node: str, trail: list[str]) -> list[str]:
        if node in trail:
            return [*trail[trail.index(node) :], node]
        for following in sorted(edges.get(node, ())):
            loop = visit(following, [*trail, node])
            if loop:
                return loop
        return []

    return next((loop for loop in (visit(node, []) for node in sorted(edges)) if loop), [])


def test_the_layer_check_finds_a_loop() -> None:
    assert _cycle({"agent": {"client"}, "client": {"agent"}}) == ["agent", "client", "agent"]
    assert _cycle({"cli": {"agent", BASE}, "agent": {BASE}}) == []


def _shadowing_directory(tmp_path: Path) -> Path:
    """A working directory whose own client.py, agent.py, components.py and trainer/ would be
    imported instead of ours by any bare import; each refuses to load."""
    work = tmp_path / "work"
    (work / "trainer").mkdir(parents=True)
    for name in ("client.py", "agent.py", "components.py", "trainer/__init__.py"):
        (work / name).write_text(f"raise SystemExit('the working directory\\'s {name} was imported')\n")
    return work


def test_the_packages_import_beside_folders_of_the_same_names(tmp_path: Path) -> None:
    work = _shadowing_directory(tmp_path)
    code = (
        "import sys\n"
        "import lookout_edge.agent.server, lookout_edge.trainer.train, lookout_edge.client.camera.daemon\n"
        "import lookout_edge.components.build, lookout_edge.cli.main\n"
        f"bare = sorted(n for n in sys.modules if n.split('.')[0] in {SUBPACKAGE_FOLDERS!r})\n"
        "assert not bare, bare\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr


def test_the_command_serves_and_detects_beside_folders_of_the_same_names(
    agent: RunningAgent, tmp_path: Path
) -> None:
    work = _shadowing_directory(tmp_path)
    agent.start("seg")
    Image.fromarray(make_image(red=20)).save(work / "part.png")
    completed = subprocess.run(
        lookout_edge_command("detect", "part.png", "--model", "seg", "--shm", "--socket", agent.address),
        cwd=work,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert "ANOMALOUS" in completed.stdout

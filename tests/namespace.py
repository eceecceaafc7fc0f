"""The one import namespace, guarded: the repository's folders are importable only as
`lookout_edge.<name>` (docs/architecture.md). Imported by the tests' conftest and the wheel smoke."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUBPACKAGE_FOLDERS = ("agent", "cli", "client", "components", "recipes", "trainer")


class RefuseBareImports(importlib.abc.MetaPathFinder):
    """Fails any import of a repository folder under a bare top-level name (`import agent`):
    the same file would otherwise be loaded twice, as `agent.x` and `lookout_edge.agent.x`."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if path is None and name in SUBPACKAGE_FOLDERS:
            spec = importlib.machinery.PathFinder.find_spec(name)
            locations = list(spec.submodule_search_locations or []) if spec else []
            if any(Path(location).resolve().parent == ROOT for location in locations):
                raise ImportError(f"'{name}' imported under a bare name; import lookout_edge.{name} instead")


def refuse_bare_imports() -> None:
    """Install the guard in this process (once)."""
    if not any(isinstance(finder, RefuseBareImports) for finder in sys.meta_path):
        sys.meta_path.insert(0, RefuseBareImports())

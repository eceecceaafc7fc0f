"""A small stand-in for the Greengrass nucleus, to run built components' lifecycles in tests.

It does what the nucleus does with a local deployment, for the parts our recipes use:
resolves dependencies (dependencies start first), places artifacts under
`ROOT/packages/artifacts/NAME/VERSION/` and unpacks ZIP artifacts into
`ROOT/packages/artifacts-unarchived/NAME/VERSION/<archive name>/`, merges configuration
updates into each DefaultConfiguration, interpolates recipe variables exactly as the
nucleus's KernelConfigResolver does (containers become compact JSON with sorted keys, cross-
component references only for direct dependencies), and runs the lifecycle steps with
`sh -c` in the component's work folder, with the nucleus's default timeouts (Install and
Startup 120 s, Shutdown 15 s, Run none) unless the recipe sets one: Install, then Startup if
there is one, else Run. Output goes to
`ROOT/logs/NAME.log`. Removing a component runs its Shutdown, then stops its processes.

Not covered: privileges and users (everything runs as the test's user), Bootstrap, Recover,
Skipif, Setenv, IPC, S3 downloads, restarts on failure, and version negotiation.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import subprocess
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_TIMEOUTS = {"install": 120.0, "startup": 120.0, "shutdown": 15.0}
_SAME = re.compile(r"\{([.\w]+):([^:}]+)}")
_CROSS = re.compile(r"\{([.\w]+):([.\w]+):([^:}]+)}")
_ARCH = {"x86_64": "amd64", "aarch64": "aarch64"}[platform.machine()]


class LifecycleError(RuntimeError):
    """A lifecycle step that failed or timed out."""


def _get(mapping: dict[str, Any], key: str, default: Any = None) -> Any:
    """Recipe keys are case-insensitive."""
    for name, value in mapping.items():
        if name.lower() == key.lower():
            return value
    return default


def _merge(base: Any, update: Any) -> Any:
    if isinstance(base, dict) and isinstance(update, dict):
        return {**base, **{key: _merge(base.get(key), value) for key, value in update.items()}}
    return update


def _pointer(configuration: Any, pointer: str) -> str | None:
    node = configuration
    for part in pointer.split("/")[1:]:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, (dict, list)):
        return json.dumps(node, separators=(",", ":"), sort_keys=True)
    if isinstance(node, bool):
        return "true" if node else "false"
    return str(node)


@dataclass
class Component:
    recipe: dict[str, Any]
    configuration: dict[str, Any]
    manifest: dict[str, Any]
    run: subprocess.Popen[bytes] | None = None
    log: Any = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return str(_get(self.recipe, "ComponentName"))

    @property
    def version(self) -> str:
        return str(_get(self.recipe, "ComponentVersion"))

    @property
    def dependencies(self) -> list[str]:
        return list(_get(self.recipe, "ComponentDependencies", {}))


class Nucleus:
    def __init__(
        self,
        root: Path,
        recipes_dir: Path,
        artifacts_dir: Path,
        env: dict[str, str],
        thing_name: str = "test-thing",
    ) -> None:
        self.root = root
        self.thing_name = thing_name
        self.env = env
        self.artifacts_dir = artifacts_dir
        self.recipes = {}
        for path in recipes_dir.glob("*.json"):
            recipe = json.loads(path.read_text())
            self.recipes[_get(recipe, "ComponentName")] = recipe
        self.components: dict[str, Component] = {}

    def paths(self, name: str) -> dict[str, Path]:
        version = str(_get(self.recipes[name], "ComponentVersion"))
        return {
            "artifacts:path": self.root / "packages" / "artifacts" / name / version,
            "artifacts:decompressedPath": self.root / "packages" / "artifacts-unarchived" / name / version,
            "work:path": self.root / "work" / name,
        }

    def log_path(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    # --- deployment -------------------------------------------------------------------------

    def _order(self, roots: list[str]) -> list[str]:
        order: list[str] = []

        def visit(name: str, path: tuple[str, ...]) -> None:
            if name in path:
                raise LifecycleError(f"dependency cycle: {' -> '.join((*path, name))}")
            if name in order:
                return
            if name not in self.recipes:
                raise LifecycleError(f"no recipe for component {name}")
            for dependency in _get(self.recipes[name], "ComponentDependencies", {}):
                visit(dependency, (*path, name))
            order.append(name)

        for root in roots:
            visit(root, ())
        return order

    def _manifest(self, recipe: dict[str, Any]) -> dict[str, Any]:
        for manifest in _get(recipe, "Manifests"):
            wanted = _get(manifest, "Platform", {})
            if wanted.get("os", "linux") in ("linux", "*") and wanted.get("architecture", _ARCH) in (
                _ARCH,
                "*",
            ):
                return dict(manifest)
        raise LifecycleError(f"{_get(recipe, 'ComponentName')} has no manifest for linux/{_ARCH}")

    def _place_artifacts(self, component: Component) -> None:
        paths = self.paths(component.name)
        for directory in paths.values():
            directory.mkdir(parents=True, exist_ok=True)
        for artifact in _get(component.manifest, "Artifacts", []):
            filename = _get(artifact, "Uri").rsplit("/", 1)[-1]
            target = paths["artifacts:path"] / filename
            shutil.copy2(self.artifacts_dir / component.name / component.version / filename, target)
            if str(_get(artifact, "Unarchive", "NONE")).upper() == "ZIP":
                with zipfile.ZipFile(target) as archive:
                    archive.extractall(paths["artifacts:decompressedPath"] / Path(filename).stem)

    def interpolate(self, component: Component, text: str) -> str:
        def same(match: re.Match[str]) -> str:
            namespace, key = match.groups()
            if namespace == "configuration":
                value = _pointer(component.configuration, key)
            elif namespace == "iot" and key == "thingName":
                value = self.thing_name
            elif namespace == "kernel" and key == "rootPath":
                value = str(self.root)
            else:
                found = self.paths(component.name).get(f"{namespace}:{key}")
                value = None if found is None else str(found)
            return match.group(0) if value is None else value

        def cross(match: re.Match[str]) -> str:
            other, namespace, key = match.groups()
            if other not in component.dependencies or other not in self.components:
                return match.group(0)
            if namespace == "configuration":
                value = _pointer(self.components[other].configuration, key)
            else:
                found = self.paths(other).get(f"{namespace}:{key}")
                value = None if found is None else str(found)
            return match.group(0) if value is None else value

        return _CROSS.sub(cross, _SAME.sub(same, text))

    def _step(self, component: Component, step: str) -> tuple[str, float | None] | None:
        lifecycle = _get(component.manifest, "Lifecycle", {})
        value = _get(lifecycle, step)
        if value is None:
            return None
        if isinstance(value, str):
            script, timeout = value, DEFAULT_TIMEOUTS.get(step)
        else:
            unsupported = {key.lower() for key in value} - {"script", "timeout"}
            if unsupported:
                raise LifecycleError(
                    f"{component.name} {step}: {', '.join(sorted(unsupported))} not emulated"
                )
            script = _get(value, "Script")
            timeout = float(_get(value, "Timeout", DEFAULT_TIMEOUTS.get(step) or 0)) or None
        return self.interpolate(component, script), timeout

    def _spawn(self, component: Component, script: str) -> subprocess.Popen[bytes]:
        env = {**self.env, "AWS_IOT_THING_NAME": self.thing_name, "GGC_VERSION": "2.12.0"}
        return subprocess.Popen(
            ["sh", "-c", script],
            cwd=self.paths(component.name)["work:path"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=component.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _run_to_end(self, component: Component, step: str) -> None:
        found = self._step(component, step)
        if found is None:
            return
        script, timeout = found
        process = self._spawn(component, script)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process, grace=0)
            raise LifecycleError(f"{component.name} {step} timed out after {timeout} s") from None
        if code != 0:
            raise LifecycleError(
                f"{component.name} {step} exited with {code}; see {self.log_path(component.name)}"
            )

    def deploy(
        self, roots: list[str], configuration_updates: dict[str, dict[str, Any]] | None = None
    ) -> None:
        """Install and start `roots` and their dependencies, dependencies first."""
        updates = configuration_updates or {}
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        for name in self._order(roots):
            if name in self.components:
                continue
            recipe = self.recipes[name]
            defaults = _get(_get(recipe, "ComponentConfiguration", {}), "DefaultConfiguration", {})
            component = Component(recipe, _merge(defaults, updates.get(name, {})), self._manifest(recipe))
            component.log = self.log_path(name).open("ab")
            self.components[name] = component
            self._place_artifacts(component)
            self._run_to_end(component, "install")
            # As in the nucleus, a component has a Startup step or a Run step: Run is ignored
            # when there is a Startup.
            if self._step(component, "startup") is not None:
                self._run_to_end(component, "startup")
            else:
                found = self._step(component, "run")
                if found is not None:
                    component.run = self._spawn(component, found[0])

    def remove(self, name: str) -> None:
        """Stop a component as the nucleus does when a deployment drops it: Shutdown, then its processes."""
        component = self.components.pop(name)
        try:
            self._run_to_end(component, "shutdown")
        finally:
            if component.run is not None:
                _kill_group(component.run, grace=DEFAULT_TIMEOUTS["shutdown"])
            component.log.close()

    def crash_and_restart(self, name: str) -> None:
        """Kill a component's Run process as a crash would, then start Run again as the nucleus does."""
        component = self.components[name]
        if component.run is None:
            raise LifecycleError(f"{name} has no Run process")
        _kill_group(component.run, grace=0, first=signal.SIGKILL)
        found = self._step(component, "run")
        assert found is not None
        component.run = self._spawn(component, found[0])

    def stop_all(self) -> None:
        """Remove every component, dependents first."""
        for name in reversed(list(self.components)):
            self.remove(name)


def _kill_group(
    process: subprocess.Popen[bytes], grace: float, first: signal.Signals = signal.SIGTERM
) -> None:
    """Signal the step's process group (SIGTERM), then SIGKILL what is left after `grace` seconds."""
    for sig in (first, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    process.wait()

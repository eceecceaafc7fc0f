"""Rendering recipe templates and checking the result the way the nucleus will read it.

Templates in `recipes/` are YAML with build-time placeholders `@@NAME@@` (component version,
artifact location, dependency names). Rendering fills them in and adds each artifact's
SHA-256 digest, base64-encoded as the nucleus compares it. Checking covers what the recipe
schema cannot: recipe variables, cross-component references and artifact digests.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

SCHEMA_PATH = Path(__file__).with_name("recipe_schema.json")
TEMPLATES_DIR = Path(str(resources.files("lookout_edge") / "recipes"))
_PLACEHOLDER = re.compile(r"@@([A-Z_]+)@@")
# The nucleus interpolates `{namespace:key}` and `{component:namespace:key}` in lifecycle strings;
# a component name in a cross-component reference may hold only word characters and dots.
_VARIABLE = re.compile(r"\{([^{}\s]*:[^{}\s]*)\}")
_COMPONENT_REF = re.compile(r"^[.\w]+$")
_OWN_SYSTEM_VARIABLES = {
    "artifacts:path",
    "artifacts:decompressedPath",
    "work:path",
    "kernel:rootPath",
    "iot:thingName",
}
_DEPENDENCY_SYSTEM_VARIABLES = {"artifacts:path", "artifacts:decompressedPath", "work:path"}


class RecipeError(ValueError):
    """A template that cannot be rendered, or a recipe that would not deploy as intended."""


def artifact_digest(path: Path) -> str:
    """SHA-256 of a file, base64-encoded: the form of a recipe artifact's `Digest`."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return base64.b64encode(digest.digest()).decode("ascii")


def artifact_uri(bucket: str, prefix: str, name: str, version: str, filename: str) -> str:
    key = "/".join(part for part in (prefix.strip("/"), name, version, filename) if part)
    return f"s3://{bucket}/{key}"


def recipe_filename(name: str, version: str) -> str:
    return f"{name}-{version}.json"


def render(template: str, values: Mapping[str, str]) -> dict[str, Any]:
    """Fill a template's `@@NAME@@` placeholders and parse it."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(1) not in values:
            raise RecipeError(f"template placeholder @@{match.group(1)}@@ has no value")
        return values[match.group(1)]

    recipe: dict[str, Any] = yaml.safe_load(_PLACEHOLDER.sub(substitute, template))
    recipe["ComponentVersion"] = str(recipe["ComponentVersion"])
    return recipe


def attach_artifacts(recipe: dict[str, Any], artifacts_dir: Path, bucket: str, prefix: str) -> dict[str, Any]:
    """Turn each artifact's file name into its S3 URI and add the file's digest.

    The files must already be in `artifacts_dir/<name>/<version>/`.
    """
    name, version = recipe["ComponentName"], recipe["ComponentVersion"]
    for manifest in recipe["Manifests"]:
        for artifact in manifest.get("Artifacts", []):
            filename = artifact["Uri"]
            path = artifacts_dir / name / version / filename
            if not path.is_file():
                raise RecipeError(f"artifact {filename} of {name} {version} was not built: {path} is missing")
            artifact["Uri"] = artifact_uri(bucket, prefix, name, version, filename)
            artifact["Digest"] = artifact_digest(path)
            artifact["Algorithm"] = "SHA-256"
    return recipe


def load_template(filename: str) -> str:
    path = TEMPLATES_DIR / filename
    if not path.is_file():
        raise RecipeError(f"recipe template {path} not found: the lookout-edge installation is incomplete")
    return path.read_text(encoding="utf-8")


def write_recipe(recipe: dict[str, Any], recipes_dir: Path) -> Path:
    recipes_dir.mkdir(parents=True, exist_ok=True)
    path = recipes_dir / recipe_filename(recipe["ComponentName"], recipe["ComponentVersion"])
    path.write_text(json.dumps(recipe, indent=2) + "\n", encoding="utf-8")
    return path


def _lower_keys(value: Any) -> Any:
    """Recipe keys are case-insensitive; the schema spells them in lower case."""
    if isinstance(value, dict):
        return {str(key).lower(): _lower_keys(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_lower_keys(item) for item in value]
    return value


@cache
def _validator() -> Any:
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return jsonschema.Draft7Validator(schema)


def _lifecycle_strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _lifecycle_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _lifecycle_strings(item)


def _has_pointer(configuration: Any, pointer: str) -> bool:
    node = configuration
    for part in pointer.split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _check_variable(
    text: str, recipe: dict[str, Any], known_recipes: Mapping[str, dict[str, Any]]
) -> str | None:
    """Why a recipe variable would not be interpolated, or None when it would."""
    parts = text.split(":", 2)
    dependencies = recipe.get("ComponentDependencies", {})
    own_configuration = recipe.get("ComponentConfiguration", {}).get("DefaultConfiguration", {})
    if len(parts) == 2:
        if parts[0] == "configuration":
            if not _has_pointer(own_configuration, parts[1]):
                return f"{{{text}}} names no key of the component's DefaultConfiguration"
            return None
        return (
            None
            if text in _OWN_SYSTEM_VARIABLES
            else f"{{{text}}} is not a recipe variable the nucleus knows"
        )
    component, namespace, key = parts
    if not _COMPONENT_REF.match(component):
        return f"{{{text}}}: the nucleus interpolates only component names of letters, digits, '_' and '.'"
    if component not in dependencies:
        return f"{{{text}}} refers to {component}, which is not a direct dependency"
    if namespace == "configuration":
        other = known_recipes.get(component)
        if other is not None:
            configuration = other.get("ComponentConfiguration", {}).get("DefaultConfiguration", {})
            if not _has_pointer(configuration, key):
                return f"{{{text}}} names no key of {component}'s DefaultConfiguration"
        return None
    if f"{namespace}:{key}" not in _DEPENDENCY_SYSTEM_VARIABLES:
        return f"{{{text}}} is not a cross-component variable the nucleus knows"
    return None


def check_recipe(
    recipe: dict[str, Any], artifacts_dir: Path, known_recipes: Mapping[str, dict[str, Any]] | None = None
) -> list[str]:
    """Every problem with a rendered recipe: schema, recipe variables, dependencies, artifacts.

    `known_recipes` (by component name) lets cross-component configuration references be
    checked against the dependency's DefaultConfiguration.
    """
    problems = [
        f"schema: {'/'.join(str(p) for p in error.absolute_path) or '(top)'}: {error.message}"
        for error in _validator().iter_errors(_lower_keys(recipe))
    ]
    if problems:
        return problems
    known = known_recipes or {}
    name, version = recipe["ComponentName"], recipe["ComponentVersion"]
    lifecycles = [recipe.get("Lifecycle", {})] + [m.get("Lifecycle", {}) for m in recipe["Manifests"]]
    for lifecycle in lifecycles:
        steps = {str(step).lower() for step in lifecycle}
        if {"startup", "run"} <= steps:
            problems.append("a lifecycle has both Startup and Run: the nucleus runs only Startup")
    for text in _lifecycle_strings(lifecycles):
        for variable in _VARIABLE.findall(text):
            problem = _check_variable(variable, recipe, known)
            if problem:
                problems.append(problem)
    for manifest in recipe["Manifests"]:
        for artifact in manifest.get("Artifacts", []):
            uri = artifact["Uri"]
            path = artifacts_dir / name / version / uri.rsplit("/", 1)[-1]
            if not uri.startswith("s3://") or f"/{name}/{version}/" not in uri:
                problems.append(f"artifact URI {uri} is not s3://BUCKET/[PREFIX/]{name}/{version}/FILE")
            elif not path.is_file():
                problems.append(f"artifact {uri} has no built file {path}")
            elif artifact.get("Algorithm") != "SHA-256" or artifact.get("Digest") != artifact_digest(path):
                problems.append(f"artifact {uri}: Digest does not match the SHA-256 of {path}")
    return problems


def check_recipes(recipes_dir: Path, artifacts_dir: Path) -> dict[str, list[str]]:
    """Problems of every recipe in a build directory, by recipe file name (empty lists when sound)."""
    recipes = {
        path.name: json.loads(path.read_text(encoding="utf-8")) for path in sorted(recipes_dir.glob("*.json"))
    }
    by_name = {recipe["ComponentName"]: recipe for recipe in recipes.values()}
    return {filename: check_recipe(recipe, artifacts_dir, by_name) for filename, recipe in recipes.items()}

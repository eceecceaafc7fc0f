"""`lookout-edge package`: a model package turned into a Greengrass model component.

Writes `OUT/artifacts/NAME/VERSION/NAME.zip` (the package, its manifest naming the component
and recording the compile target) and `OUT/recipes/NAME-VERSION.json`, the layout of
`make components`. Every option is checked before anything is written, and the output
appears only once it is complete.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lookout_edge import __version__
from lookout_edge.package import MANIFEST_NAME, read_package, write_package

from .build import AGENT
from .recipes import RecipeError, attach_artifacts, check_recipe, load_template, recipe_filename, render
from .targets import Target

# Greengrass's component name rule; a leading dot would hide the package from the agent.
_COMPONENT_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")
# Semantic Versioning 2.0.0 (semver.org), which Greengrass component versions follow.
_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
_MODEL_VERSION = re.compile(r"[:/](\d+)$")


@dataclass(frozen=True)
class ModelComponent:
    name: str
    version: str
    recipe: Path
    artifact: Path


def default_version(model_arn: str) -> str:
    """The guide's default, from the model's version: `…:3` or `…/3` gives 3.0.0; otherwise 1.0.0."""
    match = _MODEL_VERSION.search(model_arn)
    return f"{int(match.group(1))}.0.0" if match else "1.0.0"


def check_name(name: str) -> None:
    if not _COMPONENT_NAME.match(name) or name in (".", ".."):
        raise ValueError(
            f"component name {name!r} is not valid: use up to 128 letters, digits, '.', '_' or '-', "
            "not starting with '.'"
        )


def check_version(version: str) -> None:
    if not _SEMVER.match(version):
        raise ValueError(
            f"component version {version!r} is not a semantic version: use major.minor.patch, e.g. 1.0.0"
        )


def _zip_directory(directory: Path, archive: Path) -> None:
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                bundle.write(path, path.relative_to(directory).as_posix())


def package_model(
    model_dir: Path,
    out: Path,
    name: str,
    target: Target,
    version: str | None = None,
    bucket: str = "BUCKET",
    prefix: str = "",
    description: str | None = None,
) -> ModelComponent:
    """Build the model component; raise ValueError (or PackageError) without writing on bad input."""
    check_name(name)
    package = read_package(model_dir)
    package.verify_files()
    version = version if version is not None else default_version(package.model_arn)
    check_version(version)
    recipe_path = out / "recipes" / recipe_filename(name, version)
    artifact_dir = out / "artifacts" / name / version
    if recipe_path.exists() or artifact_dir.exists():
        raise ValueError(
            f"component {name} version {version} already exists in {out}: "
            "choose another --component-version (a published version cannot be replaced)"
        )
    template = load_template("model.yaml")
    # The agent's recipe, to check the keys of its configuration the model's scripts read.
    agent = render(load_template(f"{AGENT}.yaml"), {"VERSION": __version__})

    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".package-", dir=out))
    try:
        manifest = json.loads((model_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
        for key in ("format_version", "model_file", "files"):
            manifest.pop(key)
        manifest["component_name"] = name
        manifest["target"] = target.to_manifest()
        files = {
            entry.path.relative_to(package.directory.resolve()).as_posix(): entry.path.read_bytes()
            for entry in package.files
        }
        model_file = package.model_file.path.relative_to(package.directory.resolve()).as_posix()
        renamed = write_package(staging / "package", manifest, files, model_file=model_file)
        staged_artifacts = staging / "artifacts"
        (staged_artifacts / name / version).mkdir(parents=True)
        _zip_directory(renamed, staged_artifacts / name / version / f"{name}.zip")

        platform = target.greengrass_platform()
        values = {
            "NAME": name,
            "VERSION": version,
            "AGENT": AGENT,
            "AGENT_VERSION": __version__,
            "OS": platform["os"],
            "ARCH": platform["architecture"],
        }
        recipe = attach_artifacts(render(template, values), staged_artifacts, bucket, prefix)
        recipe["ComponentDescription"] = (
            description or f"Model {name} ({package.model_type}) for the lookout-edge Edge Agent."
        )
        problems = check_recipe(recipe, staged_artifacts, {AGENT: agent})
        if problems:
            raise RecipeError(f"the recipe for {name} {version} would not deploy: " + "; ".join(problems))

        artifact_dir.parent.mkdir(parents=True, exist_ok=True)
        recipe_path.parent.mkdir(parents=True, exist_ok=True)
        staged_recipe = staging / recipe_path.name
        staged_recipe.write_text(json.dumps(recipe, indent=2) + "\n", encoding="utf-8")
        (staged_artifacts / name / version).rename(artifact_dir)
        staged_recipe.rename(recipe_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ModelComponent(name, version, recipe_path, artifact_dir / f"{name}.zip")

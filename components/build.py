"""`make components`: the agent, camera client and Custom Labels components, ready to publish.

    python -m lookout_edge.components.build --bucket BUCKET [--prefix PREFIX] [--out build/greengrass]
        [--offline x86_64 --offline aarch64 [--offline-python 3.10] [--offline-glibc 2.28]]
        [--camera-model MODEL:VERSION ...] [--example-client MODEL:VERSION --example-image IMAGE]

writes `OUT/artifacts/<name>/<version>/` (the project's wheel; with --offline, a ZIP of every
dependency wheel for each architecture, so devices without internet can install) and
`OUT/recipes/<name>-<version>.json` with the artifacts' S3 URIs and digests; with
--example-client, the example client component for a model component, too. Nothing is sent
to AWS. Every recipe is checked (schema, recipe variables, digests) before the command succeeds.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from lookout_edge import __version__

from .recipes import attach_artifacts, check_recipes, load_template, render, write_recipe

ROOT = Path(__file__).resolve().parent.parent
AGENT = "lookout_edge.EdgeAgent"
CAMERA_CLIENT = "lookout_edge.CameraClient"
EXAMPLE_CLIENT = "lookout_edge.ExampleClient"
CUSTOM_LABELS = "lookout_edge.CustomLabels"
WHEEL_NAME = f"lookout_edge-{__version__}-py3-none-any.whl"
# The pip platform tag of each Greengrass architecture, for offline bundles.
_BUNDLE_ARCHITECTURES = {"x86_64": "amd64", "aarch64": "aarch64"}
DEFAULT_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
DEFAULT_GLIBC = "2.28"
# The extras the camera client installs. An offline bundle carries what both components
# install: the agent's dependencies and these. The gpu and tensorrt extras are not bundled
# (see docs/greengrass.md).
CAMERA_CLIENT_EXTRAS = "camera,greengrass"


# What a wheel is not built from: setuptools' own build/ folder would carry modules since
# deleted from the checkout into the wheel.
_NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
)


def build_wheel(destination: Path) -> Path:
    """The project's wheel, built from a clean copy of this checkout with the installed
    setuptools (no download)."""
    destination.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "source"
        shutil.copytree(ROOT, source, symlinks=True, ignore=_NOT_SOURCES)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--quiet",
                "--no-deps",
                "--no-build-isolation",
                "--wheel-dir",
                scratch,
                str(source),
            ],
            check=True,
        )
        built = Path(scratch) / WHEEL_NAME
        if not built.is_file():
            raise RuntimeError(f"pip wheel did not produce {WHEEL_NAME}")
        return Path(shutil.copy2(built, destination / WHEEL_NAME))


def pip_platforms(arch: str, glibc: str) -> list[str]:
    """The manylinux tags a device with this architecture and glibc (e.g. 2.28) can install."""
    major, minor = (int(part) for part in glibc.split("."))
    if major != 2 or minor < 17:
        raise ValueError(f"glibc {glibc}: manylinux wheels need glibc 2.17 or newer")
    return [f"manylinux_2_{n}_{arch}" for n in range(minor, 16, -1)] + [f"manylinux2014_{arch}"]


def build_offline_bundle(wheel: Path, destination: Path, arch: str, python_version: str, glibc: str) -> Path:
    """A ZIP of every wheel the agent and the camera client need on devices of one architecture,
    Python version and glibc.

    pip downloads binary wheels only (`--only-binary=:all:`), so the bundle installs with
    `pip install --no-index` on a device without a compiler or internet access.
    """
    if arch not in _BUNDLE_ARCHITECTURES:
        raise ValueError(f"architecture {arch!r}: offline bundles are for {', '.join(_BUNDLE_ARCHITECTURES)}")
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:"]
        command += ["--dest", scratch, "--python-version", python_version]
        for tag in pip_platforms(arch, glibc):
            command += ["--platform", tag]
        subprocess.run([*command, f"{wheel}[{CAMERA_CLIENT_EXTRAS}]"], check=True)
        archive = destination / f"lookout-edge-wheels-{arch}.zip"
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as bundle:
            for path in sorted(Path(scratch).iterdir()):
                if path.name != wheel.name:
                    bundle.write(path, path.name)
    return archive


def build_components(
    out: Path,
    bucket: str,
    prefix: str = "",
    offline_archs: Sequence[str] = (),
    offline_python: str = DEFAULT_PYTHON,
    offline_glibc: str = DEFAULT_GLIBC,
    camera_models: Sequence[tuple[str, str]] = (),
) -> list[Path]:
    """Build the agent, camera client and Custom Labels endpoint components into `out`; return
    the recipes written.

    `camera_models` (name, version) become HARD dependencies of the camera client, so that
    Greengrass deploys those model components with it and starts it once their packages are in place.
    """
    artifacts = out / "artifacts"
    agent_dir = artifacts / AGENT / __version__
    # The other components install the same wheel, each from its own artifact folder.
    other_dirs = [artifacts / name / __version__ for name in (CAMERA_CLIENT, CUSTOM_LABELS)]
    for directory in (agent_dir, *other_dirs):
        shutil.rmtree(directory, ignore_errors=True)
    wheel = build_wheel(agent_dir)
    for directory in other_dirs:
        directory.mkdir(parents=True)
        shutil.copy2(wheel, directory / WHEEL_NAME)
    bundles = [
        build_offline_bundle(wheel, agent_dir, a, offline_python, offline_glibc) for a in offline_archs
    ]

    agent = render(load_template(f"{AGENT}.yaml"), {"VERSION": __version__})
    for manifest in agent["Manifests"]:
        for arch, bundle in zip(offline_archs, bundles, strict=True):
            if manifest["Platform"]["architecture"] == _BUNDLE_ARCHITECTURES[arch]:
                manifest["Artifacts"].append({"Uri": bundle.name, "Unarchive": "ZIP"})
    camera = render(
        load_template(f"{CAMERA_CLIENT}.yaml"), {"VERSION": __version__, "EXTRAS": CAMERA_CLIENT_EXTRAS}
    )
    for model, version in camera_models:
        camera["ComponentDependencies"][model] = {
            "VersionRequirement": f">={version}",
            "DependencyType": "HARD",
        }
    custom_labels = render(load_template(f"{CUSTOM_LABELS}.yaml"), {"VERSION": __version__})
    return [
        write_recipe(attach_artifacts(recipe, artifacts, bucket, prefix), out / "recipes")
        for recipe in (agent, camera, custom_labels)
    ]


def build_example_client(
    out: Path, model: str, model_version: str, image: Path, bucket: str, prefix: str = ""
) -> Path:
    """The example client component for one model component, inspecting `image`."""
    directory = out / "artifacts" / EXAMPLE_CLIENT / __version__
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    shutil.copy2(Path(__file__).with_name("example_client.py"), directory / "example_client.py")
    shutil.copy2(image, directory / image.name)
    values = {"VERSION": __version__, "MODEL": model, "MODEL_VERSION": model_version, "IMAGE": image.name}
    recipe = render(load_template(f"{EXAMPLE_CLIENT}.yaml"), values)
    return write_recipe(attach_artifacts(recipe, out / "artifacts", bucket, prefix), out / "recipes")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lookout_edge.components.build",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--bucket", required=True, help="S3 bucket the artifacts will be uploaded to")
    parser.add_argument("--prefix", default="", help="key prefix inside the bucket")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "greengrass", help="output directory")
    parser.add_argument(
        "--offline",
        action="append",
        default=[],
        choices=sorted(_BUNDLE_ARCHITECTURES),
        help="also bundle every dependency wheel for devices of this architecture (repeatable)",
    )
    parser.add_argument(
        "--offline-python",
        default=DEFAULT_PYTHON,
        help="the devices' Python for --offline (default %(default)s)",
    )
    parser.add_argument(
        "--offline-glibc",
        default=DEFAULT_GLIBC,
        help="the devices' glibc for --offline (default %(default)s)",
    )
    parser.add_argument(
        "--example-client",
        metavar="MODEL:VERSION",
        help="also build lookout_edge.ExampleClient for this model component",
    )
    parser.add_argument("--example-image", type=Path, help="the image the example client inspects")
    parser.add_argument(
        "--camera-model",
        action="append",
        default=[],
        metavar="MODEL:VERSION",
        help="a model component the camera client depends on (repeatable)",
    )
    args = parser.parse_args(argv)
    if bool(args.example_client) != bool(args.example_image) or ":" not in (args.example_client or ":"):
        parser.error("--example-client MODEL:VERSION and --example-image IMAGE go together")
    if any(":" not in item for item in args.camera_model):
        parser.error("--camera-model takes MODEL:VERSION")
    camera_models = [tuple(item.split(":", 1)) for item in args.camera_model]
    recipes = build_components(
        args.out,
        args.bucket,
        args.prefix,
        args.offline,
        args.offline_python,
        args.offline_glibc,
        camera_models,
    )
    if args.example_client:
        model, version = args.example_client.split(":", 1)
        recipes.append(
            build_example_client(args.out, model, version, args.example_image, args.bucket, args.prefix)
        )
    problems = check_recipes(args.out / "recipes", args.out / "artifacts")
    for recipe in recipes:
        print(f"{recipe}: {'; '.join(problems[recipe.name]) or 'ok'}")
    return 1 if any(problems[recipe.name] for recipe in recipes) else 0


if __name__ == "__main__":
    sys.exit(main())

"""`make components`: the agent and camera client components, ready to publish.

    python -m components.build --bucket BUCKET [--prefix PREFIX] [--out build/greengrass]
        [--offline-platform manylinux2014_x86_64 --offline-platform manylinux2014_aarch64
         --offline-python 3.10]

writes `OUT/artifacts/<name>/<version>/` (the project's wheel; with --offline-platform, a ZIP of
every dependency wheel for each platform, so devices without internet can install) and
`OUT/recipes/<name>-<version>.json` with the artifacts' S3 URIs and digests. Nothing is sent
to AWS. Every recipe is checked (schema, recipe variables, digests) before the command succeeds.
"""

from __future__ import annotations

import argparse
import platform
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
WHEEL_NAME = f"lookout_edge-{__version__}-py3-none-any.whl"
# The pip platform tag of each Greengrass architecture, for offline bundles.
_BUNDLE_ARCHITECTURES = {"x86_64": "amd64", "aarch64": "aarch64"}


def build_wheel(destination: Path) -> Path:
    """The project's wheel, built from this checkout with the installed setuptools (no download)."""
    destination.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
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
                str(ROOT),
            ],
            check=True,
        )
        built = Path(scratch) / WHEEL_NAME
        if not built.is_file():
            raise RuntimeError(f"pip wheel did not produce {WHEEL_NAME}")
        return Path(shutil.copy2(built, destination / WHEEL_NAME))


def build_offline_bundle(
    wheel: Path, destination: Path, pip_platform: str | None, python_version: str | None
) -> Path:
    """A ZIP of the wheel and every dependency wheel for one platform (this machine's by default).

    `pip_platform` is a pip platform tag such as manylinux2014_aarch64; with it, pip downloads
    binary wheels for that platform and `python_version` (e.g. 3.10), which must be the device's.
    """
    tag = pip_platform or platform.machine()
    arch = next((arch for arch in _BUNDLE_ARCHITECTURES if tag.endswith(arch)), None)
    if arch is None:
        raise ValueError(
            f"cannot tell the architecture of pip platform {tag!r}: use an x86_64 or aarch64 tag"
        )
    name = f"lookout-edge-wheels-{arch}"
    with tempfile.TemporaryDirectory() as scratch:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--only-binary=:all:",
            "--dest",
            scratch,
        ]
        if pip_platform:
            command += ["--platform", pip_platform]
        if python_version:
            command += ["--python-version", python_version]
        subprocess.run([*command, str(wheel)], check=True)
        archive = destination / f"{name}.zip"
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as bundle:
            for path in sorted(Path(scratch).iterdir()):
                bundle.write(path, path.name)
    return archive


def build_components(
    out: Path,
    bucket: str,
    prefix: str = "",
    offline_platforms: Sequence[str] = (),
    offline_python: str | None = None,
) -> list[Path]:
    """Build the agent and camera client components into `out`; return the recipes written."""
    artifacts = out / "artifacts"
    agent_dir = artifacts / AGENT / __version__
    camera_dir = artifacts / CAMERA_CLIENT / __version__
    for directory in (agent_dir, camera_dir):
        shutil.rmtree(directory, ignore_errors=True)
    wheel = build_wheel(agent_dir)
    camera_dir.mkdir(parents=True)
    shutil.copy2(wheel, camera_dir / WHEEL_NAME)
    bundles = [build_offline_bundle(wheel, agent_dir, p, offline_python) for p in offline_platforms]

    agent = render(load_template(f"{AGENT}.yaml"), {"VERSION": __version__})
    for manifest in agent["Manifests"]:
        for bundle in bundles:
            arch = bundle.stem.rsplit("-", 1)[-1]
            if manifest["Platform"]["architecture"] == _BUNDLE_ARCHITECTURES[arch]:
                manifest["Artifacts"].append({"Uri": bundle.name, "Unarchive": "ZIP"})
    camera = render(load_template(f"{CAMERA_CLIENT}.yaml"), {"VERSION": __version__})
    return [
        write_recipe(attach_artifacts(recipe, artifacts, bucket, prefix), out / "recipes")
        for recipe in (agent, camera)
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
        prog="python -m components.build",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--bucket", required=True, help="S3 bucket the artifacts will be uploaded to")
    parser.add_argument("--prefix", default="", help="key prefix inside the bucket")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "greengrass", help="output directory")
    parser.add_argument(
        "--offline-platform",
        action="append",
        default=[],
        metavar="PIP_PLATFORM",
        help="also bundle every dependency wheel for this pip platform (repeatable)",
    )
    parser.add_argument(
        "--offline-python", help="the devices' Python version for --offline-platform, e.g. 3.10"
    )
    args = parser.parse_args(argv)
    recipes = build_components(args.out, args.bucket, args.prefix, args.offline_platform, args.offline_python)
    problems = check_recipes(args.out / "recipes", args.out / "artifacts")
    for recipe in recipes:
        print(f"{recipe}: {'; '.join(problems[recipe.name]) or 'ok'}")
    return 1 if any(problems[recipe.name] for recipe in recipes) else 0


if __name__ == "__main__":
    sys.exit(main())

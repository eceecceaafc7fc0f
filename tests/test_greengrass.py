"""Greengrass components: built recipes pass every check, bad package options write nothing,
and the built agent, model and client components run their lifecycles as the nucleus would."""

from __future__ import annotations

import copy
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from lookout_edge import __version__
from lookout_edge.cli.main import main
from lookout_edge.client.edge_client import EdgeAgentClient
from lookout_edge.components.build import (
    AGENT,
    CAMERA_CLIENT,
    CUSTOM_LABELS,
    EXAMPLE_CLIENT,
    build_components,
    build_example_client,
    pip_platforms,
)
from lookout_edge.components.model import default_version
from lookout_edge.components.recipes import check_recipe, check_recipes
from lookout_edge.target import parse_target
from tests.sample_models import write_sample_package

from .conftest import HEIGHT, WIDTH, make_image, short_tmpdir
from .greengrass_nucleus import Nucleus

MODEL = "cookie-inspection"


@dataclass(frozen=True)
class Built:
    out: Path
    recipes: dict[str, dict]  # by component name

    def recipe(self, name: str) -> dict:
        return copy.deepcopy(self.recipes[name])


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """`make components`, `lookout-edge package` and the example client, into one output directory."""
    work = tmp_path_factory.mktemp("greengrass")
    out = work / "out"
    build_components(out, bucket="test-bucket", prefix="lookout-edge", camera_models=[(MODEL, "1.0.0")])
    write_sample_package(work / "model", "sample", WIDTH, HEIGHT)
    assert (
        main(
            [
                "package",
                str(work / "model"),
                "--component-name",
                MODEL,
                "--out",
                str(out),
                "--bucket",
                "test-bucket",
                "--prefix",
                "lookout-edge",
            ]
        )
        == 0
    )
    image = work / "defect.png"
    Image.fromarray(make_image(red=30)).save(image)
    build_example_client(out, MODEL, "1.0.0", image, bucket="test-bucket", prefix="lookout-edge")
    recipes = {}
    for path in (out / "recipes").glob("*.json"):
        recipe = json.loads(path.read_text())
        recipes[recipe["ComponentName"]] = recipe
    return Built(out, recipes)


def test_built_recipes_pass_the_schema_and_the_project_checks(built: Built) -> None:
    assert set(built.recipes) == {AGENT, CAMERA_CLIENT, CUSTOM_LABELS, EXAMPLE_CLIENT, MODEL}
    assert check_recipes(built.out / "recipes", built.out / "artifacts") == {
        f"{name}-{recipe['ComponentVersion']}.json": [] for name, recipe in built.recipes.items()
    }
    model = built.recipes[MODEL]
    assert model["ComponentDependencies"] == {
        AGENT: {"VersionRequirement": f">={__version__}", "DependencyType": "HARD"}
    }
    assert built.recipes[EXAMPLE_CLIENT]["ComponentDependencies"][MODEL]["DependencyType"] == "HARD"
    [artifact] = model["Manifests"][0]["Artifacts"]
    assert artifact["Uri"] == f"s3://test-bucket/lookout-edge/{MODEL}/1.0.0/{MODEL}.zip"
    agent_config = built.recipes[AGENT]["ComponentConfiguration"]["DefaultConfiguration"]
    assert agent_config["Socket"] == "unix:///tmp/aws.iot.lookoutvision.EdgeAgent.sock"
    platforms = [m["Platform"]["architecture"] for m in built.recipes[AGENT]["Manifests"]]
    assert platforms == ["amd64", "aarch64"]
    access = built.recipes[CAMERA_CLIENT]["ComponentConfiguration"]["DefaultConfiguration"]["accessControl"]
    assert set(access) == {"aws.greengrass.ipc.pubsub", "aws.greengrass.ipc.mqttproxy"}


def _problems(built: Built, recipe: dict) -> list[str]:
    return check_recipe(recipe, built.out / "artifacts", built.recipes)


def test_checks_catch_what_the_schema_cannot(built: Built) -> None:
    agent = built.recipe(AGENT)
    agent["Manifests"][0]["Lifecycle"]["Run"]["Script"] += " {configuration:/NoSuchKey} {artifacts:unpacked}"
    assert _problems(built, agent) == [
        "{configuration:/NoSuchKey} names no key of the component's DefaultConfiguration",
        "{artifacts:unpacked} is not a recipe variable the nucleus knows",
    ]

    model = built.recipe(MODEL)
    startup = model["Manifests"][0]["Lifecycle"]["Startup"]
    startup["Script"] += f" {{{CAMERA_CLIENT}:work:path}} {{{AGENT}:configuration:/ModelsDir}}"
    assert _problems(built, model) == [
        f"{{{CAMERA_CLIENT}:work:path}} refers to {CAMERA_CLIENT}, which is not a direct dependency",
        f"{{{AGENT}:configuration:/ModelsDir}} names no key of {AGENT}'s DefaultConfiguration",
    ]

    model = built.recipe(MODEL)
    artifact = model["Manifests"][0]["Artifacts"][0]
    artifact["Digest"] = artifact["Digest"][::-1]
    zip_path = built.out / "artifacts" / MODEL / "1.0.0" / f"{MODEL}.zip"
    assert _problems(built, model) == [
        f"artifact {artifact['Uri']}: Digest does not match the SHA-256 of {zip_path}"
    ]

    model = built.recipe(MODEL)
    model["Manifests"][0]["Lifecycle"]["Run"] = "sleep 1"
    assert _problems(built, model) == ["a lifecycle has both Startup and Run: the nucleus runs only Startup"]

    broken = built.recipe(MODEL)
    del broken["ComponentVersion"]
    broken["Manifests"][0]["Artifacts"][0]["Unarchive"] = "TAR"
    problems = _problems(built, broken)
    assert any("componentversion" in problem for problem in problems)
    assert any("unarchive" in problem for problem in problems)


def test_package_records_the_target_and_restricts_the_platform(tmp_path: Path) -> None:
    write_sample_package(tmp_path / "model", "sample", WIDTH, HEIGHT)
    options = '{"gpu-code": "sm_75", "trt-ver": "7.1.3", "cuda-ver": "10.2"}'
    code = main(
        [
            "package",
            str(tmp_path / "model"),
            "--component-name",
            "gpu_model",
            "--component-version",
            "0.2.0",
            "--target-platform",
            "LINUX/arm64/NVIDIA",
            "--compiler-options",
            options,
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    recipe = json.loads((tmp_path / "out" / "recipes" / "gpu_model-0.2.0.json").read_text())
    assert recipe["Manifests"][0]["Platform"] == {"os": "linux", "architecture": "aarch64"}
    with zipfile.ZipFile(tmp_path / "out" / "artifacts" / "gpu_model" / "0.2.0" / "gpu_model.zip") as archive:
        manifest = json.loads(archive.read("manifest.json"))
        assert sorted(archive.namelist()) == ["manifest.json", "model.onnx"]
    assert manifest["component_name"] == "gpu_model"
    assert manifest["target"] == {
        "platform": {"os": "linux", "arch": "aarch64", "accelerator": "NVIDIA"},
        "compiler_options": {"gpu-code": "sm_75", "trt-ver": "7.1.3", "cuda-ver": "10.2"},
    }
    # The agent reads the target to choose its backend.
    compiled_for = parse_target(manifest["target"], "manifest.json")
    assert (
        compiled_for.wants_gpu
        and compiled_for.compute_capability == (7, 5)
        and compiled_for.arch == "aarch64"
    )

    assert (
        main(
            [
                "package",
                str(tmp_path / "model"),
                "--component-name",
                "xavier",
                "--target-device",
                "jetson_xavier",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    with zipfile.ZipFile(tmp_path / "out" / "artifacts" / "xavier" / "1.0.0" / "xavier.zip") as archive:
        assert json.loads(archive.read("manifest.json"))["target"] == {"device": "jetson_xavier"}


def test_default_version_follows_the_model_version() -> None:
    assert default_version("arn:aws:lookoutvision:eu-west-1:123456789012:model/cookies/3") == "3.0.0"
    assert default_version("lookout-edge:cookies:12") == "12.0.0"
    assert default_version("lookout-edge:cookies") == "1.0.0"


BAD_OPTIONS = [
    (["--target-device", "jetson_nano"], "unknown target device 'jetson_nano'; known devices: jetson_xavier"),
    (["--target-device", "jetson_xavier", "--compiler-options", '{"mcpu": "x"}'], "a target device implies"),
    (["--target-platform", "windows/x86_64"], "target OS 'windows' is not supported"),
    (["--target-platform", "linux/riscv64"], "target architecture 'riscv64' is not supported"),
    (["--target-platform", "linux"], "must be OS/ARCH or OS/ARCH/ACCELERATOR"),
    (
        ["--target-platform", "linux/x86_64/nvidia", "--compiler-options", "{gpu-code: sm_75}"],
        "not valid JSON",
    ),
    (["--target-platform", "linux/x86_64", "--compiler-options", '["core-avx2"]'], "must be a JSON object"),
    (
        ["--target-platform", "linux/x86_64", "--compiler-options", '{"gpu-code": "sm_75"}'],
        "'gpu-code' does not apply to the cpu accelerator",
    ),
    (
        [
            "--target-platform",
            "linux/x86_64/nvidia",
            "--compiler-options",
            '{"gpu-code": "75", "trt-ver": "7.1.3", "cuda-ver": "10.2"}',
        ],
        "expected a GPU code such as sm_75",
    ),
    (
        ["--target-platform", "linux/x86_64/nvidia", "--compiler-options", '{"gpu-code": "sm_75"}'],
        "needs compiler options trt-ver, cuda-ver",
    ),
    (["--compiler-options", '{"mcpu": "core-avx2"}'], "compiler options go with a target platform"),
    (["--component-version", "1.0"], "'1.0' is not a semantic version"),
    (["--component-version", "01.0.0"], "'01.0.0' is not a semantic version"),
    (["--component-version", "v1.0.0"], "'v1.0.0' is not a semantic version"),
]


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS)
def test_bad_package_options_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], message: str
) -> None:
    write_sample_package(tmp_path / "model", "sample", WIDTH, HEIGHT)
    out = tmp_path / "out"
    assert (
        main(["package", str(tmp_path / "model"), "--component-name", "m", "--out", str(out), *options]) == 1
    )
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_bad_component_name_and_broken_model_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_sample_package(tmp_path / "model", "sample", WIDTH, HEIGHT)
    out = tmp_path / "out"
    assert main(["package", str(tmp_path / "model"), "--component-name", ".hidden", "--out", str(out)]) == 1
    assert "component name '.hidden' is not valid" in capsys.readouterr().err
    (tmp_path / "model" / "model.onnx").write_bytes(b"not the graph")
    assert main(["package", str(tmp_path / "model"), "--component-name", "m", "--out", str(out)]) == 1
    assert "manifest says" in capsys.readouterr().err
    assert not out.exists()


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def test_reusing_a_name_and_version_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_sample_package(tmp_path / "model", "sample", WIDTH, HEIGHT)
    out = tmp_path / "out"
    arguments = ["package", str(tmp_path / "model"), "--component-name", "m", "--out", str(out)]
    assert main(arguments) == 0
    before = _snapshot(out)
    assert main([*arguments, "--component-version", "1.0.0"]) == 1
    assert "component m version 1.0.0 already exists" in capsys.readouterr().err
    assert _snapshot(out) == before
    assert main([*arguments, "--component-version", "1.0.1"]) == 0


# Install only the wheel into the components' virtual environments; pip and the dependencies
# come from the test environment through PYTHONPATH (see the nucleus fixture).
LOCAL_INSTALL = {
    "PythonCommand": sys.executable,
    "VenvOptions": "--without-pip",
    "PipOptions": "--no-deps --no-index --ignore-installed --quiet",
}


@pytest.fixture
def nucleus(built: Built, tmp_path: Path) -> Iterator[Nucleus]:
    # The components' scripts run with this test environment's packages on PYTHONPATH, so that
    # the agent's virtual environment needs no download: its Install installs only the wheel.
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "PYTHONPATH": sysconfig.get_paths()["purelib"],
    }
    instance = Nucleus(tmp_path / "greengrass", built.out / "recipes", built.out / "artifacts", env)
    try:
        yield instance
    finally:
        instance.stop_all()


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
def test_components_run_their_lifecycles_as_the_nucleus_would(nucleus: Nucleus, built: Built) -> None:
    sock_dir = short_tmpdir()
    socket = f"unix://{sock_dir}/agent.sock"
    try:
        nucleus.deploy(
            [EXAMPLE_CLIENT],
            {
                AGENT: {"Socket": socket, "StartModels": MODEL, **LOCAL_INSTALL},
            },
        )
        assert list(nucleus.components) == [AGENT, MODEL, EXAMPLE_CLIENT]
        agent_work = nucleus.paths(AGENT)["work:path"]
        installed = list((agent_work / "venv" / "lib").glob("python3*/site-packages/lookout_edge/package.py"))
        assert installed, "Install did not put the wheel into the component's virtual environment"
        manifest = json.loads((agent_work / "models" / MODEL / "manifest.json").read_text())
        # By default a model is packaged for this machine's architecture and the CPU.
        assert manifest["target"]["platform"] == {"os": "linux", "arch": platform.machine()}

        client = nucleus.components[EXAMPLE_CLIENT].run
        assert client is not None
        assert client.wait(timeout=60) == 0, nucleus.log_path(EXAMPLE_CLIENT).read_text()
        log = nucleus.log_path(EXAMPLE_CLIENT).read_text()
        [line] = [line for line in log.splitlines() if line.startswith("DetectAnomalies result: ")]
        result = json.loads(line.removeprefix("DetectAnomalies result: "))
        assert result["model_component"] == MODEL and result["is_anomalous"] is True
        assert result["anomaly_score"] >= result["anomaly_threshold"]

        with EdgeAgentClient(socket) as agent:
            assert [(m.name, m.status) for m in agent.list_models()] == [(MODEL, "RUNNING")]

            # A crash leaves the socket behind; the restarted agent replaces it and starts
            # the configured models again.
            nucleus.crash_and_restart(AGENT)
            _wait_for(lambda: _statuses(agent) == [(MODEL, "RUNNING")], 30, "the model to run again")

            # The camera client runs the camera daemon on the configuration its Run writes: a
            # folder camera gives one event per image, with the model's verdict.
            folder = nucleus.root / "camera-folder"
            folder.mkdir()
            Image.fromarray(make_image(red=30)).save(folder / "part.png")
            cameras = [{"name": "line1", "source": str(folder), "model": MODEL}]
            nucleus.deploy([CAMERA_CLIENT], {CAMERA_CLIENT: {**LOCAL_INSTALL, "Cameras": cameras}})
            camera_work = nucleus.paths(CAMERA_CLIENT)["work:path"]
            camera_defaults = built.recipes[CAMERA_CLIENT]["ComponentConfiguration"]["DefaultConfiguration"]
            events = camera_work / "events.jsonl"
            _wait_for(lambda: events.exists() and events.read_text().endswith("\n"), 30, "a camera event")
            assert yaml.safe_load((camera_work / "camera.yaml").read_text()) == {
                "agent": {"socket": socket, "models_dir": str(agent_work / "models")},
                "state_dir": str(camera_work / "state"),
                "cameras": cameras,
                "sinks": camera_defaults["Sinks"],
            }
            event = json.loads(events.read_text().splitlines()[0])
            assert (event["camera"], event["model"], event["is_anomalous"]) == ("line1", MODEL, True)
            nucleus.remove(CAMERA_CLIENT)

            nucleus.remove(EXAMPLE_CLIENT)
            nucleus.remove(MODEL)
            assert not (agent_work / "models" / MODEL).exists()
            _wait_for(lambda: _statuses(agent) == [], 10, "the model to leave ListModels")

        agent_process = nucleus.components[AGENT].run
        nucleus.remove(AGENT)
        assert agent_process is not None and agent_process.returncode == 0
        assert not Path(socket.removeprefix("unix://")).exists()
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.mark.slow
def test_custom_labels_component_serves_boto3(nucleus: Nucleus, built: Built) -> None:
    """The endpoint component runs `lookout-edge rekognition` on its models folder; a model
    package put there is a project that boto3 starts and detects with."""
    boto3 = pytest.importorskip("boto3")
    from tests.rekognition.label_models import write_label_package

    port = _free_port()
    nucleus.deploy([CUSTOM_LABELS], {CUSTOM_LABELS: {**LOCAL_INSTALL, "Address": f"127.0.0.1:{port}"}})
    models = nucleus.paths(CUSTOM_LABELS)["work:path"] / "models"
    package = write_label_package(models / "colours", "classification", "colours", "colours.v1")
    client = boto3.client(
        "rekognition",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="secret",
    )
    _wait_for(lambda: _answers(client), 30, "the endpoint to answer")
    arn = package.model_arn
    client.start_project_version(ProjectVersionArn=arn, MinInferenceUnits=1)
    client.get_waiter("project_version_running").wait(
        ProjectArn=package.project_arn, VersionNames=[package.version_name], WaiterConfig={"Delay": 1}
    )
    image = io.BytesIO()
    Image.new("RGB", (96, 96), (250, 10, 10)).save(image, format="PNG")
    labels = client.detect_custom_labels(ProjectVersionArn=arn, Image={"Bytes": image.getvalue()})[
        "CustomLabels"
    ]
    assert labels[0]["Name"] == "red"
    process = nucleus.components[CUSTOM_LABELS].run
    nucleus.remove(CUSTOM_LABELS)
    assert process is not None and process.returncode == 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _answers(client: Any) -> bool:
    try:
        client.describe_projects()
    except Exception:  # not listening yet
        return False
    return True


def _statuses(agent: EdgeAgentClient) -> list[tuple[str, str]]:
    try:
        return [(m.name, m.status) for m in agent.list_models()]
    except Exception:  # the agent is restarting
        return [("unreachable", "")]


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"), reason="no offline bundle for this CPU")
def test_offline_bundle_installs_agent_and_camera_client_without_an_index(
    built: Built, tmp_path: Path
) -> None:
    """The real bundle for this machine, downloaded from the package index as `make components`
    does; then Install runs with no index and no pip configuration, so every wheel the agent and
    the camera client install must come from the bundle."""
    out = tmp_path / "out"
    shutil.copytree(built.out, out)
    build_components(out, "test-bucket", "lookout-edge", offline_archs=[platform.machine()])
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PIP_CONFIG_FILE": os.devnull}
    nucleus = Nucleus(tmp_path / "greengrass", out / "recipes", out / "artifacts", env)
    sock_dir = short_tmpdir()
    socket = f"unix://{sock_dir}/agent.sock"
    folder = tmp_path / "camera-folder"
    folder.mkdir()
    Image.fromarray(make_image(red=30)).save(folder / "part.png")
    try:
        nucleus.deploy(
            [MODEL, CAMERA_CLIENT],
            {
                AGENT: {"Socket": socket, "StartModels": MODEL, "PythonCommand": sys.executable},
                CAMERA_CLIENT: {
                    "PythonCommand": sys.executable,
                    "Cameras": [{"name": "line1", "source": str(folder), "model": MODEL}],
                },
            },
        )
        events = nucleus.paths(CAMERA_CLIENT)["work:path"] / "events.jsonl"
        _wait_for(lambda: events.exists() and events.read_text().endswith("\n"), 60, "a camera event")
        event = json.loads(events.read_text().splitlines()[0])
        assert (event["camera"], event["is_anomalous"]) == ("line1", True)
        camera_python = nucleus.paths(CAMERA_CLIENT)["work:path"] / "venv" / "bin" / "python"
        imports = "import av, paho.mqtt.client, awsiot.greengrasscoreipc"
        subprocess.run([str(camera_python), "-c", imports], check=True, env=env)
    finally:
        nucleus.stop_all()
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_offline_bundles_ask_pip_for_every_manylinux_level_the_device_can_run() -> None:
    assert pip_platforms("aarch64", "2.19") == [
        "manylinux_2_19_aarch64",
        "manylinux_2_18_aarch64",
        "manylinux_2_17_aarch64",
        "manylinux2014_aarch64",
    ]
    with pytest.raises(ValueError, match=r"glibc 2\.12"):
        pip_platforms("x86_64", "2.12")

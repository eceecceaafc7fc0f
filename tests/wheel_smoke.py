"""The wheel as a user gets it: built from this checkout, installed into a clean virtual
environment, and used from a working directory whose own client.py, agent.py, components.py and
trainer/ would shadow ours if anything imported them under bare names.

Checks that the wheel holds only `lookout_edge/` and its dist-info at top level; then trains the
demo's synthetic dataset, serves it, detects over shared memory and bytes with the installed
`lookout-edge` command, and finds no bare module in `sys.modules`. `make test` runs it; it needs
the package index (or pip's cache) for the wheel's dependencies, as `make setup` does.

    python tests/wheel_smoke.py [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lookout_edge.components.build import build_wheel  # noqa: E402
from tests.namespace import SUBPACKAGE_FOLDERS  # noqa: E402

WORK = ROOT / "build" / "wheel-smoke"
MODEL = "smoke"


def step(text: str) -> None:
    print(f"wheel smoke: {text}", flush=True)


def run(command: list[str], cwd: Path, timeout: float = 600) -> str:
    completed = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if completed.returncode != 0:
        raise SystemExit(
            f"wheel smoke: {' '.join(command)} exited {completed.returncode}\n"
            f"{completed.stdout}\n{completed.stderr}"
        )
    return completed.stdout


def check_wheel(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
    expected = {"lookout_edge", wheel.name.split("-py3")[0] + ".dist-info"}
    if tops != expected:
        raise SystemExit(
            f"wheel smoke: {wheel.name} holds {sorted(tops)} at top level; expected {sorted(expected)}"
        )


def shadowing_directory(work: Path) -> Path:
    (work / "trainer").mkdir(parents=True)
    for name in ("client.py", "agent.py", "components.py", "trainer/__init__.py"):
        (work / name).write_text(f"raise SystemExit('the working directory\\'s {name} was imported')\n")
    return work


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help=f"keep {WORK} afterwards")
    args = parser.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    wheel = build_wheel(WORK / "dist")
    check_wheel(wheel)
    step(f"{wheel.name} holds lookout_edge/ and its dist-info only")

    venv = WORK / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python, command = venv / "bin" / "python", str(venv / "bin" / "lookout-edge")
    run([str(python), "-m", "pip", "install", "--quiet", f"{wheel}[train,camera]"], WORK)
    step("installed with the train and camera extras into a clean virtual environment")

    work = shadowing_directory(WORK / "work")
    bare = f"sorted(n for n in sys.modules if n.split('.')[0] in {SUBPACKAGE_FOLDERS!r})"
    imports = (
        "import sys, lookout_edge.agent, lookout_edge.trainer, lookout_edge.client, lookout_edge.components\n"
        "import lookout_edge.agent.server, lookout_edge.trainer.train, lookout_edge.client.camera.daemon\n"
        f"assert not {bare}, {bare}\n"
        "from lookout_edge.trainer.synthetic import write_synthetic_dataset\n"
        "from pathlib import Path\n"
        "print(write_synthetic_dataset(Path('data'), normal=20, anomalous=10, segmentation=False))\n"
    )
    manifest = run([str(python), "-c", imports], work).strip()
    trained = json.loads(
        run([command, "train", manifest, "--out", "models/smoke", "--name", MODEL, "--json"], work)
    )
    step(f"trained beside shadowing folders: image AUROC {trained.get('auroc', float('nan')):.3f}")

    socket_dir = Path(tempfile.mkdtemp(prefix="le-smoke-", dir="/tmp"))
    address = f"unix://{socket_dir}/agent.sock"
    agent = subprocess.Popen(
        [command, "agent", "--socket", address, "--models-dir", "models"],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (socket_dir / "agent.sock").exists():
            if agent.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"wheel smoke: the agent did not start\n{agent.communicate()[0]}")
            time.sleep(0.1)
        run([command, "models", "start", MODEL, "--wait", "60", "--socket", address], work)
        results = json.loads((work / "models" / "smoke" / "evaluation.json").read_text())["results"]
        chosen = [
            next(r for r in results if not r["is_anomalous"]),
            next(r for r in results if r["is_anomalous"]),
        ]
        images = [str(next(Path(work, "data").rglob(record["name"]))) for record in chosen]
        for flags in (["--shm"], []):
            detections = json.loads(
                run(
                    [command, "detect", *images, "--model", MODEL, "--json", "--socket", address, *flags],
                    work,
                )
            )
            verdicts = [d["is_anomalous"] for d in detections]
            if verdicts != [record["predicted"] for record in chosen]:
                raise SystemExit(f"wheel smoke: detect {flags} gave {verdicts}, the evaluation {chosen}")
        step("served and detected over shared memory and bytes, as the evaluation predicted")
    finally:
        agent.send_signal(signal.SIGTERM)
        status = agent.wait(30)
        shutil.rmtree(socket_dir, ignore_errors=True)
    if status != 0:
        raise SystemExit(f"wheel smoke: the agent exited {status} on SIGTERM\n{agent.communicate()[0]}")
    if not args.keep:
        shutil.rmtree(WORK, ignore_errors=True)
    step("passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

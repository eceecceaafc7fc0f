"""CreateProjectVersion's training: `lookout-edge train` in a subprocess, into a hidden staging
directory of the models directory, then the package moved into place (TRAINING_COMPLETED) or the
trainer's last stderr lines as the StatusMessage (TRAINING_FAILED).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path

from lookout_edge.custom_labels import read_label_package
from lookout_edge.package import STAGING_PREFIX, PackageError

from .registry import Registry, VersionRecord

logger = logging.getLogger(__name__)

IN_PROGRESS, COMPLETED, FAILED = "TRAINING_IN_PROGRESS", "TRAINING_COMPLETED", "TRAINING_FAILED"
MESSAGES = {IN_PROGRESS: "The model is being trained.", COMPLETED: "The model is ready to run."}
MAX_STATUS_MESSAGE = 1000
TRAINER_ERROR_PREFIX = "lookout-edge train:"  # how the CLI reports an error it understood


class TrainingInputError(ValueError):
    """Training data the endpoint cannot hand to the trainer; the message is the StatusMessage."""


def infer_kind(manifest: Path, test_manifest: Path | None) -> str:
    """The trainer's --kind for a Ground Truth manifest, from its lines (TrainingInputError when
    they cannot tell). The trainer's process checks the images themselves."""
    from lookout_edge.trainer.labels.dataset import LabelDatasetError, dataset_kind

    if not manifest.is_file():  # as AWS, a missing manifest fails the training, not the request
        raise TrainingInputError(f"the manifest file {manifest.name} does not exist")
    try:
        return dataset_kind(manifest, test_manifest)
    except LabelDatasetError as exc:
        raise TrainingInputError("; ".join(exc.problems)[:MAX_STATUS_MESSAGE]) from None
    except OSError as exc:
        raise TrainingInputError(f"the training data cannot be read: {exc}") from None


def stderr_summary(stderr: str, returncode: int) -> str:
    """A failed trainer's stderr as one StatusMessage: its error from the `lookout-edge train:`
    line on (a dataset's problems, all of them), or else its last lines (a traceback's end)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    starts = [index for index, line in enumerate(lines) if line.startswith(TRAINER_ERROR_PREFIX)]
    shown = lines[starts[-1] :] if starts else lines[-5:]
    summary = " | ".join(shown) or f"the trainer exited with status {returncode} and no message"
    return summary[:MAX_STATUS_MESSAGE] if starts else summary[-MAX_STATUS_MESSAGE:]


class Trainer:
    """Runs the trainings of one models directory and records their outcome in its registry."""

    def __init__(
        self, models_dir: Path, registry: Registry, s3_root: Path | None, python: str = sys.executable
    ) -> None:
        self._models_dir = models_dir
        self._s3_root = s3_root
        self._registry = registry
        self._python = python
        self._lock = threading.Lock()
        self._processes: set[subprocess.Popen[bytes]] = set()
        self._closed = False
        for record in registry.versions():
            if record.status == IN_PROGRESS:  # its trainer died with the previous endpoint
                self._finish(record, FAILED, "the endpoint stopped while the model was being trained")

    @staticmethod
    def package_name(record: VersionRecord) -> str:
        """The directory of a trained version: '@' is in no project or version name."""
        return f"{record.project}@{record.version_name}"

    def start(self, record: VersionRecord, manifest: Path, test_manifest: Path | None) -> None:
        threading.Thread(
            target=self._train,
            args=(record, manifest, test_manifest),
            name=f"train {record.version_name}",
            daemon=True,
        ).start()

    def _train(self, record: VersionRecord, manifest: Path, test_manifest: Path | None) -> None:
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}training.", dir=self._models_dir))
        summary = None
        try:
            kind = infer_kind(manifest, test_manifest)
            status, message = self._run(record, kind, manifest, test_manifest, staging)
            if status == COMPLETED:
                summary = self._publish_summary(record)
        except TrainingInputError as exc:
            status, message = FAILED, str(exc)
        except Exception as exc:  # a training that cannot run fails its version, not the endpoint
            logger.exception("training %s failed", record.arn)
            status, message = FAILED, f"the trainer could not be run: {exc}"
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._finish(record, status, message, summary)

    def _run(
        self, record: VersionRecord, kind: str, manifest: Path, test_manifest: Path | None, staging: Path
    ) -> tuple[str, str]:
        out = staging / "package"
        command = [
            self._python, "-m", "lookout_edge.cli", "train", str(manifest), "--kind", kind, "--out", str(out),
            "--project", record.project, "--version-name", record.version_name, "--json",
        ]  # fmt: skip
        # The package carries the ARNs CreateProjectVersion answered with.
        command += ["--version-arn", record.arn]
        project = next((p for p in self._registry.projects() if p.name == record.project), None)
        if project is not None:
            command += ["--project-arn", project.arn]
        if self._s3_root is not None:
            command += ["--s3-root", str(self._s3_root)]
        if test_manifest is not None:
            command += ["--test", str(test_manifest)]
        with (staging / "stdout").open("wb") as stdout, (staging / "stderr").open("w+b") as stderr:
            with self._lock:
                if self._closed:
                    return FAILED, "the endpoint stopped before the training began"
                process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)
                self._processes.add(process)
            try:
                returncode = process.wait()
            finally:
                with self._lock:
                    self._processes.discard(process)
            stderr.seek(0)
            errors = stderr.read().decode("utf-8", "replace")
        if returncode != 0:
            return FAILED, stderr_summary(errors, returncode)
        try:
            read_label_package(out)
        except PackageError as exc:
            return FAILED, f"the trainer wrote no servable package: {exc}"
        destination = self._models_dir / self.package_name(record)
        if destination.exists():
            return FAILED, f"{destination} already exists; move it away and train the version again"
        os.replace(out, destination)
        return COMPLETED, MESSAGES[COMPLETED]

    def _publish_summary(self, record: VersionRecord) -> dict[str, str] | None:
        """Copy the evaluation summary where AWS writes it, `<S3KeyPrefix>EvaluationResultSummary-
        <project>-<version>.json` in the OutputConfig bucket, when the endpoint maps S3 to a folder."""
        output = record.request.get("OutputConfig", {})
        bucket = output.get("S3Bucket")
        evaluation = read_label_package(self._models_dir / self.package_name(record)).evaluation_file
        if self._s3_root is None or bucket is None or evaluation is None:
            return None
        prefix = output.get("S3KeyPrefix", "")
        name = f"{prefix}EvaluationResultSummary-{record.project}-{record.version_name}.json"
        target = (self._s3_root / bucket / name).resolve()
        if self._s3_root.resolve() not in target.parents:
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(evaluation.path, target)
        return {"Bucket": bucket, "Name": name}

    def _finish(
        self, record: VersionRecord, status: str, message: str, summary: dict[str, str] | None = None
    ) -> None:
        changes: dict[str, object] = {
            "status": status,
            "status_message": message,
            "training_ended": datetime.now(timezone.utc),
            "summary": summary,
        }
        if status == COMPLETED:
            changes["package_dir"] = self.package_name(record)
        self._registry.update_version(record, **changes)
        logger.info("version %s: %s %s", record.arn, status, message)

    def close(self) -> None:
        """Stop the running trainers (their versions become TRAINING_FAILED)."""
        with self._lock:
            self._closed = True
            processes = list(self._processes)
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()

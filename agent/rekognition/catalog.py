"""The projects and versions the endpoint serves: the Custom Labels packages of the models
directory (each package's `project` is a project, the package a version of it) joined with the
registry's projects and trained versions, and each version's hosting state.

The directory and the registry are read again by every call that lists projects or looks one up
by its ARN, so packages copied in appear without a restart, and a version whose training has
just ended can be started at once. A version is (project, version name), unique as AWS makes it;
the registry's ARN (the one CreateProjectVersion returned) and the package's both name it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from lookout_edge.custom_labels import LabelPackage, label_packages, project_of_arn, version_of_arn
from lookout_edge.package import PackageError

from .errors import RESOURCE_NOT_FOUND, RekognitionError
from .hosting import Hosting, ModelLoader
from .registry import ProjectRecord, Registry, VersionRecord
from .training import COMPLETED, MESSAGES

logger = logging.getLogger(__name__)


@dataclass
class Version:
    project: str
    name: str
    arn: str
    created: datetime
    hosting: Hosting
    package: LabelPackage | None = None
    record: VersionRecord | None = None
    arns: set[str] = field(default_factory=set)

    def state(self) -> tuple[str, str]:
        """Status and StatusMessage: the training's until the version is first started."""
        if self.record is not None and self.record.status != COMPLETED:
            return self.record.status, self.record.status_message
        status, message = self.hosting.state()
        return (status, message) if status is not None else (COMPLETED, MESSAGES[COMPLETED])


@dataclass
class Project:
    name: str
    arn: str
    created: datetime
    arns: set[str] = field(default_factory=set)
    versions: list[Version] = field(default_factory=list)


class Catalog:
    def __init__(self, models_dir: Path, registry: Registry, loader: ModelLoader, queue: int) -> None:
        self._models_dir = models_dir
        self._registry = registry
        self._loader = loader
        self._queue = queue
        self._lock = threading.Lock()
        self._hosting: dict[tuple[str, str], Hosting] = {}
        self._projects: dict[str, Project] = {}
        self._reported: set[str] = set()

    def scan(self) -> dict[str, Project]:
        """Read the models directory and the registry again; the projects by name."""
        try:
            packages, problems = label_packages(self._models_dir)
        except PackageError as exc:
            packages, problems = [], [str(exc)]
        for problem in sorted(set(problems) - self._reported):
            logger.warning("not served: %s", problem)
        self._reported = set(problems)
        with self._lock:
            projects: dict[str, Project] = {}
            for project_record in self._registry.projects():
                projects[project_record.name] = Project(
                    project_record.name, project_record.arn, project_record.created, {project_record.arn}
                )
            versions: dict[tuple[str, str], Version] = {}
            for package in sorted(packages, key=lambda item: item.created):
                project = self._project(projects, package.project, package.project_arn, package.created)
                key = (package.project, package.version_name)
                if key in versions:
                    logger.warning(
                        "%s repeats version %s of %s; not served", package.directory, key[1], key[0]
                    )
                    continue
                versions[key] = self._version(key, package.model_arn, package.created)
                versions[key].package = package
                versions[key].arns.add(package.model_arn)
                project.arns.add(package.project_arn)
            for record in self._registry.versions():
                key = (record.project, record.version_name)
                if key not in versions:
                    if record.status == COMPLETED:
                        continue  # its package was removed from the models directory
                    versions[key] = self._version(key, record.arn, record.created)
                versions[key].arn, versions[key].record = record.arn, record
                versions[key].arns.add(record.arn)
            for (project_name, _), version in versions.items():
                if project_name in projects:
                    projects[project_name].versions.append(version)
            self._projects = projects
            return projects

    def _project(self, projects: dict[str, Project], name: str, arn: str, created: datetime) -> Project:
        if name not in projects:
            projects[name] = Project(name, arn, created, {arn})
        return projects[name]

    def _version(self, key: tuple[str, str], arn: str, created: datetime) -> Version:
        hosting = self._hosting.get(key)
        if hosting is None:
            hosting = self._hosting[key] = Hosting(f"{key[0]}/{key[1]}", self._loader, self._queue)
        return Version(key[0], key[1], arn, created, hosting, arns={arn})

    def add_project(self, record: ProjectRecord) -> bool:
        """Record a project unless one of its name is served; False if one is."""
        with self._lock:
            if record.name in self._projects:
                return False
        return self._registry.add_project(record)

    def project(self, arn: str) -> Project:
        """The project an ARN names, as the models directory and the registry hold it now (a scan:
        what was trained, registered or removed since the last call counts);
        ResourceNotFoundException."""
        name = project_of_arn(arn)
        project = self.scan().get(name) if name else None
        if project is None or arn not in project.arns:
            raise RekognitionError(RESOURCE_NOT_FOUND, f"the project {arn} does not exist")
        return project

    def version(self, arn: str) -> Version:
        """The version an ARN names, as the models directory and the registry hold it now (a scan,
        as for `project`); ResourceNotFoundException."""
        names = version_of_arn(arn)
        if names is not None:
            project = self.scan().get(names[0])
            for version in project.versions if project else ():
                if version.name == names[1] and arn in version.arns:
                    return version
        raise RekognitionError(RESOURCE_NOT_FOUND, f"the model {arn} does not exist")

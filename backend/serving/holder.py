"""What this process serves: the promoted version of each system, loaded once, swapped on promotion.

Every backend process reads the registry (``model_versions``) at most once per ``PROMOTED_CHECK_S`` and
loads a newly promoted version on the next request, so a promotion reaches every worker without a
restart. A config is filled by the systems it has controls for (:func:`systems_for`): the BCC model
(``multitask``) for a diagnosis, patterns or regions; the lesion pair (``lesion``) for the HAM10000
diagnosis and the lesion outline.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from backend.label_studio.predictions import MODEL_ROLES
from backend.serving import lesion, multitask, registry
from backend.serving.lesion import LesionSystem
from backend.serving.multitask import ServedModel
from backend.serving.predict import Served
from backend.serving.registry import LESION, MULTITASK
from labeling_config.parse import ProjectConfig, Role

logger = logging.getLogger(__name__)

PROMOTED_CHECK_S = 1.0
UNTRAINED = "untrained"
LESION_ROLES = (Role.HAM_DIAGNOSIS, Role.LESION)

#: How each system's registered version is loaded: ``(path, version, engine, threads) -> the served
#: object`` (with a ``version``). A third system is one more entry here and its module.
LOADERS: dict[str, Callable[[str, str, str, int], Any]] = {
    MULTITASK: lambda path, version, engine, threads: multitask.load_served(path, engine, threads),
    LESION: lesion.load_version,
}


class Holder:
    """One loaded version per system; :meth:`ensure` swaps it when the promoted version changes.

    A swap loads the new version beside the old one, then replaces it in one assignment: a request
    holds whichever it read, never a half-loaded model. One loader per system at a time; the others
    wait and reuse its result.
    """

    def __init__(
        self,
        loaders: Mapping[str, Callable[[str, str, str, int], Any]] = LOADERS,
        engine: str = "onnxruntime",
        threads: int = 1,
    ) -> None:
        self.loaders = dict(loaders)
        self.engine, self.threads = engine, threads
        self._current: dict[str, Any] = {}
        self._locks = {system: threading.Lock() for system in self.loaders}

    def current(self, system: str) -> Any | None:
        return self._current.get(system)

    def ensure(self, system: str, version: str, path: str) -> Any:
        """``system``'s ``version``, loading it from ``path`` if another one is being served."""
        current = self._current.get(system)
        if current is not None and current.version == version:
            return current
        with self._locks[system]:
            current = self._current.get(system)
            if current is not None and current.version == version:
                return current
            loaded = self.loaders[system](path, version, self.engine, self.threads)
            if loaded.version != version:
                logger.warning("%s holds version %s, registered as %s", path, loaded.version, version)
            self._current[system] = loaded
            logger.info("serving %s %s (%s)", system, loaded.version, path)
            return loaded


def systems_for(config: ProjectConfig) -> tuple[str, ...]:
    """The systems that fill some control of ``config``, in the order their versions are joined."""
    found = []
    if any(role in config.controls for role in MODEL_ROLES):
        found.append(MULTITASK)
    if any(role in config.controls for role in LESION_ROLES):
        found.append(LESION)
    return tuple(found)


@dataclass
class Serving:
    """The served systems of one process: the registry's promoted versions, loaded by one holder."""

    sessions: sessionmaker[Session]
    holder: Holder = field(default_factory=Holder)
    _promoted: dict[str, tuple[float, str | None, str | None]] = field(default_factory=dict)

    def promoted(self, system: str) -> tuple[str, str] | None:
        """``system``'s promoted version and its path, as the registry said at most
        ``PROMOTED_CHECK_S`` ago (nothing is loaded)."""
        checked, version, path = self._promoted.get(system, (0.0, None, None))
        now = time.monotonic()
        if now - checked > PROMOTED_CHECK_S:
            with self.sessions() as session:
                row = registry.promoted(session, system)
                version, path = (row.version, row.path) if row is not None else (None, None)
            self._promoted[system] = (now, version, path)
        return (version, path) if version is not None and path is not None else None

    def served(self, system: str) -> Any | None:
        """``system``'s promoted version, loaded (None when none is promoted)."""
        found = self.promoted(system)
        return self.holder.ensure(system, *found) if found is not None else None

    def bcc_model(self) -> ServedModel | None:
        """The promoted BCC model."""
        served: ServedModel | None = self.served(MULTITASK)
        return served

    def lesion_pair(self) -> LesionSystem | None:
        """The promoted lesion pair."""
        served: LesionSystem | None = self.served(LESION)
        return served

    def available(self, system: str) -> bool:
        """Whether ``system`` has a version to serve (read from the registry: ``/setup`` loads nothing,
        Label Studio gives it 3 s)."""
        return self.promoted(system) is not None

    def version(self, config: ProjectConfig | None = None) -> str:
        """The version that fills ``config`` (the BCC model's, the lesion pair's, or both joined by +);
        without a config, the BCC model's. Read from the registry: nothing is loaded."""
        systems = systems_for(config) if config is not None else (MULTITASK,)
        parts = []
        for system in systems:
            found = self.promoted(system)
            parts.append(found[0] if found is not None else UNTRAINED)
        return "+".join(parts)

    def for_config(self, config: ProjectConfig) -> Served:
        """What fills ``config`` now, read once for a whole request."""
        systems = systems_for(config)
        model = self.bcc_model() if MULTITASK in systems else None
        pair = self.lesion_pair() if LESION in systems else None
        outliner = pair or (self.lesion_pair() if model is not None and config.regions is not None else None)
        loaded = {MULTITASK: model, LESION: pair}
        # The version of what this request runs (a promotion in between changes the next request).
        version = "+".join(getattr(loaded[system], "version", UNTRAINED) for system in systems)
        return Served(version=version, systems=systems, multitask=model, lesion=pair, outliner=outliner)

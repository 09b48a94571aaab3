"""What this process serves: the promoted version of each system, loaded once, swapped on promotion.

Every backend process reads the registry (``model_versions``) at most once per ``PROMOTED_CHECK_S`` and
loads a newly promoted version on the next request, so a promotion reaches every worker without a
restart. A config is filled by the systems it has controls for (:func:`systems_for`): the BCC model
(``multitask``) for a diagnosis, patterns or regions; the lesion pair (``lesion``) for the HAM10000
diagnosis and the lesion outline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from backend.label_studio.predictions import MODEL_ROLES
from backend.serving import registry
from backend.serving.lesion import LesionHolder, LesionSystem
from backend.serving.multitask import ModelHolder, ServedModel
from backend.serving.predict import Served
from labeling_config.parse import ProjectConfig, Role

PROMOTED_CHECK_S = 1.0
UNTRAINED = "untrained"
MULTITASK, LESION = "multitask", "lesion"
LESION_ROLES = (Role.HAM_DIAGNOSIS, Role.LESION)


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
    """The served systems of one process."""

    sessions: sessionmaker[Session]
    lesion: LesionHolder
    multitask: ModelHolder = field(default_factory=ModelHolder)
    _promoted: tuple[float, str | None, str | None] = (0.0, None, None)

    @classmethod
    def create(
        cls, sessions: sessionmaker[Session], model_dir: Path, lesion_fallback: tuple[Path, Path] | None
    ) -> Serving:
        return cls(sessions=sessions, lesion=LesionHolder(model_dir, lesion_fallback))

    def bcc_model(self) -> ServedModel | None:
        """The promoted BCC model (None when no version is promoted)."""
        checked, version, path = self._promoted
        now = time.monotonic()
        if now - checked > PROMOTED_CHECK_S:
            with self.sessions() as session:
                current = registry.promoted(session)
                version, path = (current.version, current.path) if current is not None else (None, None)
            self._promoted = (now, version, path)
        if version is None or path is None:
            return None
        return self.multitask.ensure(version, path)

    def lesion_pair(self) -> LesionSystem | None:
        """The served lesion pair (None when there is none)."""
        return self.lesion.get()

    def available(self, system: str) -> bool:
        """Whether ``system`` has a version to serve (the BCC model's absence is answered per request)."""
        return system != LESION or self.lesion.available()

    def version(self, config: ProjectConfig | None = None) -> str:
        """The version that fills ``config`` (the BCC model's, the lesion pair's, or both joined by +);
        without a config, the BCC model's."""
        systems = systems_for(config) if config is not None else (MULTITASK,)
        parts = []
        for system in systems:
            served = self.bcc_model() if system == MULTITASK else self.lesion_pair()
            parts.append(served.version if served is not None else UNTRAINED)
        return "+".join(parts)

    def for_config(self, config: ProjectConfig) -> Served:
        """What fills ``config`` now, read once for a whole request."""
        systems = systems_for(config)
        model = self.bcc_model() if MULTITASK in systems else None
        pair = self.lesion_pair() if LESION in systems else None
        outliner = pair or (self.lesion_pair() if model is not None and config.regions is not None else None)
        return Served(
            version=self.version(config), systems=systems, multitask=model, lesion=pair, outliner=outliner
        )

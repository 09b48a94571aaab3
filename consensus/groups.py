"""Which images belong together: the lesion and the patient an item's task data names.

Several images of one lesion (dermoscopy and follow-ups) carry the same ``lesion_id`` in their task
data, several lesions of one patient the same ``patient_id``. Whatever resamples or splits images
(retraining's validation split, the exposure statistics' bootstrap) must keep them together, or it
counts one lesion as several independent observations. And the same image in two Label Studio
projects (a blind-first, then AI-assisted study) is one image: :func:`image_key`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MAX_GROUP_CHARS = 200


def _group_value(data: Mapping[str, Any] | None, key: str) -> str | None:
    value = (data or {}).get(key)
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = str(value).strip()
    return text if 0 < len(text) <= MAX_GROUP_CHARS else None


def lesion_group(external_id: str, data: Mapping[str, Any] | None) -> tuple[str, str]:
    """An item's lesion and the key that keeps it with its lesion and its patient.

    Images of one lesion must never be on both sides of a split, nor a patient's lesions. Returns
    ``(lesion_id, group key)``: the task's ``lesion_id`` (else the item's own id) and its ``patient_id``
    (else the lesion). A value that is not a short text or number is ignored.
    """
    lesion = _group_value(data, "lesion_id")
    patient = _group_value(data, "patient_id")
    lesion_id = f"lesion:{lesion}" if lesion is not None else external_id
    return lesion_id, (f"patient:{patient}" if patient is not None else lesion_id)


#: Label Studio's upload path: ``/data/upload/<project>/<8 hex>-<file name>`` (the prefix differs per upload).
_UPLOAD = re.compile(r"/data/upload/\d+/[0-9a-f]{8}-(?P<name>[^/?#]+)$")


def image_key(
    external_id: str, image: str | None, data: Mapping[str, Any] | None, content_hash: str | None = None
) -> str:
    """The key that finds the same image in another Label Studio project (a blind-first, AI-assisted study
    reads each image in two projects).

    In order: the task data's ``image_id`` (put it in both projects' tasks: the robust way), the image's
    content hash where known, the uploaded file's name (Label Studio prefixes each upload with a
    random tag, so the same file uploaded to two projects has two paths), the image reference itself
    (local files, cloud storage and URLs are the same in both projects), else the item's own id.
    """
    named = _group_value(data, "image_id")
    if named is not None:
        return f"id:{named}"
    if content_hash:
        return f"sha256:{content_hash}"
    if image:
        upload = _UPLOAD.search(image)
        return f"upload:{upload['name']}" if upload else f"ref:{image}"
    return external_id

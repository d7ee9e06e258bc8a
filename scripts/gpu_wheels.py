"""Download the wheels the GPU machine lacks into .whl/ (git-ignored), trimmed to fit the
64 MiB that may travel with a device call.

    .venv/bin/python scripts/gpu_wheels.py        # then: bash scripts/gpu_check.sh there

The GPU image has Python 3.12, torch (CUDA 13), transformers 5.17, peft, accelerate,
safetensors, huggingface_hub, pyarrow, pandas, xxhash, triton; it lacks trl, datasets,
pydantic, unsloth, unsloth_zoo and bitsandbytes. Two wheels are trimmed: bitsandbytes keeps
only its CUDA 13 libraries (the others are ~110 MB), unsloth drops `studio/` (a web UI).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = [
    "trl==1.14.2",
    "datasets==4.8.5",
    "dill==0.4.1",
    "multiprocess==0.70.19",
    "pydantic==2.14.4",
    "pydantic-core==2.50.5",
    "annotated-types==0.8.0",
    "typing-inspection==0.4.5",
    "unsloth==2026.10.9",
    "unsloth_zoo==2026.10.9",
    "bitsandbytes==0.50.2",
]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64"]
DROP = {
    "bitsandbytes": lambda name: name.endswith(".so") and "cuda13" not in name,
    "unsloth": lambda name: name.startswith("studio/"),
}
LIMIT = 60 << 20


def trim(wheel: Path, drop) -> None:
    """Rewrite a wheel without the dropped files (and their RECORD lines)."""
    trimmed = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if drop(item.filename):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = ("\n".join(x for x in lines if not drop(x.split(",", 1)[0])) + "\n").encode()
            dst.writestr(item, data)
    trimmed.replace(wheel)


def main() -> int:
    target = ROOT / ".whl"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "--implementation",
            "cp",
            *platforms,
            "--platform",
            "any",
            "-d",
            str(target),
            *WHEELS,
        ],
        check=True,
    )
    for wheel in target.glob("*.whl"):
        project = wheel.name.split("-", 1)[0]
        if project in DROP:
            trim(wheel, DROP[project])
    total = sum(p.stat().st_size for p in target.glob("*.whl"))
    print(f"{len(list(target.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB in {target}")
    if total > LIMIT:
        print("too large to travel with a device call (64 MiB in all)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ELPV solar-cell images (PyPI `elpv-dataset`), fetched on demand for the benchmarks only.

2,624 300×300 electroluminescence images of solar cells, each with the probability (0, 1/3,
2/3 or 1) that experts gave it of being defective. The package is downloaded with `pip
download` into build/elpv and unpacked once. Its data licence is CC BY-NC-SA 4.0: never commit
it, never use it in the test suite.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ELPV_DIR = ROOT / "build" / "elpv"


def elpv_cells(kind: str = "mono") -> list[tuple[Path, float]]:
    """(image, defect probability) of every cell of `kind` ("mono" or "poly")."""
    images = ELPV_DIR / "elpv_dataset" / "data"
    if not (images / "labels.csv").is_file():
        wheels = sorted(ELPV_DIR.glob("elpv_dataset-*.whl"))
        if not wheels:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(ELPV_DIR), "elpv-dataset"],
                check=True,
            )
            wheels = sorted(ELPV_DIR.glob("elpv_dataset-*.whl"))
        with zipfile.ZipFile(wheels[-1]) as wheel:
            wheel.extractall(ELPV_DIR, [n for n in wheel.namelist() if n.startswith("elpv_dataset/data/")])
    cells = []
    for line in (images / "labels.csv").read_text().splitlines():
        name, probability, cell_kind = line.split()
        if cell_kind == kind:
            cells.append((images / name, float(probability)))
    return cells

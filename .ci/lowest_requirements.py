"""Print requirements.txt with each package pinned to its lower bound: the oldest versions it admits.

`.ci/lowest` installs these into a separate environment and runs a smoke subset of the tests, so
the floors in requirements.txt are versions that were actually tested. torch is left out: CI
installs the CPU build it keeps on disk (torch==2.13.0, see .ci/run) in both environments.
"""

import re
import sys
from pathlib import Path

FLOOR = re.compile(r"^\s*([A-Za-z0-9_.\-\[\]]+)\s*>=\s*([^,;\s]+)")


def lowest(requirements: str) -> list[str]:
    pins = []
    for line in requirements.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = FLOOR.match(line)
        if match is None:
            raise SystemExit(f"requirements.txt: {line!r} has no lower bound (>=); give every package one")
        name, floor = match.groups()
        if name.lower() != "torch":
            pins.append(f"{name}=={floor}")
    return pins


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "requirements.txt"
    print("\n".join(lowest(path.read_text())))

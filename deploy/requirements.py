"""Print the dependencies pyproject.toml lists, with those of the named extras, one a line.

The Dockerfile installs them in a layer of their own, before it copies the code, so that a code
change rebuilds only the small layers after it:

    python deploy/requirements.py pyproject.toml cpu postgres > requirements.txt
"""

from __future__ import annotations

import sys
import tomllib


def requirements(pyproject: str, extras: list[str]) -> list[str]:
    with open(pyproject, "rb") as handle:
        project = tomllib.load(handle)["project"]
    return project["dependencies"] + [r for extra in extras for r in project["optional-dependencies"][extra]]


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1], sys.argv[2:])))

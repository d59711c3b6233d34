"""Print ``name==minimum`` for each declared minimum (pyproject.toml) that differs from the
installed version, or nothing when CI's environment already is the minimums.

    python .ci/minimums.py [EXTRA ...]
"""

import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import tomllib
from packaging.version import Version

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
requirements = list(project["dependencies"])
for extra in sys.argv[1:]:
    requirements += project["optional-dependencies"][extra]
pins, newer = [], False
for requirement in requirements:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][^,;\s]*)(,\s*<[^,;\s]+)?", requirement.strip())
    if not match:
        continue
    name, minimum, _ = match.groups()
    pins.append(f"{name}=={minimum}")
    try:
        newer |= Version(Version(version(name)).public) != Version(minimum)
    except PackageNotFoundError:
        newer = True
if newer:
    print(" ".join(pins))

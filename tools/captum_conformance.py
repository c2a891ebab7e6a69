"""Run Captum's own influence test suite with every Captum class replaced by its SAM twin.

    python tools/captum_conformance.py /path/to/captum-checkout [pytest args...]

The checkout must contain Captum's ``tests/influence`` and ``tests/helpers`` (the
version matching the installed Captum, 0.9). Nothing is written into it. Every
influence class is replaced by its twin at ``rho=0`` through the pytest plugin
``tools/captum_twins.py``; Captum's arguments reach our classes untouched. The tests
need ``parameterized`` (and ``annoy`` for the ``TracInCPFastRandProj`` cases, which
are skipped without it).
"""

from __future__ import annotations

import os
import subprocess
import sys


def main(argv: list[str]) -> int:
    """Run the suite; return pytest's exit code."""
    if not argv or not os.path.isdir(os.path.join(argv[0], "tests", "influence")):
        print(__doc__, file=sys.stderr)
        return 2
    checkout, extra = os.path.abspath(argv[0]), argv[1:]
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([here, checkout, env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable, "-m", "pytest", "-p", "captum_twins", "-p", "no:cacheprovider",
        os.path.join(checkout, "tests", "influence"), *extra,
    ]  # fmt: skip
    return subprocess.call(cmd, cwd=checkout, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

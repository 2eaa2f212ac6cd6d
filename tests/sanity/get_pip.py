"""Offline stand-in for the pip bootstrap script that ansible-test downloads.

ansible-test creates each sanity test's virtual environment without pip, then runs a downloaded get-pip script
with pip install arguments (the pip release to install). That download is not reachable from every machine, so
`make sanity` copies this file to where ansible-test caches the script, with OUTER_PYTHON replaced by the project's
.venv interpreter. The .venv's own pip then installs into the new environment (`pip --python`), reading its index
settings from this machine's pip configuration.
"""

import subprocess
import sys

OUTER_PYTHON = "@OUTER_PYTHON@"
GET_PIP_ONLY_OPTIONS = {"--no-setuptools", "--no-wheel"}

arguments = [argument for argument in sys.argv[1:] if argument not in GET_PIP_ONLY_OPTIONS]
sys.exit(subprocess.call([OUTER_PYTHON, "-m", "pip", "--python", sys.executable, "install", *arguments]))

"""The `mpagent` command, chosen for the platform the wheel is built on (pyproject.toml holds
everything else and declares `scripts` dynamic for this).

POSIX: the script file launcher/mpagent. Installers rewrite its first line to their interpreter
(a wheel's `.data/scripts/` file starting `#!python`: pip, uv, and pipx through either), it
imports nothing costly before `mpagent.cli`, and after a cached `get` or `env` it skips the
interpreter's teardown. The console-script wrapper pip < 25 generates instead (the pip of a
stock Python 3.11 venv) runs `import re` first, which costs more than a whole cached
`mpagent get`.

Windows: a script file is no command there, so the console-script entry point, which every
installer turns into `mpagent.exe`. The script file stays in that wheel (so the sdist holds it
on every platform), and installers skip a script named like an entry point (pip's and uv's
`is_entrypoint_wrapper` rule), so `mpagent.exe` is all that is installed.

A wheel built on POSIX therefore serves POSIX only: install on Windows from the source (pip,
pipx and `uv tool install` build the wheel on the machine), or publish a wheel built there.
"""

import sys

from setuptools import setup

entry_points = (
    {"console_scripts": ["mpagent = mpagent.cli:main"]} if sys.platform == "win32" else {}
)
setup(scripts=["launcher/mpagent"], entry_points=entry_points)

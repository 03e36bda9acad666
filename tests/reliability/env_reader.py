"""Reads the env file in a tight loop, as an editor or a `set -a; . FILE` would, until a stop
file appears; then writes JSON to OUT: how many reads, how many found no file or an empty
one, and each distinct content seen with its count.

    python env_reader.py ENV_FILE STOP_FILE OUT
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    path, stop, target = argv
    reads = missing = empty = 0
    seen: dict[bytes, int] = {}
    while reads % 512 or not os.path.exists(stop):
        try:
            with open(path, "rb") as f:
                content = f.read()
        except FileNotFoundError:
            missing += 1
            reads += 1
            continue
        reads += 1
        empty += not content
        seen[content] = seen.get(content, 0) + 1
    contents = [[c.decode("utf-8", "replace"), n] for c, n in seen.items()]
    result = {"reads": reads, "missing": missing, "empty": empty, "contents": contents}
    with open(target, "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

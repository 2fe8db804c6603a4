"""`python -m scenarios NAME [options]` runs one scenario (`NAME --help`: its options); `--list` names them all."""

from __future__ import annotations

import sys

from scenarios import SCENARIOS, command, summary


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip().replace("`", ""))
        return 0 if argv else 2
    if argv[0] == "--list":
        width = max(map(len, SCENARIOS))
        for name in SCENARIOS:
            print(f"{name:<{width}}  {summary(name)}")
        return 0
    if argv[0] not in SCENARIOS:
        print(f"error: no scenario {argv[0]!r}; choose one of {', '.join(SCENARIOS)} (or --list)", file=sys.stderr)
        return 2
    return command(argv[0])(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""`sppnet export` as a script: see detector/commands/export.py (`python tools/export.py --help`)."""
from __future__ import annotations

import sys

from detector.commands import export as command


def main(argv: list[str] | None = None) -> int:
    return command.main(argv)


if __name__ == "__main__":
    sys.exit(main())

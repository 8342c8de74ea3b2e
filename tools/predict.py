"""`sppnet predict` as a script: see detector/commands/predict.py (`python tools/predict.py --help`)."""
from __future__ import annotations

import sys

from detector.commands import predict as command


def main(argv: list[str] | None = None) -> int:
    return command.main(argv)


if __name__ == "__main__":
    sys.exit(main())

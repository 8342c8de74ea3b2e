"""Convert a detection data set between the VOC layout and COCO json: ``sppnet convert`` as a script.

    python tools/convert.py ROOT OUT --to coco|voc --splits SPLIT [SPLIT ...] [--images copy|symlink|none]

See ``detector/commands/convert.py`` (``--help``) for the layouts read and written.
"""
from __future__ import annotations

import sys

from detector.commands import convert


def main(argv: list[str] | None = None) -> int:
    return convert.main(argv)


if __name__ == "__main__":
    sys.exit(main())

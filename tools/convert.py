"""`sppnet convert` as a script: the command lives in detector/commands/convert.py (see --help)."""
import sys

from detector.commands.convert import main

if __name__ == "__main__":
    sys.exit(main())

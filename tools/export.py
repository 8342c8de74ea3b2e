"""`sppnet export` as a script: the command lives in detector/commands/export.py (see --help)."""
import sys

from detector.commands.export import main

if __name__ == "__main__":
    sys.exit(main())

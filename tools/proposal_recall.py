"""`sppnet recall` as a script: the command lives in detector/commands/recall.py (see --help)."""
import sys

from detector.commands.recall import main

if __name__ == "__main__":
    sys.exit(main())

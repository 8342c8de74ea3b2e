"""`sppnet test` as a script: the command lives in detector/commands/test.py (see --help)."""
import sys

from detector.commands.test import main

if __name__ == "__main__":
    sys.exit(main())

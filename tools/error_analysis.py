"""`sppnet errors` as a script: the command lives in detector/commands/errors.py (see --help)."""
import sys

from detector.commands.errors import main

if __name__ == "__main__":
    sys.exit(main())

"""`sppnet reproduce-voc07` as a script: the command lives in detector/commands/reproduce.py (see --help)."""
import sys

from detector.commands.reproduce import main

if __name__ == "__main__":
    sys.exit(main())

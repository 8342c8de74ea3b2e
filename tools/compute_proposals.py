"""`sppnet proposals` as a script: the command lives in detector/commands/proposals.py (see --help)."""
import sys

from detector.commands.proposals import main

if __name__ == "__main__":
    sys.exit(main())

"""`sppnet jitter-comp4` as a script: the command lives in detector/commands/jitter_comp4.py (see --help)."""
import sys

from detector.commands.jitter_comp4 import main

if __name__ == "__main__":
    sys.exit(main())

"""`sppnet train` as a script: the command lives in detector/commands/train.py (see --help)."""
import sys

from detector.commands.train import main

if __name__ == "__main__":
    sys.exit(main())

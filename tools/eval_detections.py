"""`sppnet eval` as a script: the command lives in detector/commands/eval.py (see --help)."""
import sys

from detector.commands.eval import main

if __name__ == "__main__":
    sys.exit(main())

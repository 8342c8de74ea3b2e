"""`sppnet classifier` as a script: the command lives in detector/commands/classifier.py (see --help)."""
import sys

from detector.commands.classifier import main

if __name__ == "__main__":
    sys.exit(main())

"""`sppnet predict` as a script: the command lives in detector/commands/predict.py (see --help)."""
import sys

from detector.commands.predict import main

if __name__ == "__main__":
    sys.exit(main())

"""`sppnet make-digits` as a script: the command lives in detector/commands/make_digits.py (see --help)."""
import sys

from detector.commands.make_digits import main

if __name__ == "__main__":
    sys.exit(main())

"""`sppnet demo` as a script: the command lives in detector/commands/demo.py (see --help)."""
import sys

from detector.commands.demo import main

if __name__ == "__main__":
    sys.exit(main())

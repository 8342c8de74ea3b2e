"""`sppnet benchmark` as a script: the command lives in detector/commands/benchmark.py (see --help)."""
import sys

from detector.commands.benchmark import main

if __name__ == "__main__":
    sys.exit(main())

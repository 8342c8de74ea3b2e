"""`sppnet train-peer` as a script: the command lives in detector/commands/train_peer.py (see --help)."""
import sys

from detector.commands.train_peer import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m detector.commands ...`` is ``sppnet ...`` without the console script."""
import sys

from detector.commands import main

sys.exit(main())

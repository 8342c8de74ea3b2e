"""The ``sppnet`` subcommands: one module per command, each with ``main(argv) -> int`` (argparse, then
one library call inside :func:`detector.cli.run_tool`). ``tools/*.py`` are thin wrappers around them.
"""

"""The ``sppnet`` subcommands, one module each with ``main(argv: list[str] | None = None) -> int``:
argparse, then one library call inside :func:`detector.cli.run_tool`. ``tools/<name>.py`` are thin
wrappers that call the same ``main``."""

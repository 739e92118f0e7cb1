"""The ``moslora`` command line: ``main`` builds the parser; each subcommand is one module here
with ``add_parser(subparsers)``. Parses flags and calls the library; holds no logic of its own."""

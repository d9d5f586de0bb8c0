"""The ``patchcore`` command line: argument parsing and the commands, over evaluation and serving."""

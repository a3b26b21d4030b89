"""The subcommands of the ``pytclmilter`` command line, one module each."""

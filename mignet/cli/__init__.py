"""The ``mignet`` command line. ``main`` builds the parser from each subcommand's module
(explicit imports, no plugin loader): ``main`` itself (recv, send, demo), ``bench``,
``rxe``, ``serve``; ``live`` shows a live migration's progress and result."""

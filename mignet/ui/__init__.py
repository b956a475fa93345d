"""What a person reads: progress bars, tables, and the live-migration view shared by the
CLI and the benchmarks. Everything goes to stderr; stdout stays for ``--json``."""

"""``booth`` subcommands that run on a board. Each module has ``add_arguments`` and ``run``."""

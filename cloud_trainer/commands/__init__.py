"""``booth`` subcommands that run in the cloud. Each module has ``add_arguments`` and ``run``."""

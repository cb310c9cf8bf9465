"""fusenode node: the daemon, its HTTP API, configuration, peer coordination, jobs, CLI."""

__version__ = "0.1.0"

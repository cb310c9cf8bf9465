"""fusenode.node: the daemon, its HTTP API, configuration, peer coordination, jobs, CLI."""

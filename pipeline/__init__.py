"""How the stages run: catalog, cache, stores, cluster, runner and the command line."""

"""One module per CLI command beyond convert/validate; each exposes a click command registered in edgeq.cli."""

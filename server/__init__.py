"""loopserve.server."""

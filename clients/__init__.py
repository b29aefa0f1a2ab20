"""loopserve.clients."""

"""Command bodies: the top layer, called by alignax.cli."""

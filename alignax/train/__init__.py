"""Shared training machinery: TrainState, the update (accumulation, clipping, guard), the loop."""

"""A machine without TensorBoard: ``import tensorboard`` fails as it does when it is not installed."""

raise ImportError("No module named 'tensorboard' (tests/fakes/notb stands in for a missing package)")

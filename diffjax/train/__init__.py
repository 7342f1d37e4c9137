"""Training: state, optimizer chain, the pure train step and the loop."""

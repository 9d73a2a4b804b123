"""The training loop: loss, the fast forward, checkpoints, progress reports, trackers."""

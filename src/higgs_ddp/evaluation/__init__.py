"""Watching a run: validation loss and accuracy, listening samples."""

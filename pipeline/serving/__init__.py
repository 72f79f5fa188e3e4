"""Using a run: predictions on images, exports to formats that need no pipeline."""

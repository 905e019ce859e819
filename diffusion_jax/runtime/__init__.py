"""Infrastructure: device mesh and processes, checkpoints, signals, host memory, metric files,
images on disk, and the errors that reach users as one line."""

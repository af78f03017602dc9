"""Task-agnostic training machinery: config, mesh, step, optimizer, checkpoints, sampler."""

"""Data sources: each turns a data config into arrays and batches that are pure functions of the step."""

"""What cmboost reads and writes: atomic outputs, sample files (.npz and PNG folders), checkpoints,
datasets, and report tables, grids and plots."""

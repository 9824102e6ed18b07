"""Resumable work: the job folder and its state (job), its configuration record (config), index-to-image
jobs in part files (parts), and the tensors of a training state (training_state)."""

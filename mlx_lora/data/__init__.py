"""Dataset files → records → encoded examples → packed batches, and a run's train/validation
split."""

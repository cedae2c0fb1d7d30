"""Distillation itself: the losses, the method table, schedules, the teacher side of a batch (sparse
targets), the batches joining data with a cache, a method's phases, and the data side of a student run."""

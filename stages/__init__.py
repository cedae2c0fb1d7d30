"""The stage programs (train_teacher, teacher_logits, distill, cache) and the typer CLI `kd`."""

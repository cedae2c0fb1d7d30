"""Run folders: what identifies a run, the writer of its folder, its metrics and its plots."""

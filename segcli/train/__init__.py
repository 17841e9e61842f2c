"""Training: the loop, its configuration, optimisers and schedules, resumable state,
distributed helpers and the run-folder reports."""

"""Training: the config, the objective on a batch, the reference policy, the loop (``dpolab.train.trainer.train``),
checkpoints and resume, metrics and trackers, schedules, held-out evaluation, data parallelism."""

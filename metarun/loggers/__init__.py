"""The `logger` config group (conf/logger/): where a run's records go besides metrics.jsonl.

`logger=tensorboard` (the default), `csv`, `mlflow`, `wandb`, or several at once
(`logger=[tensorboard,mlflow]`); each option's keys are under its name (`logger.mlflow.tracking_uri`).
One module per logger, `Logger` and `RunInfo` in `base.py`; `named.py` builds the ones a config names
and checks each before the trainer writes anything. metarun.run_log.RunLog sends them every record.
"""

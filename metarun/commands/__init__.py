"""The console scripts, one module each, named for the script:

    metarun          train.py     compose the config, train and meta-test one run (or a sweep's job)
    metarun-eval     eval.py      meta-test a trained run again under other test settings
    metarun-predict  predict.py   a trained run's predictions for folders of your own images
    metarun-data     data.py      check a dataset before training on it
    metarun-report   report.py    a sweep's table, curves and paired comparisons

Each parses its arguments, calls the library (metarun.trainer, metarun.saved_run, metarun.predict,
metarun.report) and turns a `MetarunError` into one line on stderr and its exit code.
"""

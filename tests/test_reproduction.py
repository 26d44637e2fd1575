"""The default experiment end to end (`make run`): about 13 minutes on 2 CPU cores, so marked slow
and left out of `make test`; `make test-all` runs it."""

import pytest

from metarun.trainer import Trainer
from tests.conftest import compose_config


@pytest.mark.slow
def test_default_experiment_reaches_97_percent_on_omniglot_5w1s(
    tmp_path, omniglot_root, omniglot_cache
):
    cfg = compose_config(
        "+experiment=protonet_omniglot_5w1s",
        f"dataset.root={omniglot_root}",
        f"dataset.cache_dir={omniglot_cache}",
        "dataset.download=false",
        "device=cpu",
    )
    results = Trainer(cfg, tmp_path).run()
    assert results["episodes"] == 600
    assert results["test_accuracy"] >= 0.965  # measured: 97.1% +- 0.3

"""Meta-learning algorithms, one file per paper; each is a `MetaLearner` (base.py). Import each
from its module (`metarun.algorithms.maml.MAML`), as conf/algorithm/*.yaml name them: this package
does not gather them.
"""

"""Meta-learning algorithms, one file per paper; each is a `MetaLearner` (see base.py)."""

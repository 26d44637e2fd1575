"""Class datasets, the episode sampler and the TaskBatch they produce."""

from metarun.data.omniglot import Omniglot
from metarun.data.sampler import EpisodeSampler
from metarun.data.tasks import TaskBatch

__all__ = ["EpisodeSampler", "Omniglot", "TaskBatch"]

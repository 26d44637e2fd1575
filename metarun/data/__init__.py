"""Datasets and the episodes drawn from them; import each from its module, which this package does
not gather (building one reads files and fills caches, and a run imports only the one it names):

    contract     ClassDataset, TaskDataset, ClassImages, TaskSource: what a dataset declares
    omniglot, miniimagenet, cifar, folder    class datasets; sinusoid: a task dataset
    sampler      EpisodeSampler: N-way K-shot episodes of a class dataset, on the device
    tasks        TaskBatch: a meta-batch of episodes
    augment, cache, images, download         augmentation, the decoded-image cache, decoding
"""

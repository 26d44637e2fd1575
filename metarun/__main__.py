"""`python -m metarun ...`, which is also how torchrun starts it: `torchrun --nproc_per_node=G -m metarun ...`."""

from metarun.commands.train import main

main()

"""metarun: a config-driven meta-learning experiment runner.

`metarun.load(RUN_DIR)` reads a trained run back to adapt it to your own images (metarun.predict).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `import metarun` stays light: load brings in torch, Hydra and the trainer on first use only.
    if name == "load":
        from metarun.predict import load

        return load
    raise AttributeError(f"module 'metarun' has no attribute {name!r}")

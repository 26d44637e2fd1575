"""Hydra's composition errors (a mistyped key, an unknown group option, a wrong type) as one line.

Hydra prints these over several lines with a hint to set HYDRA_FULL_ERROR. We set it ourselves so
Hydra raises, then print the problem and its fix on one line. A user who sets HYDRA_FULL_ERROR=1
gets Hydra's own full report, as usual.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from hydra.errors import HydraException, MissingConfigException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

# Configs that a Hydra plugin registers once it is installed: which plugin, and the metarun extra
# that installs it (pyproject.toml).
PLUGIN_CONFIGS = {
    "hydra/launcher/submitit_": ("Hydra's submitit launcher", "slurm"),
    "hydra/sweeper/optuna": ("Hydra's Optuna sweeper", "optuna"),
}


@contextmanager
def one_line_composition_errors(prog: str = "metarun") -> Iterator[None]:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        yield
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    except (HydraException, OmegaConfBaseException) as e:
        print(f"{prog}: error: {describe(e)}", file=sys.stderr)
        sys.exit(2)
    finally:
        del os.environ["HYDRA_FULL_ERROR"]


def describe(error: BaseException) -> str:
    """The problem and the fix in one line."""
    if isinstance(error, MissingConfigException) and (plugin := _missing_plugin(error)):
        return plugin
    if isinstance(error, MissingConfigException) and error.options:
        return f"{_first_line(error)}; choose one of: {', '.join(error.options)}"
    cause = error.__cause__ if isinstance(error.__cause__, OmegaConfBaseException) else error
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and getattr(
        cause, "full_key", None
    ):
        return _unknown_key(cause)
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return f"{cause.full_key}: {_first_line(cause)}; fix the value (metarun --cfg job shows the expected ones)"
    return _first_line(error)


def _missing_plugin(error: MissingConfigException) -> str | None:
    """`hydra/launcher=slurm needs Hydra's submitit launcher: pip install 'metarun[slurm]'`, when a
    config of conf/hydra/ builds on a plugin's config that is not there, or the command names it."""
    missing = error.missing_cfg_file or ""
    for prefix, (plugin, extra) in PLUGIN_CONFIGS.items():
        if missing.startswith(prefix):
            group = missing.rsplit("/", 1)[0]
            # Hydra names the config whose defaults list asked for the missing one: "In 'hydra/launcher/slurm': ..."
            parent = re.match(r"In '([^']+)':", str(error))
            chosen = (
                parent.group(1) if parent and parent.group(1).startswith(group + "/") else missing
            )
            return "{}={} needs {}: pip install 'metarun[{}]'".format(
                *chosen.rsplit("/", 1), plugin, extra
            )
    return None


def _unknown_key(error: ConfigKeyError | ConfigAttributeError) -> str:
    key = error.full_key
    parent = getattr(error, "parent_node", None)
    siblings = [str(k) for k in parent.keys()] if parent is not None else []
    close = difflib.get_close_matches(str(error.key), siblings, n=1)
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    fix = f"did you mean {prefix}{close[0]}?" if close else "metarun --cfg job lists the keys"
    return f"unknown config key {key}; {fix} (prefix a new key with + to add it)"


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__

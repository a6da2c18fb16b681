"""What the project's command lines share."""

from __future__ import annotations

from absl import flags, logging


def library_logging_at_warning() -> None:
    """Shows library logging (Orbax, JAX) from WARNING up unless ``--verbosity`` was given.

    Call it first thing in an ``app.run`` main: once flags are parsed, absl turns INFO on
    for every library, and Orbax alone writes dozens of lines per checkpoint.
    ``--verbosity=0`` brings INFO back, ``--verbosity=1`` DEBUG.
    """
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)

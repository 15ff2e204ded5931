"""The calibration-data options shared by ``convert``, ``saliency`` and ``sweep``."""

from __future__ import annotations

from pathlib import Path

import click


def calib_options(fn):
    """Add --calib, --calib-samples and --data-dir to a click command (in this order in --help)."""
    opts = [
        click.option("--calib", metavar="TASK_OR_FILE", default=None,
                     help="Calibration data for awq/spqr and the calibrated quantizers: a GLUE task name "
                          "(its train split, e.g. rte) or a text/TSV file."),
        click.option("--calib-samples", type=click.IntRange(min=1), default=128, show_default=True,
                     help="Calibration examples (a --seed sample)."),
        click.option("--data-dir", type=click.Path(path_type=Path), default=None,
                     help="GLUE directory for --calib TASK (default: $EDGEQ_GLUE_DIR, else ../shared/data/glue)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn

"""Trains a stage model from videos or from still photos with synthetic camera motion.

    python train_stage.py tsr --out runs/tsr --steps 3000
    python train_stage.py ssr --scale 4 --videos /my/videos
    python train_stage.py tsr training.learning_rate=1e-4     # any config value, key=value

Interrupted runs resume from the checkpoint in --out when the same command runs again. The
options each stage takes are listed by `python train_stage.py tsr --help`.
"""

from __future__ import annotations

import logging
import sys

STAGES = ("tsr", "ssr")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in STAGES:
        print(f"usage: train_stage.py {{{','.join(STAGES)}}} [options]  (got {argv[:1] or 'nothing'})", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if argv[0] == "tsr":
        from stages.tsr.training import main as stage_main
    else:
        from stages.ssr.training import main as stage_main
    return stage_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())

"""Trains a stage model from videos or from still photos with synthetic camera motion.

    python train_stage.py tsr --out runs/tsr --steps 3000
    python train_stage.py ssr --scale 4 --videos /my/videos
    python train_stage.py tsr training.learning_rate=1e-4     # any config value, key=value

Interrupted runs resume from the checkpoint in --out when the same command runs again. The
options each stage takes are listed by `python train_stage.py tsr --help`.
"""

from __future__ import annotations

import importlib
import logging
import sys

# what -> the module whose main(argv) trains it
TRAINABLE = {
    "vae": "stages.base.vae_training",
    "text_encoder": "stages.base.text_encoder_training",
    "dit": "stages.base.dit_training",
    "tsr": "stages.tsr.training",
    "ssr": "stages.ssr.training",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in TRAINABLE:
        print(f"usage: train_stage.py {{{','.join(TRAINABLE)}}} [options]  (got {argv[:1] or 'nothing'})", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from stages.compiling import CompilerMissing

    try:
        return importlib.import_module(TRAINABLE[argv[0]]).main(argv[1:])
    except CompilerMissing as error:  # training.compile=true on a machine torch cannot compile on
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

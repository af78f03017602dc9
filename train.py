"""Train a model: `python train.py [+experiment=NAME] [key=value ...]` (see configs/train.yaml)."""
import sys

import hydra

from core import cli, config
from core.errors import UserError

config.register()


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg) -> float | None:
    from core.loop import run  # after Hydra parsed argv: `--help` and compose errors stay fast

    try:
        return run(cfg)["val_loss"]
    except UserError as e:
        cli.fail(e)


if __name__ == "__main__":
    cli.preflight("train", sys.argv[1:])
    main()

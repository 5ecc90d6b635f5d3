"""python -m finetune [group=option ...] [key=value ...]: compose, validate, plan, train."""

import os
import sys

import hydra
from omegaconf import DictConfig

from finetune import UserError, config_dir, schema  # noqa: F401 - schema registers itself with Hydra
from finetune.errors import explain


def _fail(message: str) -> None:
    print(f"finetune: error: {message}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="finetune")
def _job(cfg: DictConfig) -> None:
    from finetune import pipeline  # heavy imports only once there is a job to run

    try:
        pipeline.run(cfg)
    except UserError as err:
        _fail(str(err))


def main() -> None:
    # Hydra prints its own composition errors and exits; with HYDRA_FULL_ERROR it raises them, so we
    # can turn them into one clear line with a did-you-mean. Whoever set it himself gets the traceback.
    raw = "HYDRA_FULL_ERROR" in os.environ
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _job()
    except Exception as err:
        message = explain(err)
        if raw or message is None:
            raise
        _fail(message)


if __name__ == "__main__":
    main()

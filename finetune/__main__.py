"""python -m finetune [group=option ...] [key=value ...]: compose, validate, plan, train."""

from finetune.errors import run_cli


def _train(cfg) -> None:
    from finetune import pipeline  # heavy imports only once there is a job to run

    pipeline.run(cfg)


def main() -> None:
    run_cli(_train)


if __name__ == "__main__":
    main()

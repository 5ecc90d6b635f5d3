"""finetune: fine-tune LLMs on your own GPU.

`python -m finetune` composes the Hydra config groups in configs/ and runs `finetune.pipeline.run`.
Importing this package stays light (no torch): heavy libraries load only where a step uses them.
"""

import warnings
from pathlib import Path

__version__ = "0.1.0"


class UserError(Exception):
    """A problem the user can fix: bad configuration, missing weights or data. Printed without a traceback."""


class FinetuneWarning(UserWarning):
    """A setting that has no effect or cannot be honoured; the CLI prints it as one line."""


def warn(message: str) -> None:
    warnings.warn(message, FinetuneWarning, stacklevel=2)


def cache_dir() -> Path:
    """finetune's own cache (converted models, architecture readings): FINETUNE_CACHE or ~/.cache/finetune."""
    import os

    return Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune"))


def config_dir() -> Path:
    """The packaged configs: finetune/configs in a wheel, the top-level configs/ in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "finetune.yaml").is_file():
            return candidate
    raise UserError(f"finetune's configs/ folder is missing next to {here}; reinstall the package.")

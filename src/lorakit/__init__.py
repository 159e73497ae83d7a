"""lorakit: fine-tune small language models with LoRA and QLoRA.

The Python API mirrors the CLI:

    import lorakit
    cfg = lorakit.load_config("config.yaml", ["train.max_steps=20"])
    result = lorakit.train(cfg)              # trains, saves runs/…/adapter, then evaluates
    summary = lorakit.evaluate("runs/demo")  # base vs tuned on held-out prompts
"""

__version__ = "0.1.0"

from lorakit.api import TrainResult, check, evaluate, init, train  # noqa: E402
from lorakit.config import Config, ConfigError, load_config  # noqa: E402
from lorakit.errors import LorakitError  # noqa: E402
from lorakit.train.loop import Interrupted  # noqa: E402

__all__ = ["Config", "ConfigError", "Interrupted", "LorakitError", "TrainResult", "check", "evaluate", "init",
           "load_config", "train"]

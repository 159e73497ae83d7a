"""`lorakit train CONFIG --nproc N`: N training processes on this machine, started by torch's elastic
launcher (what `torchrun --standalone` runs): gloo between CPU processes, NCCL between GPUs. Several
machines use `accelerate launch` or `torchrun` directly (docs/distributed.md); the processes run the
same `lorakit train` either way.
"""

import signal
import sys
import uuid

from lorakit.errors import RunFailed


def train_processes(argv: list[str], nproc: int) -> None:
    """Run `lorakit train ARGV` in `nproc` processes and wait for them. A failure ends every process;
    a bad-input (2) or interrupted (130) exit passes through silently, since that process has said why."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    try:
        elastic_launch(config, sys.executable)("-m", "lorakit.cli", "train", *argv)
    except SignalException:  # Ctrl-C or SIGTERM: passed on to the processes, which checkpoint and stop
        raise SystemExit(130) from None
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode in (2, 130):
            raise SystemExit(failure.exitcode) from None
        raise RunFailed(f"training process {rank} of {nproc} failed ({_exit_text(failure.exitcode)}); every process "
                        f"was stopped. Its output is above. Continue from the last checkpoint with --resume "
                        f"(same --nproc).") from None


def _exit_text(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"

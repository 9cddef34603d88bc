"""Processes and devices: torchrun's DistributedDataParallel environment, or a single process; the device to use.

One train.py serves `python train.py` and `torchrun ... train.py`: `Dist` reads RANK/WORLD_SIZE/LOCAL_RANK, starts
NCCL on CUDA and gloo on the CPU, and gives the few collectives the loop needs (sums of metrics, broadcasting the
resumed checkpoint, agreeing on an error so that every rank stops together). Rank-0-only work is gated on
`Dist.master`.

    torchrun --nproc_per_node 4 train.py --train_data_dir D/train --test_data_dir D/test        # one node
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:PORT train.py ...
"""
import datetime
import os
import re
import signal

import torch

from cli import UserError

TIMEOUT = datetime.timedelta(minutes=10)  # a rank that stops answering ends the job after this


class Dist:
    """torchrun's environment, or a single process. Rank-0-only work is gated on `master`."""

    def __init__(self):
        self.on = "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) >= 1 \
            and "LOCAL_RANK" in os.environ
        self.rank = int(os.environ["RANK"]) if self.on else 0
        self.world_size = int(os.environ["WORLD_SIZE"]) if self.on else 1
        self.local_rank = int(os.environ["LOCAL_RANK"]) if self.on else 0
        self.master = self.rank == 0
        self.started = False

    def __enter__(self):
        if not self.on:
            return self
        import torch.distributed as dist

        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            backend = "nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT)
        # For the end of the run only: the other ranks wait there while rank 0 scores the whole test split, which
        # may outlast TIMEOUT; a rank that dies meanwhile still ends the job (torchrun stops every rank).
        self.end_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
        self.started = True
        return self

    def __exit__(self, *exc):
        if self.started:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.started = False

    def log(self, *args, **kwargs):
        """print on rank 0 only."""
        if self.master:
            print(*args, **kwargs)

    def exit_on_sigterm(self, folder):
        """Under torchrun: SIGTERM (torchrun stopping the survivors when one rank fails) says so and exits at once."""
        if not self.on:
            return

        def on_sigterm(signum, frame):
            if self.master:  # os.write: the handler may interrupt a print (tqdm's) on the same buffered stream
                os.write(2, f"\nerror: rank 0 stopped by SIGTERM (torchrun stops every rank when one fails or the job "
                            f"is interrupted: see its summary); checkpoints in {folder} are kept\n".encode())
            os._exit(143)  # no clean-up that could wait on the dead rank

        signal.signal(signal.SIGTERM, on_sigterm)

    def barrier(self):
        if self.started:
            import torch.distributed as dist

            dist.barrier()

    def finish(self):
        """Every rank waits for rank 0's end-of-run work, so that no rank tears its process group down while
        another still holds connections to it (a rank leaving early could abort in gloo's teardown)."""
        if self.started:
            import torch.distributed as dist

            dist.barrier(group=self.end_group)

    def first_error(self, message):
        """Every rank's error message (or None) -> the first one, on every rank: all ranks stop together."""
        if not self.started:
            return message
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, message)
        for rank, m in enumerate(out):
            if m is not None:
                return m if rank == 0 else f"rank {rank}: {m}"
        return None

    def agreed(self, fn):
        """Run fn() on every rank; if any rank raises UserError, every rank raises the first one."""
        try:
            result, message = fn(), None
        except UserError as e:  # a data folder that cannot serve is the user's to fix, too (DatasetError)
            result, message = None, str(e)
        message = self.first_error(message)
        if message is not None:
            raise UserError(message)
        return result

    def broadcast(self, obj):
        if not self.started:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce(self, t):
        """Sum over ranks, in place."""
        if self.started:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t

    def lost_contact(self, e, kept):
        """A UserError for an exception that means another rank died or the network failed, else None."""
        if not self.started or not is_comm_error(e):
            return None
        first = re.sub(r"^\[[^\]]*\]\s*", "", (str(e).strip() or type(e).__name__).splitlines()[0])[:160]
        return UserError(f"rank {self.rank}: lost contact with the other processes (a rank died or the network "
                         f"failed: {first}); checkpoints up to {kept} are kept")


def is_comm_error(e):
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(s in text for s in ("gloo", "nccl", "connection", "peer", "timed out"))


def pick_device(device_ids, dist):
    """cuda:LOCAL_RANK under torchrun, cuda:<first of --device_ids> in one process, or the CPU without CUDA."""
    if dist.on:
        return torch.device(f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        return torch.device("cpu")
    n = torch.cuda.device_count()
    bad = [i for i in device_ids if i >= n]
    if bad:
        raise UserError(f"--device_ids {bad[0]}: this machine has {n} CUDA device(s)")
    return torch.device(f"cuda:{device_ids[0]}")


def cpu_has_bf16():
    """Whether oneDNN runs bf16 natively on this CPU (AVX-512 bf16 or AMX); True when torch cannot tell."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # private in torch 2.13: guard against its loss
    except (AttributeError, RuntimeError):
        return True

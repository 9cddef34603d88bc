"""Processes and devices: torchrun's DistributedDataParallel environment, or a single process; the device to use.

One train.py serves `python train.py` and `torchrun ... train.py`: `Dist` reads RANK/WORLD_SIZE/LOCAL_RANK, starts
NCCL on CUDA and gloo on the CPU, and gives the few collectives the loop needs (sums of metrics, broadcasting the
resumed checkpoint, agreeing on an error so that every rank stops together). Rank-0-only work is gated on
`Dist.master`; how signals stop a run: stops.py.

    torchrun --nproc_per_node 4 train.py --train_data_dir D/train --test_data_dir D/test        # one node
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:PORT train.py ...
"""
import datetime
import os
import re

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
        self.local_world_size = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) if self.on else 1
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
        # torchrun's store outlives a restart of the workers (--max-restarts): keys of the attempt before, such as a
        # dead rank's address, would be read as this attempt's. A prefix per attempt keeps them apart.
        store, _, _ = next(dist.rendezvous("env://", timeout=TIMEOUT))
        store = dist.PrefixStore(f"gqn/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world_size, timeout=TIMEOUT)
        # For the end of the run only: the other ranks wait there while rank 0 scores the whole test split, which
        # may outlast TIMEOUT; a rank that dies meanwhile still ends the job (torchrun stops every rank).
        self.end_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
        self.started = True
        return self

    def __exit__(self, kind, value, tb):
        if self.started and kind is None:  # a failing rank leaves without a teardown that could wait on a dead peer
            import torch.distributed as dist

            dist.destroy_process_group()
        self.started = False

    def log(self, *args, **kwargs):
        """print on rank 0 only."""
        if self.master:
            print(*args, **kwargs)

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

    def average(self, grads):
        """Gradients (a list of tensors) -> their mean over the ranks, in place, in one all-reduce of their
        concatenation (what DDP does in buckets, for a step that does not call the DDP wrapper)."""
        if not self.started:
            return
        import torch.distributed as dist

        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))

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


def cpu_has_fp16():
    """Whether oneDNN runs float16 natively on this CPU (avx512_fp16 or AMX-FP16); True when torch cannot tell."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())  # private in torch 2.13, as for bf16
    except (AttributeError, RuntimeError):
        return True


def check_amp(amp, device):
    """Refuse a precision this device would emulate: one line that says why and what to use instead."""
    if amp == "fp16" and device.type == "cpu" and not cpu_has_fp16():
        # measured on the 2-core EPYC (avx512_bf16, no avx512_fp16): the cpu preset's step 1076-1100 ms in fp16
        # against 149-157 ms in float32; the paper's networks (L=2, batch 2, 64 px, one thread) 15-40 s against
        # 0.76-0.89 s
        other = "--amp bf16 (this CPU has it) or --amp none" if cpu_has_bf16() else "--amp none"
        raise UserError("--amp fp16: oneDNN has no float16 instructions to use here (avx512_fp16 or AMX-FP16: absent, "
                        "or held back by ONEDNN_MAX_CPU_ISA), so PyTorch emulates float16, 7x (the cpu preset) to "
                        f"20-50x (the paper's networks) slower than float32 (measured on an AVX-512 EPYC); use {other}")
    if amp != "bf16":
        return None
    if device.type == "cpu" and not cpu_has_bf16():
        # measured: the paper's model, forward + backward + Adam, 159 s a step in bf16 against 7.4 s in float32
        raise UserError("--amp bf16: oneDNN has no bf16 instructions to use here (avx512_bf16 or AMX: absent, or "
                        "held back by ONEDNN_MAX_CPU_ISA), so PyTorch emulates bf16, about 21x slower than float32 "
                        "(measured on an AVX2-only EPYC); use --amp none")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise UserError(f"--amp bf16: {torch.cuda.get_device_name(device)} has no native bf16 (GPUs before A100 "
                        f"emulate it); use --amp fp16, which scales the loss to keep small gradients")
    return None


def wrap(model, cfg, device, threads, dist):
    """What a step calls, and the mean of its gradients over the ranks where the step takes it itself -> (net,
    average). The one place that decides: a batch split over threads calls the raw module from every thread and
    averages the threads' sum over the ranks itself (no DDP wrapper); otherwise DDP under torchrun, nn.DataParallel
    over several CUDA devices, and torch.compile around either."""
    if dist.started and threads > 1:
        return model, dist.average
    net = model
    if dist.started:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    elif device.type == "cuda" and len(cfg.device_ids) > 1:
        if cfg.compile:
            raise UserError("--compile works on one device or under torchrun (DDP), not with nn.DataParallel "
                            "(--device_ids with several ids)")
        net = torch.nn.DataParallel(model, device_ids=list(cfg.device_ids))
    if cfg.compile:
        net = torch.compile(net)
    return net, None

"""Processes and devices: torchrun's DistributedDataParallel environment, or a single process; the device to use.

One train.py serves `python train.py` and `torchrun ... train.py`: `Dist` reads RANK/WORLD_SIZE/LOCAL_RANK, starts
NCCL on CUDA and gloo on the CPU, and gives the few collectives the loop needs (sums of metrics, broadcasting the
resumed checkpoint, agreeing on an error so that every rank stops together). Rank-0-only work is gated on
`Dist.master`. `Stop` turns SIGTERM/SIGINT into a stop at the end of the step in flight, in every process.

    torchrun --nproc_per_node 4 train.py --train_data_dir D/train --test_data_dir D/test        # one node
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:PORT train.py ...
"""
import datetime
import os
import re
import signal
import threading

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


class Stop:
    """SIGINT (Ctrl-C) and SIGTERM (a cluster preempting the job, torchrun stopping its workers).

    In the `phase` "training", the first signal only asks for a stop (`requested`): the loop finishes the step in
    flight, writes latest.pt and exits. Otherwise it interrupts the main thread (KeyboardInterrupt, whose message
    says what is saved), or under torchrun (`at_once`) ends the process with that message: torchrun is stopping
    every worker, and a teardown could wait on a dead one. A watcher thread hears every signal even while the main
    thread is blocked in C++ (a collective whose peer died): it ends the process at once on a second signal, and
    when the first one has not been acted on within `grace()` seconds.
    """
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, grace, give_up, at_once=False):
        self.grace, self.give_up = grace, give_up  # () -> seconds; (signal name, why) -> the line printed on exit
        self.at_once = at_once
        self.phase = "setup"  # "setup", "training" (a signal asks for a stop), "score" (training has finished)
        self.requested, self.acted = None, threading.Event()

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        read, write = os.pipe()
        os.set_blocking(write, False)
        self._wakeup = signal.set_wakeup_fd(write)  # the C-level handler writes each signal's number here
        self._pipe = read, write
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()
        return self

    def __exit__(self, *exc):
        signal.set_wakeup_fd(self._wakeup)
        for s, old in self._old.items():
            signal.signal(s, old)
        os.close(self._pipe[1])  # ends the watcher, which must be gone before torch tears the process down
        self._watcher.join(5)

    def _handler(self, signum, frame):
        if self.phase != "training":
            self.acted.set()
            if self.at_once:
                self._exit(signal.Signals(signum).name, "outside the training loop")
            raise KeyboardInterrupt(signal.Signals(signum).name)
        self.requested = self.requested or signal.Signals(signum).name

    def _watch(self):
        heard = 0
        while True:
            try:
                data = os.read(self._pipe[0], 16)
            except OSError:
                data = b""
            if not data:  # __exit__ closed the other end
                os.close(self._pipe[0])
                return
            for signum in data:
                if signum not in self.SIGNALS:
                    continue
                heard += 1
                name = signal.Signals(signum).name
                if heard == 1:
                    grace = self.grace()
                    threading.Thread(target=self._wait_then_exit, args=(name, grace), daemon=True).start()
                else:
                    self._exit(name, f"a second {name}")

    def _wait_then_exit(self, name, grace):
        if not self.acted.wait(grace):
            self._exit(name, f"{name} not acted on within {grace:.0f} s")

    def _exit(self, name, why):
        text = self.give_up(name, why)
        if text:  # os.write: no lock a blocked thread may hold
            os.write(2, f"\n{text}\n".encode())
        os._exit(128 + signal.Signals[name].value)


def pause_for_test(moment):
    """A test's hook: with GQN_TEST_PAUSE=<moment> ("step N": after step N, its checkpoint included; "score": before
    the end-of-run score), the process stops itself (SIGSTOP) there, so that a test can signal, kill or damage a
    running job at a moment chosen by its progress, on a machine of any speed, and continue it with SIGCONT. Signals
    sent while it is stopped are handled when it continues, before it moves on."""
    if os.environ.get("GQN_TEST_PAUSE") == moment:
        os.kill(os.getpid(), signal.SIGSTOP)


def worker_ignores_signals(worker_id):
    """DataLoader workers leave SIGINT/SIGTERM to the training process, which stops them when it is done."""
    for s in Stop.SIGNALS:
        signal.signal(s, signal.SIG_IGN)


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

"""Hogwild!: workers update one shared-memory model and one shared momentum buffer without locks.

Each worker loops: read mu, alpha and the clip levels from shared tensors, compute a gradient on the shared
model (which other workers keep changing underneath it), then apply heavy ball in place: v <- mu v + s g;
x <- x - alpha v, with s the factor the tuner's own step would put on g (its clip). The tuner (the calling process)
owns mu, alpha and the clip levels: it reads every gradient the workers apply from per-worker mailboxes, feeds
each to a YellowFin instance that only measures and tunes, and writes the tuned (applied) mu and alpha and the clip
levels back to shared memory. With ``closed_loop=True`` a momentum sensor and controller correct mu for the
momentum asynchrony adds.

What the scale-free tuner (the default, DoWG's step) needs of the run, and how it gets it:
- the distance the run has travelled, ||x - x_0||: the tuner steps a private copy of the parameters (the shadow),
  which is set to the shared model just before each of its steps, so it measures the shared model's distance from
  x_0 (the shared model's parameters when the tuner first stepped, before anything moved them: its step is 0 until
  then); what its own step does to the shadow is overwritten before the next;
- every applied gradient, once: its step divides by the root of a sum over the gradients, and a tuner that saw a
  fraction f of them would step 1/sqrt(f) too far (a single mailbox per worker, skipped when full, let it see 7% on
  the tests' regression problem). So each worker has a ring of ``mail_slots`` mailboxes and waits for a free one
  before it computes a gradient: Hogwild runs no faster than its tuner steps;
- its clip: the tuner writes the levels at which its next step would cut the gradient (``update_clip_levels``) and
  each worker applies that cut (``clip_scale``) to the gradient it applies; it mails the gradient as it came.

Sensing needs iterates indexed by version: after its update a worker takes a version number from a shared
counter and stores a snapshot of the sensor's coordinates in a ring buffer slot for that version, with the
alpha it used. Those snapshots are taken while others write, so they are approximate: that is Hogwild.

    hogwild = Hogwild(model, task.loss, batch_factory, num_workers=4, closed_loop=True)
    with hogwild:
        report = hogwild.run(num_updates=4000)
"""

from __future__ import annotations

import logging
import math
import time

import torch
from torch import nn

from ..files import load_all_or_nothing, load_checkpoint_file, save_checkpoint_file
from ..tuned import mean_staleness, refuse_under_asynchrony, report_staleness, update_clip_levels
from .controller import closed_loop_for
from .flat import flat_parameters, gradient_problem, load_gradients, loss_and_flat_gradient, split_like
from .sensor import MomentumSensor, lr_outside_correction, random_coordinate_subset
from .workers import StopSignal, WorkerProcesses, prepare_worker

logger = logging.getLogger(__name__)


def heavy_ball_in_place(params, buffers, grads, mu: float, alpha: float, grad_scale: float = 1.0) -> None:
    """v <- mu v + s g; x <- x - alpha v, in place and without locks (lr-outside form; s = ``grad_scale``). alpha is
    bounded to the parameters' dtype as the tuner's own pass bounds it (a tiny gradient's alpha can exceed it)."""
    with torch.no_grad():
        for p, v, g in zip(params, buffers, grads):
            v.mul_(mu).add_(g, alpha=grad_scale)
            p.sub_(min(alpha, torch.finfo(p.dtype).max) * v)


def clip_scale(grad_norm: float, levels) -> float:
    """The factor s on a gradient of norm ``grad_norm`` that the tuner's step would apply, from the absolute levels
    (clip_norm, trigger, level) it wrote (``tuned.update_clip_levels``): the manual clip to ``clip_norm``, then, above
    ``trigger``, the relative clip to norm ``level``. As ``tuning.clipping_scales`` (tested against it)."""
    clip_norm, trigger, level = (float(x) for x in levels)
    scale = clip_norm / grad_norm if grad_norm > clip_norm else 1.0
    if scale * grad_norm > trigger:
        scale *= min(level / (scale * grad_norm), 1.0)
    return scale


class _Shared:
    """Everything the processes share, in one picklable bundle."""

    def __init__(self, ctx, params, num_workers: int, subset: torch.Tensor, ring_size: int, mail_slots: int):
        numel = sum(p.numel() for p in params)
        self.buffers = [torch.zeros_like(p).share_memory_() for p in params]
        self.hyper = torch.zeros(2, dtype=torch.float64).share_memory_()        # mu, alpha
        # clip_norm, trigger, level of the tuner's clip (tuned.update_clip_levels); inf: none
        self.clip = torch.full((3,), math.inf, dtype=torch.float64).share_memory_()
        # Updates applied. Read without a lock; the lock only hands out unique version numbers.
        self.counter = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.counter_lock = ctx.Lock()
        self.limit = torch.zeros(1, dtype=torch.int64).share_memory_()         # run until counter >= limit
        self.subset = subset.share_memory_()
        self.ring = torch.zeros(ring_size, subset.numel(), dtype=torch.float64).share_memory_()
        self.ring_version = torch.full((ring_size,), -1, dtype=torch.int64).share_memory_()
        self.ring_alpha = torch.zeros(ring_size, dtype=torch.float64).share_memory_()
        # One ring of mailboxes per worker (single writer, single reader): the worker fills slot written % slots
        # and then counts it in mail_written; the tuner empties slot read % slots and then counts it in mail_read.
        # mail_slots = 0: nobody reads (no tuner), and nothing is mailed.
        self.mail_grad = torch.zeros(num_workers, mail_slots, numel).share_memory_()
        self.mail_version = torch.zeros(num_workers, mail_slots, dtype=torch.int64).share_memory_()
        self.mail_loss = torch.zeros(num_workers, mail_slots, dtype=torch.float64).share_memory_()
        self.mail_written = torch.zeros(num_workers, dtype=torch.int64).share_memory_()
        self.mail_read = torch.zeros(num_workers, dtype=torch.int64).share_memory_()
        # 1 while a worker waits (for the limit to rise or for a free mailbox) and has nothing in flight
        self.waiting = torch.zeros(num_workers, dtype=torch.int64).share_memory_()
        self.rejected = torch.zeros(num_workers, dtype=torch.int64).share_memory_()  # one writer each
        self.stop = StopSignal()


def _hogwild_worker(worker_id: int, model: nn.Module, loss_fn, batch_factory, seed: int,
                    shared: _Shared) -> None:
    params, batches = prepare_worker(model, batch_factory, worker_id, seed)
    ring_size = shared.ring.shape[0]
    slots = shared.mail_grad.shape[1]
    while not shared.stop.should_stop():  # also exits if the tuner process is gone
        # (cleared before the checks, so that the tuner never reads "waiting" from a worker about to compute)
        shared.waiting[worker_id] = 0
        if int(shared.counter[0]) >= int(shared.limit[0]):
            shared.waiting[worker_id] = 1
            time.sleep(0.001)
            continue
        if slots and int(shared.mail_written[worker_id]) - int(shared.mail_read[worker_id]) >= slots:
            shared.waiting[worker_id] = 1  # the tuner must see every gradient applied: wait for a free mailbox
            time.sleep(0.0002)
            continue
        version = int(shared.counter[0])
        mu, alpha = float(shared.hyper[0]), float(shared.hyper[1])
        flat_grad, loss = loss_and_flat_gradient(loss_fn, model, params, next(batches))
        grads = list(split_like(flat_grad, params))
        flat_numpy = flat_grad.numpy()
        if gradient_problem(flat_numpy, flat_numpy.size, flat_numpy.dtype) is not None:
            shared.rejected[worker_id] += 1  # one NaN applied would poison the shared model for good
            continue
        scale = clip_scale(float(torch.linalg.vector_norm(flat_grad, dtype=torch.float64)), shared.clip)
        heavy_ball_in_place(params, shared.buffers, grads, mu, alpha, scale)
        new_version = _take_version(shared)
        if new_version is None:
            return
        slot = new_version % ring_size
        shared.ring_version[slot] = -1  # mark the slot as being rewritten
        shared.ring[slot] = flat_parameters(params)[shared.subset].double()
        shared.ring_alpha[slot] = alpha
        shared.ring_version[slot] = new_version
        if slots:  # (a free mailbox was waited for above, and only this worker fills its ring)
            written = int(shared.mail_written[worker_id])
            box = written % slots
            shared.mail_grad[worker_id, box] = flat_grad
            shared.mail_version[worker_id, box] = version
            shared.mail_loss[worker_id, box] = loss
            shared.mail_written[worker_id] = written + 1


def _take_version(shared: _Shared) -> int | None:
    """The next version number, unique among the workers; None if the worker is to stop meanwhile.

    The lock is taken with a timeout and the stop signal checked between tries: a worker killed while it held
    the lock leaves it held until the server frees it on its behalf, and if the server dies first, a worker
    blocked for good would never see that its parent is gone and would outlive it."""
    while not shared.counter_lock.acquire(timeout=0.05):
        if shared.stop.should_stop():
            return None
    try:
        new_version = int(shared.counter[0]) + 1
        shared.counter[0] = new_version
        return new_version
    finally:
        shared.counter_lock.release()


class Hogwild(WorkerProcesses):
    """Lock-free asynchronous training on one machine, tuned by YellowFin (optionally closed-loop).

    Arguments:
        model: trained in place (its parameters are moved to shared memory).
        loss_fn(model, batch) -> scalar; batch_factory(worker_id, seed) -> endless batch iterator.
        tuner: "yellowfin" (default: ``YellowFin``, the library's default tuner, which with more than one worker
            runs only with ``closed_loop=True``, as in the other systems; for an open-loop run pass
            ``tuner=YellowFin.reference_variant``), a callable params -> YellowFin-like optimizer, or None for fixed
            ``lr``/``momentum`` (plain Hogwild momentum SGD). The workers apply plain heavy ball, so a tuner in
            Adam's metric (``precondition="adam"``), with Nesterov's form, weight decay or several (mu, alpha) is
            refused (``tuned.refuse_under_asynchrony``).
        closed_loop: attach the sensor and controller (``sensor_step`` and ``gain`` as in
            :func:`closed_loop_for`).
        mail_slots: mailboxes per worker; a worker waits for a free one before it computes, so that the tuner sees
            every gradient applied (more slots absorb the tuner's pauses, at the cost of a tuner further behind).
        replace_dead_workers, max_restarts, restart_window: as for the parameter server (a worker that
            dies more often than its budget allows stops the run with ``WorkerFailed``).
    """

    def __init__(self, model: nn.Module, loss_fn, batch_factory, num_workers: int = 4,
                 tuner="yellowfin", lr: float = 0.01, momentum: float = 0.0, closed_loop: bool = False,
                 sensor_step: str = "algorithmic", gain: float = 0.01, sensor_subset: int = 512,
                 seed: int = 0, ring_size: int = 512, mail_slots: int = 4, start_method: str = "fork",
                 join_timeout: float = 5.0, replace_dead_workers: bool = True, max_restarts: int = 3,
                 restart_window: float = 60.0):
        super().__init__(num_workers, seed, loss_fn, batch_factory, start_method, join_timeout,
                         replace_dead_workers, max_restarts, restart_window)
        if isinstance(mail_slots, bool) or not isinstance(mail_slots, int) or mail_slots < 1:
            raise ValueError(f"invalid mail_slots={mail_slots!r}: allowed is an integer >= 1")
        self.model = model
        model.share_memory()
        self.params = [p for p in model.parameters() if p.requires_grad]
        numel = sum(p.numel() for p in self.params)

        if tuner == "yellowfin":
            from yellowfin import YellowFin
            tuner = YellowFin
        # The tuner steps a private copy of the parameters (the shadow), set to the shared model before each of its
        # steps: it measures and tunes, and what its step does to the copy is dropped.
        self.shadow = [p.detach().clone().requires_grad_(True) for p in self.params]
        self.tuner = tuner(self.shadow) if tuner is not None else None
        refuse_under_asynchrony(self.tuner, num_workers, closed_loop, workers_apply_heavy_ball=True)
        self.controller = None
        self.sensor: MomentumSensor | None = None
        if closed_loop:
            if self.tuner is None:
                raise ValueError("closed_loop needs a tuner")
            self.controller = closed_loop_for(self.tuner, numel, self.num_workers, sensor_step, gain,
                                              sensor_subset, seed=seed)
            self.sensor = self.controller.sensor
        subset = self.sensor.subset if self.sensor is not None else random_coordinate_subset(
            numel, sensor_subset, seed)
        self.staleness_counts: dict[int, int] = {}  # of the gradients the tuner saw: every one applied
        self.shared = _Shared(self._ctx, self.params, self.num_workers, subset, ring_size,
                              mail_slots if self.tuner is not None else 0)
        self.shared.hyper[0] = momentum
        self.shared.hyper[1] = lr
        if self.tuner is not None:
            self._write_tuned()

        self.tuned_gradients = 0
        self._rejected_reported = 0
        self.trace: list[dict] = []

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return int(self.shared.counter[0])

    def start(self) -> None:
        if self._workers:
            return
        self.shared.stop = StopSignal()  # made here: it records the pid of the process that forks
        for worker_id in range(self.num_workers):
            self._start_worker(worker_id)

    def _start_worker(self, worker_id: int) -> None:
        seed = self._next_seed(worker_id)
        # (a replacement appends to its predecessor's mailboxes, whose mailed gradients the tuner still reads)
        self.shared.waiting[worker_id] = 0
        self._launch(worker_id, f"yellowfin-hogwild-{worker_id}", _hogwild_worker,
                     (worker_id, self.model, self.loss_fn, self.batch_factory, seed, self.shared))

    def stop(self) -> None:
        self.shared.stop.set()
        self._join_workers()

    # -- tuning ---------------------------------------------------------------------------
    def _write_tuned(self) -> None:
        tuned = self.tuner.stats(0)
        multiplier = float(self.tuner.param_groups[0].get("lr", 1.0))
        alpha = multiplier * float(tuned["alpha"])
        if tuned["step"] == 0 and self.tuner.param_groups[0].get("tuner") == "scale_free":
            # The scale-free tuner's first step is DoG's start, set by its first gradient; until then nothing moves,
            # so that its x_0 (taken at that step) is the model the run started from.
            alpha = 0.0
        self.shared.hyper[0] = float(tuned["applied_momentum"])
        self.shared.hyper[1] = alpha
        self.shared.clip.copy_(torch.tensor(update_clip_levels(self.tuner), dtype=torch.float64))

    def _sense(self, version: int, grad: torch.Tensor) -> None:
        ring_size = self.shared.ring.shape[0]
        slots = [(version + k) % ring_size for k in (-1, 0, 1)]
        if version < 1 or [int(self.shared.ring_version[s]) for s in slots] != [version - 1, version,
                                                                                 version + 1]:
            self.sensor.missed += 1
            return
        x_prev, x_s, x_next = (self.shared.ring[s].clone() for s in slots)
        alpha_prev, alpha_s = float(self.shared.ring_alpha[slots[1]]), float(self.shared.ring_alpha[slots[2]])
        correction = lr_outside_correction(alpha_prev, alpha_s) if self.sensor.lr_outside else 1.0
        self.sensor.observe_triplet(x_prev, x_s, x_next, grad[self.shared.subset], alpha_s, correction)

    def _step_tuner(self, grad: torch.Tensor) -> None:
        """One tuner step on ``grad``, measured at the shared model: the scale-free tuner's distance is the run's."""
        with torch.no_grad():
            for shadow, p in zip(self.shadow, self.params):
                shadow.copy_(p)
        load_gradients(self.shadow, grad)
        self.tuner.step()

    def _tune_on(self, worker_id: int) -> None:
        """Tune on the oldest gradient in ``worker_id``'s mailboxes (which the caller has seen written)."""
        read = int(self.shared.mail_read[worker_id])
        box = read % self.shared.mail_grad.shape[1]
        grad = self.shared.mail_grad[worker_id, box].clone()
        version = int(self.shared.mail_version[worker_id, box])
        loss = float(self.shared.mail_loss[worker_id, box])
        # The staleness is the delay with which the tuner's step hears of the run: the updates applied between the
        # gradient's read and this tuner step, not only those before its own update. The workers have applied the
        # gradient already, with a step tuned on older ones, and the scale-free step calibrates on the movement it
        # causes: counted only to its own update, the tuner's lag behind the workers went uncut, and on the digits
        # MLP its step ran away even with one worker (docs/asynchrony.md, "Hogwild").
        staleness = max(self.version - 1 - version, 0)
        # (the version is read before the mailbox is freed: a worker waiting for it cannot then add an update, so with
        # one worker the staleness stays below mail_slots)
        self.shared.mail_read[worker_id] = read + 1  # (workers mail only gradients they applied: finite ones)
        self.staleness_counts[staleness] = self.staleness_counts.get(staleness, 0) + 1
        report_staleness(self.tuner, self.staleness_counts)
        self._step_tuner(grad)
        if self.sensor is not None:
            self._sense(version, grad)
        if self.controller is not None:
            self.controller.update()
        self._write_tuned()
        self.tuned_gradients += 1
        self.trace.append({"version": self.version, "gradient_version": version, "loss": loss,
                           "mu_target": float(self.tuner.stats(0)["mu"]),
                           "mu_applied": float(self.shared.hyper[0]),
                           "alpha": float(self.shared.hyper[1]),
                           "mu_hat": self.sensor.estimate if self.sensor is not None else None})

    def _read_mail(self) -> int:
        """Tune on every gradient mailed so far, one worker's at a time in turn; returns how many."""
        if self.tuner is None:
            return 0
        pending = (self.shared.mail_written - self.shared.mail_read).tolist()
        tuned = 0
        while any(count > 0 for count in pending):
            for worker_id, count in enumerate(pending):
                if count > 0:
                    self._tune_on(worker_id)
                    pending[worker_id] -= 1
                    tuned += 1
        return tuned

    def run(self, num_updates: int, timeout: float | None = None) -> dict:
        """Let the workers apply ``num_updates`` more updates while this process tunes; returns once the workers
        are idle and the tuner has read every gradient they mailed."""
        self.start()
        target = self.version + int(num_updates)
        self.shared.limit[0] = target
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if deadline is not None and time.monotonic() > deadline:
                self.shared.limit[0] = self.version
                raise TimeoutError(f"hogwild reached {self.version} of {target} updates")
            self._check_workers()
            # (read before the mail: a worker marks itself waiting only after its last gradient is mailed)
            idle = self.version >= target and all(int(self.shared.waiting[w]) for w in self._workers)
            tuned = self._read_mail()
            if idle and not tuned:
                break
            if not tuned:
                time.sleep(0.0005)
        rejected = self.rejected
        if rejected > self._rejected_reported:
            logger.error("hogwild workers skipped %d non-finite gradients", rejected - self._rejected_reported)
            self._rejected_reported = rejected
        return self.report()

    @property
    def rejected(self) -> int:
        """Non-finite gradients the workers skipped (never applied)."""
        return int(self.shared.rejected.sum())

    def _check_workers(self) -> None:
        for worker_id, process in list(self._workers.items()):
            if process.is_alive():
                continue
            failure = self._reap(worker_id, self.version)
            self._free_lock_of_dead_worker()
            self._replace(failure, stopping=self.shared.stop.is_set())
        if not self._workers:
            raise self._every_worker_gone("every hogwild worker has died")

    def _free_lock_of_dead_worker(self) -> None:
        """A worker killed while it held the version lock would leave it held for ever and stall every
        other worker. Live workers hold it for one increment: if it stays held this long after a death,
        the dead worker held it, and it is released on its behalf."""
        lock = self.shared.counter_lock
        if lock.acquire(timeout=2.0):
            lock.release()
        else:
            logger.warning("released the version lock a dead hogwild worker held")
            lock.release()

    def report(self) -> dict:
        counts = dict(sorted(self.staleness_counts.items()))
        return {"version": self.version, "tuned_gradients": self.tuned_gradients, "rejected": self.rejected,
                "staleness_counts": counts, "mean_staleness": mean_staleness(counts),
                "mu": float(self.shared.hyper[0]), "alpha": float(self.shared.hyper[1]),
                "mu_hat": self.sensor.estimate if self.sensor is not None else None,
                "momentum_offset": self.controller.offset if self.controller is not None else None,
                "worker_failures": list(self.worker_failures)}

    def state_dict(self) -> dict:
        return {"version": self.version, "model": self.model.state_dict(),
                "momentum_buffers": [b.clone() for b in self.shared.buffers],
                "tuner": self.tuner.state_dict() if self.tuner is not None else None,
                "controller": self.controller.state_dict() if self.controller is not None else None,
                "hyper": self.shared.hyper.clone(), "staleness_counts": dict(self.staleness_counts),
                "tuned_gradients": self.tuned_gradients}

    def load_state_dict(self, state: dict) -> None:
        """Restore model, shared momentum buffers, tuner, controller and the staleness counts (call while no run is
        going on). The tuner's x_0 is the saved run's (in its state); the shadow and the clip levels follow from the
        model and the tuner, and gradients mailed but not yet read are dropped.

        All or nothing: everything is checked first; if any part does not fit, it raises and nothing
        (model, buffers, tuner, controller, version counter, mu and alpha, counts) has changed."""
        if (state.get("controller") is None) != (self.controller is None):
            raise ValueError("checkpoint and this Hogwild disagree on whether the loop is closed")
        try:
            version = int(state["version"])
            buffers = list(state["momentum_buffers"])
            hyper = state.get("hyper")
            loads = [(self.model, state["model"])]
            if self.tuner is not None and state.get("tuner") is not None:
                loads.append((self.tuner, state["tuner"]))
            if self.controller is not None:
                loads.append((self.controller, state["controller"]))
            # (absent from checkpoints saved before they were kept: counted afresh)
            staleness_counts = {int(k): int(v) for k, v in (state.get("staleness_counts") or {}).items()}
            tuned_gradients = int(state.get("tuned_gradients", 0))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"not a Hogwild checkpoint: {error!r}") from error
        shapes = [tuple(b.shape) for b in self.shared.buffers]
        if len(buffers) != len(shapes) or any(
                not isinstance(saved, torch.Tensor) or tuple(saved.shape) != shape
                for saved, shape in zip(buffers, shapes)):
            raise ValueError(f"checkpoint momentum buffers do not match the model's parameters {shapes}")
        if hyper is not None and (not isinstance(hyper, torch.Tensor) or hyper.shape != self.shared.hyper.shape):
            raise ValueError("checkpoint 'hyper' must be a tensor of (mu, alpha)")
        if version < 0:
            raise ValueError(f"checkpoint version {version} is negative")
        if tuned_gradients < 0 or any(tau < 0 or count < 0 for tau, count in staleness_counts.items()):
            raise ValueError("checkpoint staleness counts and tuned gradients must be >= 0")
        with torch.no_grad():
            load_all_or_nothing(loads)  # the model loads in place: it stays in shared memory
            for buffer, saved in zip(self.shared.buffers, buffers):
                buffer.copy_(saved)
            for shadow, p in zip(self.shadow, self.params):
                shadow.copy_(p)
        with self.shared.counter_lock:
            self.shared.counter[0] = version
        self.shared.limit[0] = version
        if hyper is not None:
            self.shared.hyper.copy_(hyper)
        self.shared.mail_read.copy_(self.shared.mail_written)
        self.staleness_counts = staleness_counts
        self.tuned_gradients = tuned_gradients
        if self.tuner is not None:
            self._write_tuned()

    def save_checkpoint(self, path: str) -> str:
        """Atomic (write, fsync, rename) like the parameter server's."""
        return save_checkpoint_file(self.state_dict(), path)

    def load_checkpoint(self, path: str) -> None:
        self.load_state_dict(load_checkpoint_file(path))

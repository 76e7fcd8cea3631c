"""Hooks that make mmengine load checkpoints safely, keep its checkpoints loadable with
``torch.load(weights_only=True)`` and make ``--resume`` continue exactly where the interrupted run stopped."""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional

import numpy as np
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer, print_log
from mmengine.registry import HOOKS

from vilseg.utils.rng import get_rng_state, set_rng_state

from .checkpoint import install as install_safe_checkpoints

__all__ = ["SafeCheckpointHook", "PlainMessageHubHook", "RandomStateHook", "history_buffers_to_plain", "history_buffers_from_plain"]

_TAG = "__vilseg_history_buffer__"


def _plain(value: Any) -> Any:
    """numpy scalars/arrays -> Python numbers/lists, recursively through dicts, lists and tuples."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return type(value)((k, _plain(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


@HOOKS.register_module()
class SafeCheckpointHook(Hook):
    """Switches on vilseg's checkpoint I/O in mmengine (:func:`vilseg.engine.checkpoint.install`) in
    ``before_run``, which mmengine calls before it initialises weights, loads ``load_from`` or resumes."""

    priority = "VERY_HIGH"

    def before_run(self, runner) -> None:
        install_safe_checkpoints()


def history_buffers_to_plain(message_hub_state: Dict[str, Any]) -> Dict[str, Any]:
    """Replace every ``HistoryBuffer`` in a message-hub state dict by a tagged dict of lists (in place)."""
    scalars = message_hub_state.get("log_scalars", {})
    for key, buf in list(scalars.items()):
        if isinstance(buf, HistoryBuffer):
            log, count = buf.data
            scalars[key] = {_TAG: True, "log_history": np.asarray(log).tolist(),
                            "count_history": np.asarray(count).tolist(), "max_length": int(buf.max_length)}
    if "runtime_info" in message_hub_state:
        message_hub_state["runtime_info"] = _plain(message_hub_state["runtime_info"])
    return message_hub_state


def history_buffers_from_plain(message_hub_state: Dict[str, Any]) -> Dict[str, Any]:
    """Inverse of :func:`history_buffers_to_plain` (in place)."""
    scalars = message_hub_state.get("log_scalars", {})
    for key, value in list(scalars.items()):
        if isinstance(value, dict) and value.get(_TAG):
            scalars[key] = HistoryBuffer(value["log_history"], value["count_history"], value["max_length"])
    return message_hub_state


@HOOKS.register_module()
class PlainMessageHubHook(Hook):
    """Stores the message hub as plain data in checkpoints and rebuilds it on load.

    mmengine pickles ``HistoryBuffer`` objects whose ``statistics_methods`` are bound methods; unpickling them needs
    ``builtins.getattr``, which a weights-only loader must not allow. The runner calls ``after_load_checkpoint``
    before restoring the message hub, so the buffers come back intact on ``--resume``.
    """

    priority = "VERY_LOW"  # run after other hooks have added to the checkpoint

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if "message_hub" in checkpoint:
            history_buffers_to_plain(checkpoint["message_hub"])

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if "message_hub" in checkpoint:
            history_buffers_from_plain(checkpoint["message_hub"])


class _RestoreBeforeBatch:
    """Wraps a train loop's data iterator: restores the random ``state`` once, just before batch ``skip + 1`` is
    drawn, then puts the wrapped iterator back on the loop."""

    def __init__(self, loop: Any, skip: int, state: Dict[str, Any]) -> None:
        self.loop, self.inner, self.remaining, self.state = loop, loop.dataloader_iterator, int(skip), state

    def __iter__(self) -> "_RestoreBeforeBatch":
        return self

    def __next__(self) -> Any:
        if self.remaining == 0:
            set_rng_state(self.state)
            self.loop.dataloader_iterator = self.inner
        self.remaining -= 1
        return next(self.inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@HOOKS.register_module()
class RandomStateHook(Hook):
    """Saves every rank's random states (Python, NumPy, torch, CUDA) in each checkpoint and restores them on
    resume, so that an interrupted run resumed with ``--resume`` gives the same weights as an uninterrupted one.

    Where they are restored matters: mmengine's ``IterBasedTrainLoop`` replays the data loader over the batches
    already trained before it goes on (the augmentations of the replay draw from the data-loading random
    state, as in the first run). The states saved at iteration ``n`` are therefore put back just before batch
    ``n + 1`` is drawn, when the replay is over. Validation runs between a save and the next batch, so the
    training states are put back after it as they were before it (training does not depend on how often it is
    validated). Under distributed training every rank's states are gathered after each iteration (a few KiB)
    because only rank 0 writes the checkpoint.
    """

    priority = "VERY_HIGH"  # its after_train_iter runs before the CheckpointHook's

    def __init__(self) -> None:
        self._pending: Optional[Dict[str, Any]] = None
        self._train_state: Optional[Dict[str, Any]] = None
        self._gathered: Optional[list] = None

    def _gather(self) -> None:
        """Under distributed training, every rank's states (the checkpoint is saved by rank 0 only)."""
        from mmengine.dist import all_gather_object, get_world_size

        if get_world_size() > 1:
            self._gathered = all_gather_object(get_rng_state())

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        self._gather()

    def after_train_epoch(self, runner) -> None:
        self._gather()

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        from mmengine.dist import get_world_size

        states = [get_rng_state()] if get_world_size() == 1 else self._gathered
        if states:
            checkpoint.setdefault("meta", {})["rng_state"] = states

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        from mmengine.dist import get_rank, get_world_size

        if not getattr(runner, "_resume", False):  # load_from without resume: a new run, its own random states
            return
        states = (checkpoint.get("meta") or {}).get("rng_state")
        if not isinstance(states, list) or not states:
            print_log("the checkpoint holds no random states (written before they were saved): the resumed run "
                      "continues correctly but not bit-identically", logger="current",
                      level=logging.WARNING)
            return
        if len(states) != get_world_size():
            print_log(f"the checkpoint holds random states of {len(states)} processes, this run has "
                      f"{get_world_size()}: they are not restored", logger="current", level=logging.WARNING)
            return
        self._pending = states[get_rank()]

    def before_train(self, runner) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        loop = runner.train_loop
        if hasattr(loop, "dataloader_iterator"):  # iteration-based: after the replay of the trained batches
            loop.dataloader_iterator = _RestoreBeforeBatch(loop, int(loop.iter), state)
        else:  # epoch-based: resumes at an epoch boundary, before the epoch's data loader starts
            set_rng_state(state)

    def before_val(self, runner) -> None:
        loop = getattr(runner, "_train_loop", None)  # the property would build a loop in a test-only run
        if loop is not None and not isinstance(loop, dict):
            self._train_state = get_rng_state()

    def after_val(self, runner) -> None:
        if self._train_state is not None:
            set_rng_state(self._train_state)
            self._train_state = None

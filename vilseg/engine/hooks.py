"""Hooks that keep mmengine checkpoints loadable with ``torch.load(weights_only=True)``."""
from __future__ import annotations

from typing import Any, Dict

import numpy as np
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer
from mmengine.registry import HOOKS

__all__ = ["PlainMessageHubHook", "history_buffers_to_plain", "history_buffers_from_plain"]

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

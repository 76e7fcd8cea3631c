"""mmengine's ``Runner`` with a console a person can read (see :mod:`vilseg.utils.console`)."""
from __future__ import annotations

import os.path as osp
from typing import Optional, Union

from mmengine.logging import MMLogger
from mmengine.runner import Runner

from vilseg.utils.console import quiet_console

__all__ = ["ConsoleRunner"]


class ConsoleRunner(Runner):
    """``Runner`` whose console leaves out the environment and config dumps, the hook order, known deprecation
    notices and the rows of classes absent from the evaluated set; its log file keeps all of them."""

    def build_logger(self, log_level: Union[int, str] = "INFO", log_file: Optional[str] = None,
                     **kwargs) -> MMLogger:
        if log_file is None:
            log_file = osp.join(self._log_dir, f"{self.timestamp}.log")
        logger = super().build_logger(log_level=log_level, log_file=log_file, **kwargs)
        quiet_console(logger, log_file)
        return logger

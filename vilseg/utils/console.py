"""What the command-line entry points print: known third-party deprecation warnings filtered out, and mmengine's
console output trimmed to what a person reads while training or testing. The log file in the work dir keeps
everything (environment, full config, hook order, the full per-class table); ``--verbose`` shows it all.

Only the tools call these functions (they change process-wide warning filters and logging handlers); importing
this module changes nothing. Standard library only, so a tool can call :func:`filter_known_warnings` before it
imports mmengine (whose import already warns).
"""
from __future__ import annotations

import copy
import logging
import re
import sys
import warnings
from typing import IO, Any, Iterable, Optional

__all__ = ["KNOWN_WARNINGS", "filter_known_warnings", "ConsoleFilter", "ConsoleFormatter", "quiet_console",
           "compact_class_table", "table_console", "print_tables"]

# (category, start of the message) of deprecation notices raised inside mmengine / mmseg / setuptools on every run;
# nothing a vilseg user can act on
KNOWN_WARNINGS = (
    (UserWarning, r"pkg_resources is deprecated"),
    (DeprecationWarning, r"pkg_resources is deprecated"),
    (UserWarning, r"``build_loss`` would be deprecated"),
    (UserWarning, r"Default ``avg_non_ignore`` is False"),
    (UserWarning, r"The draw is False"),
    (UserWarning, r"`reduce_zero_label` will be deprecated"),
    (DeprecationWarning, r"`torch.jit.script_method` is deprecated"),
)

# INFO records the console does not show (they stay in the log file)
_HIDDEN_INFO = (
    re.compile(r"\s*-{20,}\s*System environment"),
    re.compile(r"Config:\n"),
    re.compile(r"Hooks will be executed in the following order"),
    re.compile(r"Distributed training is not used"),
    re.compile(r"per class results:$"),
    re.compile(r"ADE20K demo summary: "),
)
# mmengine WARNING records about mmengine's own deprecations or unset optional fields
_HIDDEN_WARNINGS = (
    re.compile(r"The prefix is not set in metric class"),
    re.compile(r'"FileClient" will be deprecated'),
    re.compile(r'"HardDiskBackend" is the alias of "LocalBackend"'),
)
_TABLE_ROW = re.compile(r"^\|(.*)\|\s*$")
# evaluation progress lines ("Iter(val) [ 3/12]  eta: ..."): the console shows about four per evaluation
_EVAL_PROGRESS = re.compile(r"Iter\((?:val|test)\) \[\s*(\d+)/(\d+)\]\s+eta:")


def filter_known_warnings() -> None:
    """Ignore the :data:`KNOWN_WARNINGS` in this process."""
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


class ConsoleFilter(logging.Filter):
    """Drops the records listed above from a console handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.levelno == logging.INFO:
            progress = _EVAL_PROGRESS.match(text)
            if progress:
                done, total = int(progress.group(1)), int(progress.group(2))
                return done == total or done % max(1, total // 4) == 0
            return not any(p.match(text) for p in _HIDDEN_INFO)
        if record.levelno == logging.WARNING:
            return not any(p.match(text) for p in _HIDDEN_WARNINGS)
        return True


def compact_class_table(text: str, log_file: Optional[str] = None) -> str:
    """mmseg's per-class table without the rows of classes absent from the evaluated ground truth (their accuracy
    is ``nan``); a last line says how many were left out and where the full table is."""
    lines = text.split("\n")
    header = next((i for i, line in enumerate(lines) if _TABLE_ROW.match(line)), None)
    if header is None:
        return text
    columns = [c.strip() for c in _TABLE_ROW.match(lines[header]).group(1).split("|")]
    acc = columns.index("Acc") if "Acc" in columns else None
    kept, dropped = [], 0
    for i, line in enumerate(lines):
        row = _TABLE_ROW.match(line)
        if row and i != header and acc is not None:
            cells = [c.strip() for c in row.group(1).split("|")]
            if len(cells) == len(columns) and cells[acc] == "nan":
                dropped += 1
                continue
        kept.append(line)
    if dropped:
        where = f"; full table in {log_file}" if log_file else ""
        kept.append(f"({dropped} classes absent from the evaluated ground truth not shown{where})")
    return "\n".join(kept)


class ConsoleFormatter(logging.Formatter):
    """Wraps the console handler's formatter: the per-class table compacted, the layer-decay group list reduced to
    its summary line. The record itself is not changed (the file handler formats the same record)."""

    def __init__(self, base: Optional[logging.Formatter], log_file: Optional[str] = None) -> None:
        super().__init__()
        self.base = base or logging.Formatter()
        self.log_file = log_file

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        short = None
        if text.lstrip("\n").startswith("+-") and "Class" in text:
            short = compact_class_table(text, self.log_file)
        elif text.startswith("layer-wise lr decay") and "\n" in text:
            short = text.split("\n", 1)[0].rstrip(":") + " (parameter groups in the log file)"
        if short is None:
            return self.base.format(record)
        record = copy.copy(record)
        record.msg, record.args = short, None
        return self.base.format(record)


def quiet_console(logger: logging.Logger, log_file: Optional[str] = None) -> None:
    """Attach :class:`ConsoleFilter` and :class:`ConsoleFormatter` to ``logger``'s console handlers (its stream
    handlers that are not file handlers)."""
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            if not any(isinstance(f, ConsoleFilter) for f in handler.filters):
                handler.addFilter(ConsoleFilter())
                handler.setFormatter(ConsoleFormatter(handler.formatter, log_file))


def table_console(file: Optional[IO[str]] = None) -> Any:
    """A rich ``Console`` for tables that never hides a value: on a terminal its own width (columns fold their
    cells instead of cutting them, see :func:`print_tables`), piped or redirected a wide plain-text one (rich would
    otherwise assume 80 columns and cut)."""
    from rich.console import Console

    file = file or sys.stdout
    if file.isatty():
        return Console(file=file)
    return Console(file=file, width=250, color_system=None, force_terminal=False, soft_wrap=True)


def print_tables(tables: Iterable[Any], file: Optional[IO[str]] = None) -> None:
    """Print rich tables through :func:`table_console`, every column folding rather than cutting its cells."""
    console = table_console(file)
    for table in tables:
        for column in table.columns:
            column.overflow, column.no_wrap = "fold", False
        console.print(table)

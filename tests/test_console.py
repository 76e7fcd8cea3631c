"""What the tools print: mmengine's console trimmed (the log file keeps everything), known deprecation notices
filtered, compact per-class tables, and a light ``import vilseg.models``."""
from __future__ import annotations

import logging
import subprocess
import sys

from ade_helpers import MINI_CONFIG, REPO, TINY, cli_options, ensure_mini_ade, run_tool, tool_env

from vilseg.utils.console import ConsoleFilter, ConsoleFormatter, compact_class_table

TABLE = """
+----------+-------+-------+
|  Class   |  IoU  |  Acc  |
+----------+-------+-------+
|   wall   | 12.5  | 40.0  |
|   sky    |  nan  |  nan  |
|  person  |  0.0  |  nan  |
|   tree   |  0.0  |  0.0  |
+----------+-------+-------+"""


def _record(msg: str, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("mmengine", level, __file__, 1, msg, None, None)


def test_class_table_keeps_only_classes_in_the_ground_truth():
    text = compact_class_table(TABLE, "run.log")
    assert "wall" in text and "tree" in text  # tree: in the ground truth, never found (Acc 0.0)
    assert "sky" not in text and "person" not in text  # Acc nan: absent from the evaluated ground truth
    assert text.splitlines()[-1] == "(2 classes absent from the evaluated ground truth not shown; full table in run.log)"
    assert compact_class_table("no table here") == "no table here"


def test_console_filter_hides_dumps_and_known_notices_but_not_losses_or_errors():
    keep = ConsoleFilter().filter
    assert not keep(_record("\n------------------------------------------------------------\nSystem environment:\n x"))
    assert not keep(_record("Config:\nmodel = dict()"))
    assert not keep(_record("Hooks will be executed in the following order:\nbefore_run:"))
    assert not keep(_record('"FileClient" will be deprecated in future.', logging.WARNING))
    assert not keep(_record("Iter(val) [ 5/12]    eta: 0:00:01  time: 0.16"))
    assert keep(_record("Iter(val) [12/12]    eta: 0:00:00  time: 0.16"))
    assert keep(_record("Iter(train) [1/5]  lr: 1e-4  loss: 5.05"))
    assert keep(_record("Iter(val) [12/12]    aAcc: 9.87  mIoU: 0.61"))
    assert keep(_record("something unexpected", logging.WARNING))
    assert keep(_record("Config:\nx", logging.ERROR))


def test_console_formatter_leaves_the_record_for_the_log_file_unchanged():
    record = _record(TABLE)
    shown = ConsoleFormatter(logging.Formatter("%(message)s"), "run.log").format(record)
    assert "sky" not in shown and "wall" in shown
    assert record.getMessage() == TABLE  # the file handler formats the same record: full table


def test_train_tool_prints_a_short_readable_run(tmp_path):
    """A 2-iteration run: a header, a loss line per iteration, the evaluation, the paths; no dumps, no known
    deprecation notices. The log file in the work dir has the environment and the config."""
    ensure_mini_ade()
    opts = dict(TINY)
    opts.update({"train_cfg.max_iters": 2, "train_cfg.val_interval": 2})
    work = tmp_path / "work"
    res = run_tool([str(REPO / "tools" / "train.py"), MINI_CONFIG, "--work-dir", str(work), "--cfg-options",
                    *cli_options(opts)], cwd=str(tmp_path))
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    lines = out.splitlines()
    assert len(lines) < 40, out
    assert "training " in lines[0] and str(work) in lines[0] and "device cpu" in lines[0]
    assert lines[0].endswith("| glibc malloc keeps freed memory (mallopt M_TRIM_THRESHOLD=1073741824, "
                             "M_MMAP_THRESHOLD=16777216, M_ARENA_MAX=1)")  # the tool's default --malloc keep
    assert any("Iter(train) [1/2]" in line and "loss:" in line for line in lines), out
    assert any("mIoU" in line for line in lines)
    assert lines[-1].startswith("done: 2 iterations") and "iter_2.pth" in lines[-1]
    for noise in ("System environment", "Config:", "Hooks will be executed", "Warning", "FileClient"):
        assert noise not in out, noise
    log = next(work.glob("*/*.log")).read_text()
    assert "System environment" in log and "Config:" in log and "layer_0_decay" in log


def test_amp_on_a_cpu_machine_is_one_line(tmp_path):
    res = run_tool([str(REPO / "tools" / "train.py"), MINI_CONFIG, "--amp", "--work-dir", str(tmp_path)],
                   cwd=str(tmp_path))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [line for line in res.stderr.strip().splitlines()
                                               if line.startswith("error: --amp needs a CUDA device")]


def test_2d_import_does_not_load_monai_matplotlib_or_nibabel():
    code = ("import sys, vilseg.models, vilseg.engine, vilseg.apis; "
            "print(sorted(m for m in ('monai', 'matplotlib', 'nibabel') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=tool_env(), timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"


class _NarrowTerminal:
    """A 40-column 'terminal' for rich."""

    def __init__(self):
        import io

        self.buf = io.StringIO()

    def isatty(self):
        return True

    def write(self, text):
        return self.buf.write(text)

    def flush(self):
        pass


def test_tables_never_hide_values_piped_or_on_a_narrow_terminal(monkeypatch):
    import io

    from rich.table import Table

    from vilseg.utils.console import print_tables

    value = "outputs/medical_demo_vil_unetr/work_dir/mni152_anterior_segmentation.nii.gz"

    def table():
        t = Table(title="summary")
        t.add_column("input")
        t.add_column("Dice")
        t.add_row("scan.nii.gz", "gray_matter=0.9123, white_matter=0.9456")
        t.add_row("segmentation", value)
        return t

    piped = io.StringIO()
    print_tables([table()], file=piped)
    assert value in piped.getvalue() and "gray_matter=0.9123, white_matter=0.9456" in piped.getvalue()
    monkeypatch.setenv("COLUMNS", "40")
    narrow = _NarrowTerminal()
    print_tables([table()], file=narrow)
    text = narrow.buf.getvalue()
    assert "…" not in text
    folded = "".join(line.strip("│┃ ") for line in text.splitlines())  # the cell folded over several lines
    assert "0.9456" in folded and "segmentation.nii.gz" in folded.replace(" ", "")

"""``python -m pgsynapse.learning.trainer_start MODULE``: how :func:`~pgsynapse.learning.trainer_process.run_trainer`
starts a trainer. An exception that ends it is reported to the parent as a ``trainer_failed`` event from the start,
one raised while MODULE is imported included (a package missing or broken): before it reads its spec, a trainer's
failure was said as its traceback's last lines."""

from __future__ import annotations

import runpy
import sys

from pgsynapse.learning.trainer_process import report_failures

if __name__ == "__main__":
    report_failures()
    module = sys.argv.pop(1)  # the trainer's own argv, as `python -m MODULE` gives it
    runpy.run_module(module, run_name="__main__", alter_sys=True)

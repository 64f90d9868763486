"""A stand-in for a @triton.jit kernel that compile workers can import (tests/test_compile_workers.py):
its warmup records what it was given, one JSON line per call, in the file $COMPILE_PROBE_OUT."""

import json
import os
import time


class Probe:
    def __init__(self, name: str):
        self.fn = self  # a JITFunction's .fn is the Python function: its module and name locate the kernel
        self.__name__ = name

    def warmup(self, *args, grid, **options):
        if options.get("fail"):
            raise RuntimeError("the probe was told to fail")
        if options.get("slow_in_workers") and os.getpid() != int(os.environ["COMPILE_PROBE_PARENT"]):
            time.sleep(options["slow_in_workers"])
        seen = [["stub", str(a.dtype), a.data_ptr() % 16] if hasattr(a, "data_ptr") else
                ["desc", a.shape, a.strides, a.block_shape, a.base.data_ptr() % 16] if hasattr(a, "block_shape") else
                a for a in args]
        with open(os.environ["COMPILE_PROBE_OUT"], "a") as f:
            f.write(json.dumps(dict(pid=os.getpid(), args=seen, grid=list(grid), options=options)) + "\n")


PROBE = Probe("PROBE")

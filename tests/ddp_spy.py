"""``biovfm <args>`` in one process of a torchrun world, with every torch.distributed collective recorded: which
tensor device each call got, next to the device the engine trains on. Used by tests/test_ddp.py:

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_spy.py LOG -- pretrain ...
"""
import functools
import json
import os
import sys

import torch.distributed as dist

from biovfm import cli
from biovfm.models import vit


def _spy(name, fn, log):
    @functools.wraps(fn)
    def wrapper(tensor, *args, **kwargs):
        with open(log, "a") as f:
            f.write(json.dumps({"rank": int(os.environ["RANK"]), "op": name, "device": str(tensor.device),
                                "engine_device": str(vit.default_device())}) + "\n")
        return fn(tensor, *args, **kwargs)

    return wrapper


if __name__ == "__main__":
    log, sep, *argv = sys.argv[1:]
    assert sep == "--"
    for name in ("all_reduce", "broadcast", "all_gather", "reduce", "all_gather_into_tensor", "reduce_scatter_tensor"):
        setattr(dist, name, _spy(name, getattr(dist, name), log))
    sys.exit(cli.main(argv))

"""sam_sparse.cuda_graphs off CUDA: the function runs as is; copies carry no graphs. (Capture and
replay: tests/gpu/test_gpu_graphs.py.)"""

import copy
import pickle

import torch

from sam_sparse.cuda_graphs import GraphedFunction, module_storage


def double(x):
    return {"y": [x * 2]}


def test_cpu_arguments_run_the_function_as_is():
    calls = []
    graphed = GraphedFunction(lambda x: calls.append(1) or double(x))
    x = torch.randn(3)
    with torch.inference_mode():
        out = graphed(x)
    assert torch.equal(out["y"][0], x * 2) and len(calls) == 1 and graphed.graphs == 0 and not graphed.errors


def test_copies_and_pickles_keep_the_function_not_the_graphs():
    graphed = GraphedFunction(double, warmup=3)
    for twin in (copy.deepcopy(graphed), pickle.loads(pickle.dumps(graphed))):
        assert twin.fn is double and twin.warmup == 3 and twin.graphs == 0


def test_module_storage_changes_when_the_weights_move():
    m = torch.nn.Linear(2, 2)
    before = module_storage(m)
    with torch.no_grad():
        m.weight.mul_(2)  # in place: same storage
    assert module_storage(m) == before
    m.double()
    assert module_storage(m) != before

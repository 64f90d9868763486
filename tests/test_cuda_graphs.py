"""sam_sparse.cuda_graphs off CUDA: the function runs as is; copies carry no graphs. (Capture and
replay: tests/gpu/test_gpu_graphs.py.)"""

import copy
import functools
import pickle

import pytest
import torch

from sam_sparse.cuda_graphs import GraphedFunction, capture, module_storage


def double(x):
    return {"y": [x * 2]}


def test_cpu_arguments_run_the_function_as_is():
    calls = []
    graphed = GraphedFunction(lambda x: calls.append(1) or double(x))
    x = torch.randn(3)
    with torch.inference_mode():
        out = graphed(x)
    assert torch.equal(out["y"][0], x * 2) and len(calls) == 1 and graphed.graphs == 0 and not graphed.errors


def test_static_arguments_reach_the_function():
    graphed = GraphedFunction(lambda x, *, times: x * times)
    assert torch.equal(graphed(torch.ones(2), times=3), torch.full((2,), 3.0))


def test_copies_and_pickles_keep_the_function_not_the_graphs():
    graphed = GraphedFunction(double, warmup=3, capture_after=2, max_graphs=5)
    for twin in (copy.deepcopy(graphed), pickle.loads(pickle.dumps(graphed))):
        assert twin.fn is double and twin.warmup == 3 and twin.graphs == 0
        assert (twin.capture_after, twin.max_graphs) == (2, 5)


@pytest.mark.parametrize("bad", [dict(capture_after=-1), dict(max_graphs=0)], ids=str)
def test_capture_after_and_max_graphs_are_checked(bad):
    with pytest.raises(ValueError, match="expected capture_after >= 0 and max_graphs >= 1 or None"):
        GraphedFunction(double, **bad)


def test_a_copys_state_follows_the_copy():
    """state as functools.partial(module_storage, module): a deep copy of a model with its graphed function
    keys on the copy's weights (a lambda would keep reading the original's), and it pickles."""
    m = torch.nn.Linear(2, 2)
    owner = {"module": m, "graphed": GraphedFunction(m, state=functools.partial(module_storage, m))}
    twin = copy.deepcopy(owner)
    assert twin["graphed"].fn is twin["module"] and twin["graphed"].state() == module_storage(twin["module"])
    twin["module"].double()
    assert twin["graphed"].state() != owner["graphed"].state()
    assert pickle.loads(pickle.dumps(owner))["graphed"].state is not None


def test_capture_needs_a_checked_warm_up_call():
    with pytest.raises(ValueError, match="warmup=0"):
        capture(lambda: None, warmup=0)


def test_module_storage_changes_when_the_weights_move():
    m = torch.nn.Linear(2, 2)
    before = module_storage(m)
    with torch.no_grad():
        m.weight.mul_(2)  # in place: same storage
    assert module_storage(m) == before
    m.double()
    assert module_storage(m) != before
    assert len(module_storage(m, torch.nn.Linear(3, 3))) == 4  # weights and biases of both


def test_clear_without_graphs_is_a_no_op():
    """clear() (what restore() calls through MemoryContext.drop_graphs) on a function that never captured."""
    g = GraphedFunction(lambda x: x + 1)
    g.clear()
    assert g.graphs == 0 and g(torch.ones(2)).tolist() == [2.0, 2.0]

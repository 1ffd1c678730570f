"""The thread pool and the split products: the same results on any number of threads, errors that reach
the caller, BLAS on one thread, and a user's thread cap respected."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minigpt.cpu import parallel

REPO = Path(__file__).resolve().parents[1]


def test_products_equal_numpy_for_every_split():
    rng = np.random.default_rng(0)
    # matmul: split by rows, by columns, by rows, not at all, over K (one row: a decoded token), by columns
    # (one row times a transposed b: the output head); matmul_tn: by its reduction N, by columns, by rows K,
    # not at all, by columns, by columns
    for N, K, M, b_transposed in [(4096, 64, 96, False), (3, 128, 2000, False), (64, 3000, 32, False),
                                  (1, 7, 5, False), (1, 3000, 1000, False), (1, 1000, 3000, True)]:
        a = rng.standard_normal((N, K))
        b = rng.standard_normal((M, K)).T if b_transposed else rng.standard_normal((K, M))
        bias = rng.standard_normal(M)
        np.testing.assert_allclose(parallel.matmul(a, b), a @ b, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(parallel.matmul(a, b, bias), a @ b + bias, rtol=1e-12, atol=1e-12)
        d = rng.standard_normal((N, M))
        np.testing.assert_allclose(parallel.matmul_tn(a, d), a.T @ d, rtol=1e-12, atol=1e-12)


def test_big_work_is_split_and_small_work_is_not():
    assert parallel._count_matmul_slices(4096, 4096 * 128 * 512) > 1 or parallel.num_threads() == 1
    assert parallel._count_matmul_slices(8, 8 * 8 * 8) == 1
    blocks = parallel.sequence_blocks(1, 12, 10**7)                        # one sequence: split its heads
    assert all(batch == slice(0, 1) for batch, _ in blocks)
    heads = sorted((h.start, h.stop) for _, h in blocks)
    assert heads[0][0] == 0 and heads[-1][1] == 12 and all(a[1] == b[0] for a, b in zip(heads, heads[1:]))


def test_every_task_runs_once_in_order_and_errors_reach_the_caller():
    assert parallel.parallel_map(lambda i: i * i, range(50)) == [i * i for i in range(50)]

    def fail_on_seven(i):
        if i == 7:
            raise KeyError("seven")
        return i
    with pytest.raises(KeyError, match="seven"):
        parallel.parallel_map(fail_on_seven, range(20))
    # a slice that splits work again runs it on its own thread instead of waiting on the pool
    nested = parallel.parallel_map(lambda i: sum(parallel.parallel_map(lambda j: i * j, range(4))), range(8))
    assert nested == [6 * i for i in range(8)]


def test_blas_runs_on_one_thread():
    if not parallel.SPLIT_MATMULS:
        pytest.skip("NumPy's BLAS is not OpenBLAS: minigpt leaves its threads alone")
    import ctypes
    for path in parallel._openblas_candidates():
        library = ctypes.CDLL(path)
        getter = next((getattr(library, name) for name in ("scipy_openblas_get_num_threads64_",
                                                           "openblas_get_num_threads")
                       if hasattr(library, name)),
                      None)
        if getter is not None:
            assert getter() == 1
            return
    pytest.fail("OpenBLAS was set to one thread but its thread count cannot be read back")


STEP = """
import json, numpy as np, minigpt
from minigpt.cpu import parallel
cfg = minigpt.GPTConfig(vocab_size=257, context_length=64, emb_dim=64, n_heads=4, n_layers=2)
model = minigpt.GPTModel(cfg, seed=0)
rng = np.random.default_rng(1)
idx, targets = rng.integers(0, 257, (16, 64)), rng.integers(0, 257, (16, 64))
targets[:, :20] = -100
loss = model.loss(idx, targets)
loss.backward()
print(json.dumps({"threads": parallel.num_threads(), "loss": float(loss.data),
                  "grads": {n: p.grad.ravel()[:50].tolist() for n, p in model.named_parameters()}}))
"""


def run_step(threads):
    env = {**os.environ, "MINIGPT_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", STEP], capture_output=True, text=True, env=env, cwd=REPO,
                         check=True).stdout
    return json.loads(out)


def test_the_thread_count_is_capped_by_the_user_and_changes_results_only_by_rounding():
    one, two = run_step(1), run_step(2)
    assert (one["threads"], two["threads"]) == (1, 2)
    assert abs(one["loss"] - two["loss"]) <= 1e-6 * abs(one["loss"])
    for name, grad in one["grads"].items():
        np.testing.assert_allclose(two["grads"][name], grad, rtol=1e-4, atol=1e-6, err_msg=name)

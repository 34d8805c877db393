"""Bad input gets a clear error from the host launchers, never silent garbage."""
import pytest
import torch

import dynfocus_kernels as K
from dynfocus_kernels import reference as R


def test_wrong_rank():
    with pytest.raises(ValueError, match=r"rank 3 \[B, N, C\]"):
        K.dpc_knn(torch.randn(10, 4), 2, 2)


def test_wrong_dtype():
    with pytest.raises(TypeError, match="dtype torch.int64"):
        K.knn_density(torch.ones(1, 4, 3, dtype=torch.int64), 2)
    x = torch.randn(1, 4, 3)
    with pytest.raises(ValueError, match="rho must be fp32"):
        K.density_delta(x, torch.ones(1, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="weight must be a float tensor"):
        K.weighted_pool(x, torch.zeros(1, 4, dtype=torch.int64), torch.ones(1, 4, dtype=torch.int64), 1)


def test_mismatched_devices():
    x = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="valid_len is on meta but x is on cpu"):
        K.dpc_knn(x, 2, 2, valid_len=torch.ones(2, dtype=torch.int64, device="meta"))
    with pytest.raises(ValueError, match="different devices"):
        K.weighted_pool(x, torch.zeros(2, 4, dtype=torch.int64, device="meta"), None, 1)


def test_too_many_clusters_for_the_smallest_set():
    x = torch.randn(2, 8, 3)
    with pytest.raises(ValueError, match=r"num_clusters = 4 exceeds the number of valid points \(3\)"):
        K.dpc_knn(x, 4, 2, valid_len=torch.tensor([8, 3]))
    with pytest.raises(ValueError, match="num_clusters = 9 exceeds"):
        K.dpc_knn(x, 9, 2)


@pytest.mark.parametrize("k", [0, -1, 1.5])
def test_k_below_one(k):
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        K.knn_density(torch.randn(1, 4, 3), k)


def test_empty_sets():
    with pytest.raises(ValueError, match="empty set"):
        K.dpc_knn(torch.randn(1, 0, 3), 1, 1)
    with pytest.raises(ValueError, match=r"valid_len\[1\] = 0 is outside \[1, 4\]"):
        K.dpc_knn(torch.randn(2, 4, 3), 1, 1, valid_len=torch.tensor([4, 0]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_points(bad):
    x = torch.randn(1, 5, 3)
    x[0, 2, 1] = bad
    for fn in (lambda: K.dpc_knn(x, 2, 2), lambda: K.knn_density(x, 2), lambda: R.dpc_knn(x, 2, 2)):
        with pytest.raises(ValueError, match="non-finite"):
            fn()


def test_unknown_weight_name():
    with pytest.raises(ValueError, match="'uniform' or 'rho_delta'"):
        K.dpc_knn(torch.randn(1, 4, 3), 2, 2, weight="gaussian")


def test_assignment_out_of_range():
    with pytest.raises(ValueError, match="cluster ids >= num_clusters = 2"):
        K.weighted_pool(torch.randn(1, 3, 2), torch.tensor([[0, 1, 2]]), None, 2)
    with pytest.raises(ValueError, match=r"outside \[0, valid_len\)"):
        K.assign_to_centers(torch.randn(1, 4, 2), torch.tensor([[0, 3]]), valid_len=torch.tensor([3]))


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="need CUDA tensors.*TRITON_INTERPRET=1.*reference"):
        K.knn_density(torch.randn(1, 4, 3), 2)

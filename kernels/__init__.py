"""DPC-KNN kernel family (Triton) with plain-PyTorch references in `dynfocus_kernels.reference`.

On CUDA tensors the kernels run compiled; on CPU tensors they need the Triton interpreter (TRITON_INTERPRET=1,
set before triton is imported). DESIGN.md section 4 is the contract.
"""
from .assign import assign_to_centers
from .centers import select_centers
from .common import TIE_EPS, DPCResult
from .density_delta import density_delta
from .dpc_knn import dpc_knn
from .knn_density import knn_density
from .spatial import SpatialMergeResult, spatial_merge
from .weighted_pool import WeightedPoolFunction, weighted_pool

__all__ = ["knn_density", "density_delta", "select_centers", "assign_to_centers", "weighted_pool",
           "WeightedPoolFunction", "dpc_knn", "DPCResult", "TIE_EPS", "spatial_merge", "SpatialMergeResult"]

"""Compile every DPC-KNN Triton kernel ahead of time for a GPU architecture, with no GPU present, and report its
registers, stack (spills), shared memory and whether it uses the Hopper matrix instructions (wgmma).

    python bench/kernel_resources.py              # sm_90 (H100/H200) and sm_80 (A100)

CI runs the same compilation (tests/test_gpu_compile.py), so a kernel that only the GPU compiler rejects fails
there, not first on a lent GPU. The configurations are the launchers' own (kernels/*.launch_config helpers), and
the arguments are specialised as the JIT specialises them at run time (RUNTIME_INTS), so the report describes the
binary that runs.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import warnings

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dynfocus_kernels.assign import MAX_CENTRE_BLOCK, _assign_kernel
from dynfocus_kernels.centers import _select_centers_kernel
from dynfocus_kernels.common import TIE_EPS, centred_dtype
from dynfocus_kernels.density_delta import _density_delta_kernel
from dynfocus_kernels.distance import _sq_norm_kernel, launch_config
from dynfocus_kernels.gram import (_sq_dist_matrix_kernel, _sq_dist_reduce_kernel, _sq_dot_split_kernel, gram_config,
                                  reduce_warps)
from dynfocus_kernels.knn_density import _knn_density_kernel, knn_config
from dynfocus_kernels.spatial import _pad, _spatial_merge_kernel, spatial_launch_config
from dynfocus_kernels.tokens import _projector_inputs_kernel, _scatter_tokens_kernel, _width_block
from dynfocus_kernels.temporal import (_centres_kernel, _event_pool_kernel, _feature_block, _pool_centre_kernel,
                                       _rho_kernel, event_pool_config, rho_config)
from dynfocus_kernels.weighted_pool import POOL_LAUNCH, _weighted_pool_bwd_kernel, _weighted_pool_fwd_kernel
from dynfocus_infer.paged_decode import _paged_decode_kernel

I32, F32 = "i32", "fp32"
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _gram_constexprs(dtype: str) -> dict:
    cfg = gram_config(3600, 16 * 1408, TORCH_DTYPES[dtype])
    return dict(BLOCK=cfg["BLOCK"], BLOCK_C=cfg["BLOCK_C"], UPCAST=False)


def _gram_options(dtype: str) -> dict:
    cfg = gram_config(3600, 16 * 1408, TORCH_DTYPES[dtype])
    return dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _split(cfg: dict) -> tuple[dict, dict]:
    """A launcher config -> (constexprs, launch options)."""
    options = {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}
    return {k: v for k, v in cfg.items() if k not in options}, options


def _short(dtype: torch.dtype) -> str:
    return "*" + {v: k for k, v in TORCH_DTYPES.items()}[dtype]


def _spatial_config(dtype: str) -> dict:
    cfg = spatial_launch_config(200, 256, 1408, TORCH_DTYPES[dtype], torch.device("cpu"))
    return {k: cfg[k] for k in ("N_PAD", "BLOCK_G", "BLOCK_R", "BLOCK_C", "BLOCK_P", "UPCAST")}


def _spatial_options(dtype: str) -> dict:
    cfg = spatial_launch_config(200, 256, 1408, TORCH_DTYPES[dtype], torch.device("cpu"))
    return {k: cfg[k] for k in ("num_warps", "num_stages")}


def _specs(dtype: str):
    """(name, kernel, runtime signature, constexprs, launch options) of each kernel for inputs of `dtype`, with
    the launchers' configuration for a temporal set (T = 3,600 frames of 16 x 1408 channels)."""
    x = f"*{dtype}"
    strides = dict(stride_b=I32, stride_n=I32, stride_c=I32)
    cfg = launch_config(3600, 16 * 1408, TORCH_DTYPES[dtype])
    options = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
    stream = dict(TIE=TIE_EPS, **cfg)
    acc = tl.float32
    return [
        ("sq_norm", _sq_norm_kernel, dict(p_x=x, p_sq="*fp32", N=I32, C=I32, **strides),
         dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"]), dict(num_warps=options["num_warps"])),
        *[(name, _knn_density_kernel,   # knn_lists: the connector's pass, with the ids and farthest distances
           dict(p_x=x, p_sq="*fp32", p_len="*i32", p_best="*fp32", p_d="*fp32", p_ids="*i32", p_far="*fp32", N=I32,
                C=I32, **strides, inv_C=F32, cols_per_split=I32),
           dict(K=5, K_PAD=8, FROM_D=False, WITH_IDS=with_ids, **stream),
           dict(options, num_warps=knn_config(3600, 16 * 1408, TORCH_DTYPES[dtype], with_ids)["num_warps"]))
          for name, with_ids in (("knn_density", False), ("knn_lists", True))],
        *[(name, _density_delta_kernel,   # delta_near: rows with a denser point among their 5 nearest skip the pass
           dict(p_x=x, p_sq="*fp32", p_rho="*fp32", p_len="*i32", p_near="*fp32", p_far="*fp32", p_d="*fp32",
                p_nbr_d="*fp32", p_nbr_id="*i32", N=I32, C=I32, **strides, inv_C=F32, cols_per_split=I32),
           dict(FROM_D=False, K=k, K_PAD=8 if k > 1 else 2, FROM_LIST=k > 1, **stream), options)
          for name, k in (("density_delta", 1), ("delta_near", 5))],
        ("sq_dist_matrix", _sq_dist_matrix_kernel,   # v2 (kernels/gram.py): the whole matrix, upper-triangle tiles
         dict(p_x=x, p_sq="*fp32", p_len="*i32", p_d="*fp32", N=I32, C=I32, row0=I32, rows=I32, **strides,
              inv_C=F32), dict(SYMMETRIC=True, TIE=TIE_EPS, **_gram_constexprs(dtype)), _gram_options(dtype)),
        ("sq_dot_split", _sq_dot_split_kernel,   # its split-C pair: partial dots per channel split, then their sum
         dict(p_x=x, p_len="*i32", p_part="*fp32", B=I32, N=I32, C=I32, row0=I32, rows=I32, chans_per_split=I32,
              **strides), dict(SYMMETRIC=True, **_gram_constexprs(dtype)), _gram_options(dtype)),
        ("sq_dist_reduce", _sq_dist_reduce_kernel,
         dict(p_part="*fp32", p_sq="*fp32", p_len="*i32", p_d="*fp32", S=I32, split_stride=I32, N=I32, row0=I32,
              rows=I32, inv_C=F32), dict(SYMMETRIC=True, TIE=TIE_EPS, BLOCK=_gram_constexprs(dtype)["BLOCK"]),
         dict(num_warps=reduce_warps(_gram_constexprs(dtype)["BLOCK"]))),
        ("select_centers", _select_centers_kernel, dict(p_score="*fp32", p_len="*i32", p_centers="*i64", N=I32, L=I32),
         dict(BLOCK=1024), {}),
        *[(name, _assign_kernel,
           dict(p_x=x, p_sq="*fp32", p_len="*i32", p_centers="*i64", p_best="*fp32", p_assign="*i64", N=I32, C=I32,
                L=I32, **strides, inv_C=F32),
           dict(TIE=TIE_EPS, BLOCK_M=cfg["BLOCK_M"], BLOCK_L=MAX_CENTRE_BLOCK, BLOCK_C=cfg["BLOCK_C"], UPCAST=False,
                MODE=mode), options)
          for name, mode in (("assign", 0), ("assign_min", 1), ("assign_tie", 2))],  # L <= 64; L > 64: 2 launches
        ("pool_fwd", _weighted_pool_fwd_kernel,
         dict(p_x=x, p_assign="*i32", p_w="*fp32", p_proto="*fp32", p_wsum="*fp32", N=I32, C=I32, L=I32, **strides),
         dict(HAS_WEIGHT=True, ACC=acc, BLOCK_L=MAX_CENTRE_BLOCK, BLOCK_N=32, BLOCK_C=64), POOL_LAUNCH),
        ("pool_bwd", _weighted_pool_bwd_kernel,
         dict(p_x=x, p_assign="*i32", p_w="*fp32", p_proto="*fp32", p_wsum="*fp32", p_grad="*fp32",
              p_grad_x="*fp32", p_grad_w="*fp32", N=I32, C=I32, L=I32, **strides),
         dict(HAS_WEIGHT=True, NEED_GRAD_W=True, ACC=acc, BLOCK_N=32, BLOCK_C=64), POOL_LAUNCH),
        ("spatial_merge", _spatial_merge_kernel,   # v2 (kernels/spatial.py): 200 frames of 256 x 1408, (16, 6)
         dict(p_x=x, p_w=x, p_bias=x, p_gram="*fp32", p_mean=_short(centred_dtype(TORCH_DTYPES[dtype])), p_bad="*i32",
              p_rho="*fp32", p_delta="*fp32", p_centers1="*i64", p_assign1="*i64", p_first=x, p_centers2="*i64",
              p_assign2="*i64", p_second=x, p_mod=x, p_out=x, T=I32, N=I32, C=I32, stride_t=I32, stride_n=I32,
              stride_c=I32, inv_C=F32, mean_w1=F32, mean_w2=F32),
         dict(C1=16, C2=6, K1=8, K2=3, C1_PAD=_pad(16), C2_PAD=_pad(6), TIE=TIE_EPS, **_spatial_config(dtype)),
         _spatial_options(dtype)),
        # The connector's temporal path (kernels/temporal.py) on the same T = 3,600 frames (16 x 1408 channels, 16 x 16
        # patch grid, L = 25, 12 column splits of k = 5).
        ("pool_centre", _pool_centre_kernel,
         dict(p_patch=x, p_starts="*i64", p_frames="*i64", p_pooled=x,
              p_centred=_short(centred_dtype(TORCH_DTYPES[dtype])), p_sqp="*fp32", T_max=I32, F=I32, C=I32, G=I32,
              PG=I32, stride_t=I32, stride_n=I32, stride_c=I32),
         dict(STEP=4, BLOCK_F=_feature_block(16 * 1408), UPCAST=False), dict(num_warps=4)),
        ("event_rho", _rho_kernel,
         dict(p_best="*fp32", p_ids="*i32", p_len="*i32", p_rho="*fp32", p_nbr_d="*fp32", p_nbr_id="*i32", N=I32,
              S=I32), dict(K=5, K_PAD=8, **_split(rho_config(3600, 12, 5))[0]), _split(rho_config(3600, 12, 5))[1]),
        ("event_centres", _centres_kernel,
         dict(p_rho="*fp32", p_near="*fp32", p_far="*fp32", p_len="*i32", p_events="*i64", p_delta="*fp32",
              p_centres="*i64", p_assign="*i64", p_long_len="*i32", N=I32, S=I32, L_max=I32),
         dict(BLOCK=64, UPCAST=False), {}),
        ("event_pool", _event_pool_kernel,
         dict(p_x=x, p_assign="*i64", p_rho="*fp32", p_delta="*fp32", p_proto=x, p_summary=x, N=I32, C=I32, P=I32,
              L=I32), *_split(event_pool_config(3600, 1408, 25))),
        # The connector's token gather and scatter (kernels/tokens.py): C = 1408 into the 4,096-wide LLM.
        ("projector_inputs", _projector_inputs_kernel,
         dict(p_proto=x, p_grouped=x, p_patch=x, p_centres="*i64", p_kept="*i64", p_key_video="*i64",
              p_key_slot="*i64", p_starts="*i64", p_frames="*i64", p_keep="*i64", p_out=x, p_keyframes="*i64", n_key=I32,
              n_frames=I32, K_max=I32, L_max=I32, C=I32, n_patch=I32, stride_gt=I32, stride_gn=I32, stride_pt=I32,
              stride_pn=I32),
         dict(CONE=1, CONE_ROWS=38, P=16, NG=22, ROD_MEANS=True, BLOCK_R=32, BLOCK_C=_width_block(1408),
              UPCAST=False), {}),
        ("scatter_tokens", _scatter_tokens_kernel,
         dict(p_proj=x, p_val=x, p_tokens=x, p_token_starts="*i64", p_offsets="*i64", p_mask="*i1",
              p_video_of="*i64", p_time_of="*i64", p_key_video="*i64", p_key_slot="*i64", p_kept="*i64",
              p_centres="*i64", p_starts="*i64", p_frames="*i64", p_keep="*i64", n_key=I32, n_frames=I32, T_max=I32,
              K_max=I32, L_max=I32, D=I32),
         dict(CONE_ROWS=38, KEY_RODS=1, OTHER_RODS=1, BLOCK_R=16, BLOCK_D=_width_block(4096)), {}),
        ("paged_decode", _paged_decode_kernel,   # the 7B's decode: 32 heads of 128, blocks of 16, 4 splits
         dict(q_ptr=x, k_ptr=x, v_ptr=x, tables_ptr="*i32", lens_ptr="*i32", acc_ptr="*fp32", stats_ptr="*fp32",
              stride_qb=I32, stride_qh=I32, stride_kb=I32, stride_kn=I32, stride_kh=I32, stride_tb=I32, scale=F32,
              blocks_per_split=I32),
         dict(GROUP=1, HEAD_DIM=128, BLOCK_G=16, BLOCK_N=16, BLOCK_D=128, NUM_SPLITS=4,
              PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST=False), dict(num_warps=4)),
    ]


def _resources(cubin: bytes) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        out = subprocess.run([tool, "--dump-resource-usage", handle.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return dict(zip(("registers", "stack", "shared", "local"), map(int, found.groups()))) if found else {}


# What the integer arguments are at run time for the temporal set above (T = 3,600 frames, C = 16 x 1408, L = 25,
# column splits of 12 tiles of 64; the spatial merge's N = 256 and stride_n = 1408 share these attributes): the JIT specialises an integer equal to 1 as a constant and marks integers
# divisible by 16 (and 16-byte aligned pointers) as such, and ptxas sees a different kernel without them.
RUNTIME_INTS = dict(n_key=160, n_frames=200, K_max=20, D=4096, n_patch=256, stride_gt=22 * 1408,
                    stride_gn=1408, stride_pt=256 * 1408, stride_pn=1408, T=200, stride_t=256 * 1408, T_max=3600, F=16 * 1408, G=16, PG=4, S=12, L_max=25, P=16, N=3600, C=16 * 1408, row0=0, rows=3600, stride_b=3600 * 16 * 1408, stride_n=16 * 1408, stride_c=1, L=25,
                    cols_per_split=768, B=2, chans_per_split=512, split_stride=2 * 3600 * 3600,  # split-C: 2 sets, 8 blocks
                    stride_qb=32 * 128, stride_qh=128, stride_kb=16 * 32 * 128, stride_kn=32 * 128, stride_kh=128,
                    stride_tb=256, blocks_per_split=64)   # paged decode: 7B heads, 4,096 context, 4 splits


def _jit_specialisation(kernel, signature: dict, constexprs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as the JIT would build them for RUNTIME_INTS: 1 becomes a constant, multiples
    of 16 and pointers get the divisibility-by-16 attribute."""
    signature, constexprs, attrs = dict(signature), dict(constexprs), {}
    for name, kind in list(signature.items()):
        index = kernel.arg_names.index(name)
        value = RUNTIME_INTS.get(name)
        if kind == I32 and value == 1:
            del signature[name]
            constexprs[name] = 1
        elif kind.startswith("*") or (kind == I32 and value is not None and value % 16 == 0):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def compile_all(arch: int, dtype: str = "bf16") -> list[dict]:
    """Compile every kernel for sm_<arch>; one row per kernel (raises on a compile error)."""
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, kernel, signature, constexprs, options in _specs(dtype):
            signature, constexprs, attrs = _jit_specialisation(kernel, signature, constexprs)
            full = {**signature, **{k: "constexpr" for k in constexprs}}
            compiled = triton.compile(ASTSource(fn=kernel, signature=full, constexprs=constexprs, attrs=attrs),
                                      target=GPUTarget("cuda", arch, 32), options=dict(options))
            ptx = compiled.asm["ptx"]
            rows.append(dict(kernel=name, arch=f"sm_{arch}", dtype=dtype, **_resources(compiled.asm["cubin"]),
                             wgmma=ptx.count("wgmma.mma_async"), mma=ptx.count("mma.sync")))
    return rows


def main(argv=None) -> list[dict]:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="*", default=[90, 80], help="compute capabilities, e.g. 90 80")
    parser.add_argument("--dtype", nargs="*", default=["bf16"], help="input dtypes: bf16 fp16 fp32")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON (for tests)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("kernel_resources compiles for the GPU: run it without TRITON_INTERPRET=1")
    rows = [row for arch in args.arch for dtype in args.dtype for row in compile_all(arch, dtype)]
    if args.json:
        print(json.dumps(rows))
        return rows
    columns = ["kernel", "arch", "dtype", "registers", "stack", "shared", "local", "wgmma", "mma"]
    print("  ".join(f"{c:>14}" for c in columns))
    for row in rows:
        print("  ".join(f"{str(row.get(c, '?')):>14}" for c in columns))
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

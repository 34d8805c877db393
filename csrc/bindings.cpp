// pybind11 bindings of the top-K mask builder. Pointers arrive as integers (tensor.data_ptr()) and the CUDA
// stream as an integer (torch.cuda.Stream.cuda_stream), so no torch C++ header or ABI is involved.
// dynfocus_infer/ops.py is the only intended caller: it validates, allocates and dispatches.
//
// CUDA runtime: linked statically (CMakeLists.txt), so this one module imports on machines without a GPU or
// driver; the runtime looks for the driver only when the CUDA entry point is first called.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "topk_mask.h"

namespace py = pybind11;

namespace {

dynfocus::TopKMaskProblem make_problem(uintptr_t scores, int64_t scores_row_stride, uintptr_t centre_frames,
                                       int64_t centre_row_stride, uintptr_t num_protos, uintptr_t num_keep,
                                       uintptr_t num_frames, int32_t batch, int32_t max_protos, int32_t max_keep,
                                       int32_t max_frames, int32_t key_tokens, int32_t other_tokens,
                                       uintptr_t kept_ids, uintptr_t frame_mask, uintptr_t token_offsets,
                                       uintptr_t total_tokens) {
  if (batch < 0 || max_protos < 0 || max_keep < 0 || max_frames < 0) {
    throw std::invalid_argument("topk_mask: batch, max_protos, max_keep and max_frames must be >= 0");
  }
  dynfocus::TopKMaskProblem problem;
  problem.scores = reinterpret_cast<const float*>(scores);
  problem.scores_row_stride = scores_row_stride;
  problem.centre_frames = reinterpret_cast<const int32_t*>(centre_frames);
  problem.centre_row_stride = centre_row_stride;
  problem.num_protos = reinterpret_cast<const int32_t*>(num_protos);
  problem.num_keep = reinterpret_cast<const int32_t*>(num_keep);
  problem.num_frames = reinterpret_cast<const int32_t*>(num_frames);
  problem.batch = batch;
  problem.max_protos = max_protos;
  problem.max_keep = max_keep;
  problem.max_frames = max_frames;
  problem.key_tokens = key_tokens;
  problem.other_tokens = other_tokens;
  problem.kept_ids = reinterpret_cast<int64_t*>(kept_ids);
  problem.frame_mask = reinterpret_cast<uint8_t*>(frame_mask);
  problem.token_offsets = reinterpret_cast<int64_t*>(token_offsets);
  problem.total_tokens = reinterpret_cast<int64_t*>(total_tokens);
  return problem;
}

#define DYNFOCUS_PROBLEM_ARGS                                                                                  \
  py::arg("scores"), py::arg("scores_row_stride"), py::arg("centre_frames"), py::arg("centre_row_stride"),     \
      py::arg("num_protos"), py::arg("num_keep"), py::arg("num_frames"), py::arg("batch"),                     \
      py::arg("max_protos"), py::arg("max_keep"), py::arg("max_frames"), py::arg("key_tokens"),                \
      py::arg("other_tokens"), py::arg("kept_ids"), py::arg("frame_mask"), py::arg("token_offsets"),           \
      py::arg("total_tokens")

}  // namespace

PYBIND11_MODULE(DYNFOCUS_EXT_NAME, m) {
  m.doc() = "DynFocus top-K mask builder (DESIGN.md section 7): CPU twin and, when built with nvcc, CUDA kernel.";

  m.def("has_cuda_build", []() {
#ifdef DYNFOCUS_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "True when the CUDA kernel was compiled into this module.");

  m.def(
      "topk_mask_cpu",
      [](uintptr_t scores, int64_t scores_row_stride, uintptr_t centre_frames, int64_t centre_row_stride,
         uintptr_t num_protos, uintptr_t num_keep, uintptr_t num_frames, int32_t batch, int32_t max_protos,
         int32_t max_keep, int32_t max_frames, int32_t key_tokens, int32_t other_tokens, uintptr_t kept_ids,
         uintptr_t frame_mask, uintptr_t token_offsets, uintptr_t total_tokens) {
        const auto problem = make_problem(scores, scores_row_stride, centre_frames, centre_row_stride, num_protos,
                                          num_keep, num_frames, batch, max_protos, max_keep, max_frames,
                                          key_tokens, other_tokens, kept_ids, frame_mask, token_offsets,
                                          total_tokens);
        py::gil_scoped_release no_gil;
        dynfocus::topk_mask_cpu(problem);
      },
      DYNFOCUS_PROBLEM_ARGS, "CPU twin on host pointers (see csrc/topk_mask.h for the layout).");

#ifdef DYNFOCUS_WITH_CUDA
  m.def(
      "topk_mask_cuda",
      [](uintptr_t scores, int64_t scores_row_stride, uintptr_t centre_frames, int64_t centre_row_stride,
         uintptr_t num_protos, uintptr_t num_keep, uintptr_t num_frames, int32_t batch, int32_t max_protos,
         int32_t max_keep, int32_t max_frames, int32_t key_tokens, int32_t other_tokens, uintptr_t kept_ids,
         uintptr_t frame_mask, uintptr_t token_offsets, uintptr_t total_tokens, uintptr_t stream, int device) {
        const auto problem = make_problem(scores, scores_row_stride, centre_frames, centre_row_stride, num_protos,
                                          num_keep, num_frames, batch, max_protos, max_keep, max_frames,
                                          key_tokens, other_tokens, kept_ids, frame_mask, token_offsets,
                                          total_tokens);
        py::gil_scoped_release no_gil;
        dynfocus::topk_mask_cuda(problem, reinterpret_cast<cudaStream_t>(stream), device);
      },
      DYNFOCUS_PROBLEM_ARGS, py::arg("stream"), py::arg("device"),
      "One kernel launch on `stream` (an integer cudaStream_t) for device pointers on `device`; no sync.");

  m.def("topk_mask_cuda_max_protos", &dynfocus::topk_mask_cuda_max_protos, py::arg("device"),
        "Largest max_protos the CUDA kernel takes on `device` (its working set lives in shared memory).");
#endif
}

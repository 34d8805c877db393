// Top-K mask builder (DESIGN.md section 7): the torch-free core shared by the CPU twin and the CUDA kernel.
//
// Per video b of a batch, from the connector's prototype scores s [L_b] and prototype centre frames c [L_b]
// (paper Sec. 3.2: keep the K_b best-scoring event prototypes; b_t = 1 at the centre frame of each kept one):
//   kept_ids[b, :]      the K_b best prototype ids by score (ties: lower id wins), then ordered by centre frame
//                       ascending (ties: lower id first), padded with -1 up to max_keep;
//   frame_mask[b, t]    1 where frame t is the centre of a kept prototype, 0 elsewhere (padding included);
//   token_offsets[b, t] exclusive prefix sum of per-frame token counts (key_tokens for a keyframe, other_tokens
//                       for another frame, 0 for t >= T_b), t = 0..max_frames, so token_offsets[b, max_frames] is
//                       the video's total;
//   total_tokens[b]     that total.
// The offsets are what lets the connector scatter every frame's tokens into the packed LLM input (paper Eq. 11).
//
// Memory safety does not depend on validation: both paths clamp L_b, K_b, T_b into [0, buffer size] and ignore
// centre frames outside [0, T_b), so unchecked bad input gives wrong numbers, never an out-of-bounds access.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define DYNFOCUS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DYNFOCUS_HOST_DEVICE inline
#endif

namespace dynfocus {

// Raw views of one batch. Inputs are row-major with the given row strides (elements) and unit column stride;
// the per-video counts are contiguous [batch]; outputs are contiguous.
struct TopKMaskProblem {
  const float* scores = nullptr;            // [batch, max_protos], row stride scores_row_stride
  int64_t scores_row_stride = 0;
  const int32_t* centre_frames = nullptr;   // [batch, max_protos], row stride centre_row_stride
  int64_t centre_row_stride = 0;
  const int32_t* num_protos = nullptr;      // [batch] L_b
  const int32_t* num_keep = nullptr;        // [batch] K_b
  const int32_t* num_frames = nullptr;      // [batch] T_b
  int32_t batch = 0;
  int32_t max_protos = 0;                   // L_max: columns of scores / centre_frames
  int32_t max_keep = 0;                     // K_max: columns of kept_ids
  int32_t max_frames = 0;                   // T_max: columns of frame_mask (token_offsets has T_max + 1)
  int32_t key_tokens = 40;
  int32_t other_tokens = 2;
  int64_t* kept_ids = nullptr;              // [batch, max_keep]
  uint8_t* frame_mask = nullptr;            // [batch, max_frames], 0/1 (the byte layout of torch.bool)
  int64_t* token_offsets = nullptr;         // [batch, max_frames + 1]
  int64_t* total_tokens = nullptr;          // [batch]
};

// Clamps a per-video count into [0, limit] so that unchecked input can never index past a buffer.
DYNFOCUS_HOST_DEVICE int32_t clamp_count(int32_t value, int32_t limit) {
  return value < 0 ? 0 : (value > limit ? limit : value);
}

// Strict total order "prototype a ranks above prototype b": higher score first, ties to the lower id.
// NaN ranks below every number (the wrapper rejects NaN when checking; this keeps the order a strict weak
// ordering anyway, which std::partial_sort needs to stay in bounds).
DYNFOCUS_HOST_DEVICE bool ranks_above(float score_a, int32_t id_a, float score_b, int32_t id_b) {
  const bool nan_a = score_a != score_a;
  const bool nan_b = score_b != score_b;
  if (nan_a != nan_b) return nan_b;
  if (!nan_a && score_a != score_b) return score_a > score_b;
  return id_a < id_b;
}

// Order of kept prototypes in the output: by centre frame, ties to the lower id.
DYNFOCUS_HOST_DEVICE bool comes_earlier(int32_t frame_a, int32_t id_a, int32_t frame_b, int32_t id_b) {
  return frame_a != frame_b ? frame_a < frame_b : id_a < id_b;
}

// CPU twin: loops over videos; safe to call without the GIL.
void topk_mask_cpu(const TopKMaskProblem& problem);

}  // namespace dynfocus

#ifdef DYNFOCUS_WITH_CUDA
#include <cuda_runtime_api.h>

namespace dynfocus {

// One kernel launch for the whole batch on `stream`, pointers on device `device`. Does not synchronise;
// throws std::runtime_error if the launch is refused (no driver, bad configuration).
void topk_mask_cuda(const TopKMaskProblem& problem, cudaStream_t stream, int device);

// Largest max_protos the kernel takes (its per-video working set lives in shared memory).
int topk_mask_cuda_max_protos(int device);

}  // namespace dynfocus
#endif

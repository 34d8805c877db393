// CUDA top-K mask builder: one launch per batch, one block per video (contract in topk_mask.h).
//
// A video has at most a few hundred prototypes, so top-K is done by rank counting in shared memory
// (O(L^2 / threads) compares, no sort network, no global scratch): prototype i is kept iff fewer than K_b
// prototypes rank above it, and its output slot is the number of kept prototypes that come earlier by centre
// frame. The frame pass then needs no block-wide scan: with the distinct keyframes sorted in shared memory,
//   token_offsets[t] = other_tokens * t + (key_tokens - other_tokens) * #{keyframes < t}   for t <= T_b,
// and #{keyframes < t} is a binary search, so every frame is written by an independent thread (coalesced).
#include <stdexcept>
#include <string>

#include "topk_mask.h"

namespace dynfocus {
namespace {

constexpr int kThreadsPerVideo = 256;
constexpr int kSharedArraysPerProto = 5;  // scores, centres, is_kept, is_first_of_frame, keyframes

size_t shared_bytes(int32_t max_protos) {
  return size_t(kSharedArraysPerProto) * sizeof(int32_t) * size_t(max_protos);
}

void throw_on_error(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("dynfocus topk_mask CUDA: ") + what + " failed: " +
                             cudaGetErrorString(status));
  }
}

// Number of entries of the ascending array `values[0, n)` that are < key.
__device__ __forceinline__ int32_t count_below(const int32_t* values, int32_t n, int32_t key) {
  int32_t low = 0, high = n;
  while (low < high) {
    const int32_t mid = (low + high) >> 1;
    if (values[mid] < key) low = mid + 1; else high = mid;
  }
  return low;
}

__global__ void __launch_bounds__(kThreadsPerVideo) topk_mask_kernel(TopKMaskProblem p) {
  extern __shared__ int32_t shared[];
  float* s_scores = reinterpret_cast<float*>(shared);
  int32_t* s_centres = shared + p.max_protos;
  int32_t* s_is_kept = s_centres + p.max_protos;
  int32_t* s_is_first_of_frame = s_is_kept + p.max_protos;  // kept, in [0, T_b), lowest id of its frame
  int32_t* s_keyframes = s_is_first_of_frame + p.max_protos;  // distinct keyframes, ascending
  __shared__ int32_t s_num_keyframes;

  const int32_t b = blockIdx.x;
  const int32_t num_protos = clamp_count(p.num_protos[b], p.max_protos);
  const int32_t num_keep = clamp_count(min(p.num_keep[b], num_protos), p.max_keep);
  const int32_t num_frames = clamp_count(p.num_frames[b], p.max_frames);

  if (threadIdx.x == 0) s_num_keyframes = 0;
  for (int32_t i = threadIdx.x; i < num_protos; i += blockDim.x) {
    s_scores[i] = p.scores[b * p.scores_row_stride + i];
    s_centres[i] = p.centre_frames[b * p.centre_row_stride + i];
  }
  __syncthreads();

  // Top-K by rank: the rank of i is the number of prototypes that rank above it.
  for (int32_t i = threadIdx.x; i < num_protos; i += blockDim.x) {
    const float score = s_scores[i];
    int32_t rank = 0;
    for (int32_t j = 0; j < num_protos; ++j) rank += ranks_above(s_scores[j], j, score, i);
    s_is_kept[i] = rank < num_keep;
  }
  __syncthreads();

  // Output slot of each kept prototype, ordered by centre frame; mark the first kept prototype of each frame.
  int64_t* kept_ids = p.kept_ids + int64_t(b) * p.max_keep;
  for (int32_t i = threadIdx.x; i < num_protos; i += blockDim.x) {
    s_is_first_of_frame[i] = 0;
    if (!s_is_kept[i]) continue;
    const int32_t frame = s_centres[i];
    int32_t slot = 0;
    bool first_of_frame = true;
    for (int32_t j = 0; j < num_protos; ++j) {
      if (!s_is_kept[j]) continue;
      slot += comes_earlier(s_centres[j], j, frame, i);
      first_of_frame &= !(s_centres[j] == frame && j < i);
    }
    kept_ids[slot] = i;
    if (first_of_frame && frame >= 0 && frame < num_frames) {
      s_is_first_of_frame[i] = 1;
      atomicAdd(&s_num_keyframes, 1);
    }
  }
  for (int32_t k = num_keep + threadIdx.x; k < p.max_keep; k += blockDim.x) kept_ids[k] = -1;
  __syncthreads();

  // Compact the distinct keyframes into ascending order.
  for (int32_t i = threadIdx.x; i < num_protos; i += blockDim.x) {
    if (!s_is_first_of_frame[i]) continue;
    const int32_t frame = s_centres[i];
    int32_t position = 0;
    for (int32_t j = 0; j < num_protos; ++j) position += s_is_first_of_frame[j] && s_centres[j] < frame;
    s_keyframes[position] = frame;
  }
  __syncthreads();

  const int32_t num_keyframes = s_num_keyframes;
  const int64_t extra_per_keyframe = int64_t(p.key_tokens) - p.other_tokens;
  uint8_t* frame_mask = p.frame_mask + int64_t(b) * p.max_frames;
  int64_t* offsets = p.token_offsets + int64_t(b) * (int64_t(p.max_frames) + 1);
  for (int64_t t = threadIdx.x; t <= p.max_frames; t += blockDim.x) {  // int64: t passes max_frames
    const int32_t frames_before = int32_t(min(t, int64_t(num_frames)));
    const int32_t keyframes_before = count_below(s_keyframes, num_keyframes, frames_before);
    const int64_t offset = int64_t(p.other_tokens) * frames_before + extra_per_keyframe * keyframes_before;
    offsets[t] = offset;
    if (t < p.max_frames) {
      frame_mask[t] = t < num_frames && keyframes_before < num_keyframes && s_keyframes[keyframes_before] == t;
    } else {
      p.total_tokens[b] = offset;
    }
  }
}

// Makes `device` current for the launch and restores the caller's device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    throw_on_error(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) throw_on_error(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace

int topk_mask_cuda_max_protos(int device) {
  int optin_bytes = 0;
  throw_on_error(cudaDeviceGetAttribute(&optin_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
                 "cudaDeviceGetAttribute");
  const int static_bytes = 64;  // s_num_keyframes plus alignment slack
  return (optin_bytes - static_bytes) / int(kSharedArraysPerProto * sizeof(int32_t));
}

void topk_mask_cuda(const TopKMaskProblem& problem, cudaStream_t stream, int device) {
  if (problem.batch <= 0) return;
  DeviceGuard guard(device);
  const size_t bytes = shared_bytes(problem.max_protos);
  if (bytes > 48 * 1024) {
    if (problem.max_protos > topk_mask_cuda_max_protos(device)) {
      throw std::invalid_argument("dynfocus topk_mask CUDA: max_protos = " + std::to_string(problem.max_protos) +
                                  " exceeds the shared-memory limit of " +
                                  std::to_string(topk_mask_cuda_max_protos(device)) +
                                  " prototypes per video; use the CPU path for such sizes");
    }
    throw_on_error(cudaFuncSetAttribute(topk_mask_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)),
                   "cudaFuncSetAttribute");
  }
  topk_mask_kernel<<<problem.batch, kThreadsPerVideo, bytes, stream>>>(problem);
  throw_on_error(cudaGetLastError(), "kernel launch");
}

}  // namespace dynfocus

// CPU twin of the top-K mask builder: same contract as the CUDA kernel (see topk_mask.h), plain C++.
#include <algorithm>
#include <numeric>
#include <vector>

#include "topk_mask.h"

namespace dynfocus {
namespace {

void build_one_video(const TopKMaskProblem& p, int32_t b, std::vector<int32_t>& ids) {
  const int32_t num_protos = clamp_count(p.num_protos[b], p.max_protos);
  const int32_t num_keep = clamp_count(std::min(p.num_keep[b], num_protos), p.max_keep);
  const int32_t num_frames = clamp_count(p.num_frames[b], p.max_frames);
  const float* scores = p.scores + b * p.scores_row_stride;
  const int32_t* centres = p.centre_frames + b * p.centre_row_stride;

  ids.resize(num_protos);
  std::iota(ids.begin(), ids.end(), 0);
  // Only the kept set matters (it is re-ordered by frame next), and ranks_above is a strict total order,
  // so a linear-time selection gives exactly the top K.
  std::nth_element(ids.begin(), ids.begin() + num_keep, ids.end(), [&](int32_t a, int32_t c) {
    return ranks_above(scores[a], a, scores[c], c);
  });
  std::sort(ids.begin(), ids.begin() + num_keep, [&](int32_t a, int32_t c) {
    return comes_earlier(centres[a], a, centres[c], c);
  });

  int64_t* kept_ids = p.kept_ids + int64_t(b) * p.max_keep;
  std::copy(ids.begin(), ids.begin() + num_keep, kept_ids);
  std::fill(kept_ids + num_keep, kept_ids + p.max_keep, int64_t(-1));

  uint8_t* frame_mask = p.frame_mask + int64_t(b) * p.max_frames;
  std::fill(frame_mask, frame_mask + p.max_frames, uint8_t(0));
  for (int32_t k = 0; k < num_keep; ++k) {
    const int32_t frame = centres[ids[k]];
    if (frame >= 0 && frame < num_frames) frame_mask[frame] = 1;
  }

  int64_t* offsets = p.token_offsets + int64_t(b) * (int64_t(p.max_frames) + 1);
  int64_t running = 0;
  for (int32_t t = 0; t < num_frames; ++t) {
    offsets[t] = running;
    running += frame_mask[t] ? p.key_tokens : p.other_tokens;
  }
  std::fill(offsets + num_frames, offsets + int64_t(p.max_frames) + 1, running);
  p.total_tokens[b] = running;
}

}  // namespace

void topk_mask_cpu(const TopKMaskProblem& problem) {
  std::vector<int32_t> ids;  // reused across videos: one allocation per call
  for (int32_t b = 0; b < problem.batch; ++b) build_one_video(problem, b, ids);
}

}  // namespace dynfocus

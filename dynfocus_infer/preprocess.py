"""Frame preprocessing on the model's device (DESIGN section 3, second row).

Reproduces transformers' CLIPImageProcessor defaults (the processor EVA-CLIP / LLaMA-VID / DynFocus use):
shorter side to 224 with bicubic resampling (longer side int(224 * long / short), truncated), centre crop
224 x 224 with top-left at ((h - 224) // 2, (w - 224) // 2), rescale 1/255, normalise with the OpenAI CLIP
mean/std. The resize is torch's antialiased bicubic, whose kernel (a = -0.5, support widened by the scale
when shrinking) is PIL's, run as PIL runs it (see _resize_like_pil); the measured difference from
CLIPImageProcessor is at most one uint8 level (0.015 after normalisation) on well under 1% of the values.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .errors import RequestError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_output_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(height, width) after scaling the shorter side to shortest_edge, as transformers computes it."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def _resize_like_pil(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Separable bicubic resize of float [T, 3, H, W] holding uint8 values, pass by pass as PIL does:
    width first, then height, each pass clamped and rounded to uint8 levels (PIL keeps a uint8 image
    between passes). Skipping that intermediate rounding costs up to ~24 levels of error on noisy frames
    where bicubic overshoots; with it the result is within one level of PIL's.
    """
    if pixels.shape[-1] != width:
        pixels = F.interpolate(pixels, size=(pixels.shape[-2], width), mode="bicubic", align_corners=False,
                               antialias=True).clamp_(0.0, 255.0).round_()
    if pixels.shape[-2] != height:
        pixels = F.interpolate(pixels, size=(height, width), mode="bicubic", align_corners=False,
                               antialias=True).clamp_(0.0, 255.0).round_()
    return pixels


def _crop_box(height: int, width: int, image_size: int) -> tuple[int, int, int, int]:
    """(resized height, resized width, top, left): shorter side to image_size, then the centre crop's corner."""
    resized_height, resized_width = resize_output_size(height, width, image_size)
    # The shorter side becomes image_size and the longer one is at least that, so the crop always fits.
    return resized_height, resized_width, (resized_height - image_size) // 2, (resized_width - image_size) // 2


def resize_frames(frames: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 RGB frames [T, H, W, 3] -> uint8 [T, image_size, image_size, 3]: preprocess_frames' resize and centre
    crop, without normalising. Exact, not approximate: every resize pass already rounds and clamps to uint8 levels,
    so preprocess_frames of the result equals preprocess_frames of the input bit for bit. Decoders call it on chunks
    of frames as they decode (video_decode.FrameCollector), so a video is held at image_size, not at its source
    resolution. Runs on the frames' device."""
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
        raise RequestError(f"resize_frames expects uint8 RGB frames [T, H, W, 3], got {frames.dtype} "
                           f"{list(frames.shape)}")
    resized_height, resized_width, top, left = _crop_box(frames.shape[1], frames.shape[2], image_size)
    pixels = _resize_like_pil(frames.permute(0, 3, 1, 2).float(), resized_height, resized_width)
    pixels = pixels[:, :, top:top + image_size, left:left + image_size]
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def preprocess_frames(frames: torch.Tensor, *, image_size: int = 224,
                      device: Optional[Union[str, torch.device]] = None, dtype: torch.dtype = torch.float32,
                      mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                      chunk_bytes: int = 256 << 20) -> torch.Tensor:
    """uint8 RGB frames [T, H, W, 3] -> normalised pixels [T, 3, image_size, image_size] on `device`.

    Frames go to the device as uint8 (4x fewer bytes than float; asynchronous when pinned) and every step
    runs batched there. Frames are processed in chunks whose float32 copy stays under chunk_bytes, so 200
    frames of 1080p video do not need 5 GB of device memory at once. Arithmetic is float32; the result is
    cast to `dtype` at the end.
    """
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
        raise RequestError(f"preprocess_frames expects uint8 RGB frames [T, H, W, 3], got {frames.dtype} "
                           f"{list(frames.shape)}")
    num_frames, height, width, _ = frames.shape
    if num_frames == 0 or height == 0 or width == 0:
        raise RequestError(f"preprocess_frames got an empty video: shape {list(frames.shape)}")
    if image_size < 1:
        raise RequestError(f"image_size must be >= 1, got {image_size}")
    target_device = torch.device(device) if device is not None else frames.device
    resized_height, resized_width, top, left = _crop_box(height, width, image_size)
    # (x / 255 - mean) / std folded into one multiply-add per channel.
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    scale = (1.0 / (255.0 * std_t)).to(target_device)
    shift = (-mean_t / std_t).to(target_device)
    output = torch.empty(num_frames, 3, image_size, image_size, device=target_device, dtype=dtype)
    largest_side = max(height, resized_height) * max(width, resized_width)
    frames_per_chunk = max(1, chunk_bytes // (largest_side * 3 * 4))
    for start in range(0, num_frames, frames_per_chunk):  # a few chunks per video, never one per frame
        chunk = frames[start:start + frames_per_chunk].to(target_device, non_blocking=True)
        pixels = _resize_like_pil(chunk.permute(0, 3, 1, 2).float(), resized_height, resized_width)
        pixels = pixels[:, :, top:top + image_size, left:left + image_size]
        output[start:start + frames_per_chunk] = torch.addcmul(shift, pixels, scale)
    return output

"""Shared by the engine tests: an eager stand-in for CUDA graph capture, so the graph path's bookkeeping (static
buffers, batch buckets, padding rows) runs on a CPU; a frame encoder that spoils the features of white frames."""


def eager_graph_capture(replays: list):
    """A `capture` for cuda_graphs.DecodeGraphs: each replay reruns the forward eagerly into the captured logits
    buffer and records the bucket's row count in `replays`."""
    def capture(forward):
        logits = forward().clone()

        def replay():
            replays.append(logits.shape[0])
            logits.copy_(forward())
        return replay, logits
    return capture


def eager_connector_capture(forward):
    """A `capture` for connector_graphs.ConnectorGraphs: each replay reruns the forward eagerly on the static buffers
    and copies its tensors into the captured output's (as a graph replay rewrites them in place)."""
    import torch

    output = forward()

    def replay():
        fresh = forward()
        with torch.inference_mode():
            for kept, new in zip(output, fresh):
                if isinstance(kept, torch.Tensor):
                    kept.copy_(new)
    return replay, output


def nan_on_white_frames(encode_frames):
    """Wraps a model's `encode_frames`: the features of every all-white frame become NaN (normalised white is about
    1.9 in every channel), the others are what `encode_frames` gives."""
    import torch

    def encode_with_nan(pixels, **kwargs):
        features = encode_frames(pixels, **kwargs)
        white = pixels.flatten(1).amin(1) > 1.5
        return torch.where(white[:, None, None], torch.full_like(features, float("nan")), features)
    return encode_with_nan

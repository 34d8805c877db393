"""Shared by the engine tests: an eager stand-in for CUDA graph capture, so the graph path's bookkeeping (static
buffers, batch buckets, padding rows) runs on a CPU."""


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

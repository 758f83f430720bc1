"""Video input: sampling plan, streaming PyAV decoding, SigLIP preprocessing, synthetic test videos."""

from .decode import VideoInfo, expand_to_square, iter_frame_batches, load_image, probe_video, read_video
from .preprocess import preprocess_frames
from .sampling import SamplingPlan, plan_sampling

__all__ = [
    "SamplingPlan",
    "VideoInfo",
    "expand_to_square",
    "iter_frame_batches",
    "load_image",
    "plan_sampling",
    "preprocess_frames",
    "probe_video",
    "read_video",
]

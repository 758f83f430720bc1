"""videoxl2: Video-XL-2 long-video understanding on current transformers.

from videoxl2 import load_model, load_tokenizer
model = load_model("path/to/Video-XL-2")
tokenizer = load_tokenizer("path/to/Video-XL-2")
print(model.chat("video.mp4", tokenizer, "What happens?", max_num_frames=256))
"""

# First, before transformers imports torchao (when installed): filters torchao's import-time log noise.
from .modeling import quantize as _quantize  # noqa: F401

# isort: split
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .config import VideoXL2Config
from .errors import (
    CheckpointError,
    ConfigError,
    InputError,
    MediaNotFoundError,
    VideoDecodeError,
    VideoXL2Error,
)
from .modeling.checkpoint import load_model
from .modeling.videoxl2 import VideoXL2ForCausalLM

__version__ = "0.1.0"

AutoConfig.register(VideoXL2Config.model_type, VideoXL2Config, exist_ok=True)
AutoModel.register(VideoXL2Config, VideoXL2ForCausalLM, exist_ok=True)
AutoModelForCausalLM.register(VideoXL2Config, VideoXL2ForCausalLM, exist_ok=True)


def load_tokenizer(path, revision: str | None = None, local_files_only: bool | None = None):
    """The tokenizer saved beside a checkpoint (Qwen2.5's for the release): a folder, or a hub id resolved
    through the Hugging Face cache like `load_model`'s (only the tokenizer's files are fetched)."""
    from .modeling.checkpoint import TOKENIZER_FILES, resolve_checkpoint

    folder = resolve_checkpoint(path, revision, local_files_only, allow_patterns=TOKENIZER_FILES)
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: no usable tokenizer files ({err})") from err


def __getattr__(name):
    # Heavy engine pieces load on first use, keeping `import videoxl2` light.
    if name in ("VideoSession", "Answer"):
        from .engine import session

        return getattr(session, name)
    if name == "EngineSettings":
        from .engine.settings import EngineSettings

        return EngineSettings
    raise AttributeError(f"module 'videoxl2' has no attribute {name!r}")


__all__ = [
    "VideoXL2Config",
    "VideoXL2ForCausalLM",
    "load_model",
    "load_tokenizer",
    "VideoXL2Error",
    "InputError",
    "MediaNotFoundError",
    "VideoDecodeError",
    "CheckpointError",
    "ConfigError",
]

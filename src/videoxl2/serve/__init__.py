"""Serving: an OpenAI-compatible chat API over videos (FastAPI) and a web UI (Gradio), safe by default.

`service.py` owns the model, the one worker thread and the video-memory cache; `api.py` and `ui.py` are two
faces of it. Needs the `serve` extra: pip install 'videoxl2[serve]'.
"""

"""Is the demo model's failure on long haystacks about relative distance? 64-frame haystacks, dense causal
forward, with a position gap S inserted (a) right before the question, (b) right after the needle group."""
import sys, itertools, numpy as np, torch
from transformers import DynamicCache
from videoxl2 import load_model, load_tokenizer
from videoxl2.defaults import DEFAULT_MODEL
from videoxl2.engine.session import VideoSession
from videoxl2.demo.niah import trial_needle, QUESTION
from videoxl2.data.synthetic import needle_haystack_spec, write_video
from videoxl2.video import read_video
from videoxl2.eval.scoring import normalize_text
torch.set_num_threads(1)
model = load_model(DEFAULT_MODEL); tok = load_tokenizer(DEFAULT_MODEL)
gaps = [int(x) for x in sys.argv[1].split(",")]; length = int(sys.argv[2]) if len(sys.argv) > 2 else 64
res = {}
for index, depth in enumerate([0.0, 0.25, 0.5, 0.75, 1.0] * 2):
    needle = trial_needle(0, index)
    spec = needle_haystack_spec(length, depth, needle, 1.0, seed=index)
    path = write_video(spec, f"/tmp/diag/h-{length}-{index}.mp4")
    plan, batches = read_video(path, max_num_frames=length, sample_fps=1.0)
    frames = np.concatenate(list(batches))
    s = VideoSession.from_frames(model, tok, frames, plan.timestamps, progress=False)
    with torch.inference_mode():
        emb = torch.cat(list(s.iter_group_embeddings()))
        q = s.question_ids(QUESTION)
        ids = torch.cat([s.layout.input_ids[: s.layout.video_end], q])
        embeds = model.embed_inputs(ids, emb)
        gi = spec.needles[0].start_frame // 4
        needle_end = s.layout.groups[gi].end
        for gap in gaps:
            for where in ("question", "needle"):
                pos = torch.arange(ids.numel())
                cut = s.layout.video_end if where == "question" else needle_end
                pos[cut:] += gap
                cache = DynamicCache(config=model.config.text_config)
                out = model.language_model(inputs_embeds=embeds[None], position_ids=pos[None], past_key_values=cache, use_cache=True)
                nxt, got, p = out.logits[0, -1].argmax(), [], int(pos[-1])
                for _ in range(6):
                    got.append(int(nxt))
                    if int(nxt) == tok.convert_tokens_to_ids("<|im_end|>"): break
                    p += 1
                    out = model.language_model(inputs_embeds=model.get_input_embeddings()(nxt[None])[None], position_ids=torch.tensor([[p]]), past_key_values=cache, use_cache=True)
                    nxt = out.logits[0, -1].argmax()
                text = tok.decode(got, skip_special_tokens=True)
                ok = normalize_text(text) == normalize_text(spec.needles[0].name)
                res.setdefault((gap, where), []).append(ok)
    print(index, {k: sum(v) for k, v in res.items()}, flush=True)
for k, v in res.items(): print(k, f"{100*sum(v)/len(v):.0f}%")

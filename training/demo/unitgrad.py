# Issue 26 attempt (removed in the next commit; row in the model card). Usage: [SRC=bundle] NPOOL=60 LENS=256,1024,4096 STEPS=400 LR=4e-4 python unitgrad.py OUT
"""Experiment (issue 26): fine-tune reading AND the needle unit's own pre-fill at its true long position.
Real bi-level caches of long pre-fills (no grad); the needle's unit is pre-filled again with gradients (its
context, the store's rows, detached), its rows replace the cache's; loss on the question+answer tokens."""
import math, os, shutil, sys, tempfile, time
import numpy as np, torch, torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from videoxl2 import load_model, load_tokenizer
from videoxl2.defaults import DEFAULT_MODEL
from videoxl2.engine.session import VideoSession
from videoxl2.engine.settings import EngineSettings
from videoxl2.engine.runner import LayerRunner, attention
from videoxl2.data.synthetic import random_spec, questions, write_video
from videoxl2.video import read_video
from videoxl2.video.preprocess import preprocess_frames

OUT = sys.argv[1]
STEPS = int(os.environ.get("STEPS", "300")); ACC = int(os.environ.get("ACC", "8")); LR = float(os.environ.get("LR", "3e-4"))
NPOOL = int(os.environ.get("NPOOL", "60")); SPOOL = int(os.environ.get("SPOOL", "100")); LONG = float(os.environ.get("LONG", "0.6"))
LENS = [int(x) for x in os.environ.get("LENS", "256,1024,4096").split(",")]
torch.manual_seed(0); rng = np.random.default_rng(2027); torch.set_num_threads(2)
src = os.environ.get("SRC", DEFAULT_MODEL)
model = load_model(src); tok = load_tokenizer(src)
engine = EngineSettings.from_config(model.config, mode="bilevel")
runner = LayerRunner(model); L = runner.num_layers
tmpdir = tempfile.mkdtemp(prefix="unitgrad-"); t0 = time.time()
closing = tok("<|im_end|>\n", add_special_tokens=False)["input_ids"]
def answer_ids(text): return torch.tensor(tok(text, add_special_tokens=False)["input_ids"] + closing)

def prefill(spec, name):
    path = write_video(spec, f"{tmpdir}/{name}.mp4")
    plan, batches = read_video(path, max_num_frames=spec.num_frames, sample_fps=1.0)
    frames = np.concatenate(list(batches)); os.remove(path)
    s = VideoSession.from_frames(model, tok, frames, plan.timestamps, settings=engine, progress=False)
    with torch.inference_mode():
        mem = s.prefill(); mem.build_sparse(s.runner)
    return s, mem, frames

def unit_inputs(s, mem, frames, u):
    first, last = mem.unit_groups(u)
    px = preprocess_frames(frames[first * 4 : (last + 1) * 4], image_size=model.config.vision_config.image_size)
    with torch.no_grad():
        emb = model.encode_video(px)
    lay = mem.layout
    a, b = lay.groups[first].time_start, lay.groups[last].end
    return dict(u=u, first=first, last=last, a=a, b=b, ids=lay.input_ids[a:b].clone(), emb=emb)

def unit_forward(mem, ui):
    """The unit's rows pre-filled again as chunked pre-fill computes them (context detached)."""
    lay, st = mem.layout, engine
    a, b = ui["a"], ui["b"]
    hidden = model.embed_inputs(ui["ids"], ui["emb"])
    own_k, own_v = [None] * L, [None] * L
    def attend(layer, q, k, v):
        own_k[layer], own_v[layer] = k, v
        K, V = mem.keys[layer], mem.values[layer]
        out = []
        for gi in range(ui["first"], ui["last"] + 1):
            g = lay.groups[gi]
            block = gi // st.block_size
            wg = max(0, block - st.prev_blocks) * st.block_size
            ws = lay.groups[wg].time_start
            t0_, v0, e0 = g.time_start - a, g.visual_start - a, g.end - a
            tk = torch.cat([K[:, :a], k[:, :v0]], 1); tv = torch.cat([V[:, :a], v[:, :v0]], 1)
            out.append(attention(q[:, t0_:v0], tk, tv, causal=True))
            gidx = torch.cat([torch.arange(lay.video_start)] + [torch.arange(lay.groups[j].time_start, lay.groups[j].visual_start) for j in range(wg)])
            gk = torch.cat([K.index_select(1, gidx), K[:, ws:a], k[:, :e0]], 1) if ws < a else torch.cat([K.index_select(1, gidx), k[:, ws - a : e0]], 1)
            gv = torch.cat([V.index_select(1, gidx), V[:, ws:a], v[:, :e0]], 1) if ws < a else torch.cat([V.index_select(1, gidx), v[:, ws - a : e0]], 1)
            out.append(attention(q[:, v0:e0], gk, gv, causal=True))
        return torch.cat(out, 1)
    runner.forward(hidden, torch.arange(a, b), attend)
    return own_k, own_v

longs, shorts = [], []
for i in range(NPOOL):
    n = int(rng.choice(LENS)); spec = random_spec(rng, n, max_needles=3)
    spec = type(spec)(spec.num_frames, spec.fps, 8_000_000 + i, spec.needles)
    s, mem, frames = prefill(spec, f"n{i}")
    first = spec.needles[0]; gi = first.start_frame // 4
    u = next(u for u in range(mem.num_units) if mem.unit_groups(u)[0] <= gi <= mem.unit_groups(u)[1])
    ui = unit_inputs(s, mem, frames, u)
    if i == 0:
        with torch.no_grad():
            k, v = unit_forward(mem, ui)
        err = max(float((k[l] - mem.keys[l][:, ui["a"]:ui["b"]]).abs().max()) for l in range(L))
        print("recompute check: max key error", err, flush=True)
    qs = [q for q in questions(spec, rng) if q.family in ("what", "choice", "when")]
    longs.append(dict(mem=mem, ui=ui, qs=[(s.question_ids(q.question), q.answer) for q in qs]))
for i in range(SPOOL):
    n = int(rng.integers(2, 25)) * 4; spec = random_spec(rng, n)
    s, mem, frames = prefill(spec, f"s{i}")
    shorts.append(dict(mem=mem, qs=[(s.question_ids(q.question), q.answer) for q in questions(spec, rng)], spec=spec))
print(f"pool {len(longs)} long, {len(shorts)} short, {time.time()-t0:.0f}s", flush=True)

def loss_on(keys, vals, nextpos, q, a):
    ids = torch.cat([q, a]); n = ids.numel()
    emb = model.get_input_embeddings()(ids)
    def attend(layer, qq, k, v):
        return attention(qq, torch.cat([keys[layer], k], 1), torch.cat([vals[layer], v], 1), causal=True)
    hidden = runner.forward(emb, torch.arange(n) + nextpos, attend)
    logits = model.get_output_embeddings()(runner.llm.norm(hidden[q.numel() - 1 : n - 1]))
    return F.cross_entropy(logits.float(), a)

def sample(kind):
    if kind == "long":
        h = longs[int(rng.integers(len(longs)))]; mem, ui = h["mem"], h["ui"]
        q, a = h["qs"][0] if rng.random() < 0.6 else h["qs"][int(rng.integers(len(h["qs"])))]
        n = mem.num_units; dense = {0, n - 1, ui["u"]}
        extra = [i for i in range(n) if i not in dense]; rng.shuffle(extra); dense |= set(extra[:3])
        with torch.no_grad():
            cache = mem.assemble(runner, sorted(dense), rerotate=False)
        s0, s1 = cache.unit_slices[ui["u"]]
        ok, ov = unit_forward(mem, ui)
        keys = [torch.cat([cache.keys[l][:, :s0], ok[l], cache.keys[l][:, s1:cache.length]], 1) for l in range(L)]
        vals = [torch.cat([cache.values[l][:, :s0], ov[l], cache.values[l][:, s1:cache.length]], 1) for l in range(L)]
        return keys, vals, cache.next_position, q, answer_ids(a)
    h = shorts[int(rng.integers(len(shorts)))]; mem = h["mem"]
    q, a = h["qs"][int(rng.integers(len(h["qs"])))]
    n = mem.num_units
    if rng.random() < 0.5 or n <= 6: dense = list(range(n))
    else:
        d = {0, n - 1}; extra = [i for i in range(n) if i not in d]; rng.shuffle(extra); dense = sorted(d | set(extra[:4]))
    with torch.no_grad():
        cache = mem.assemble(runner, dense, rerotate=False)
    return [k[:, :cache.length] for k in cache.keys], [v[:, :cache.length] for v in cache.values], cache.next_position, q, answer_ids(a)

for p in model.parameters(): p.requires_grad_(False)
params = list(model.llm.parameters())
for p in params: p.requires_grad_(True)
opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * min(s, STEPS) / STEPS)))
kinds = {"long": [], "short": []}
for step in range(STEPS):
    opt.zero_grad()
    for _ in range(ACC):
        kind = "long" if rng.random() < LONG else "short"
        keys, vals, nextpos, q, a = sample(kind)
        loss = loss_on(keys, vals, nextpos, q, a); kinds[kind].append(float(loss.detach()))
        (loss / ACC).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); sched.step()
    if step % 20 == 0 or step == STEPS - 1:
        print(f"step {step} long {np.mean(kinds['long'][-60:]):.3f} short {np.mean(kinds['short'][-60:]):.3f} {time.time()-t0:.0f}s", flush=True)
os.makedirs(OUT, exist_ok=True)
for f in ("config.json", "tokenizer.json", "tokenizer_config.json"): shutil.copyfile(f"{src}/{f}", f"{OUT}/{f}")
with safe_open(f"{src}/model.safetensors", "pt") as hnd: names = list(hnd.keys())
sd = model.state_dict(); save_file({k: sd[k].detach().contiguous().clone() for k in names}, f"{OUT}/model.safetensors")
print("saved", OUT, f"{time.time()-t0:.0f}s"); shutil.rmtree(tmpdir, ignore_errors=True)

# Issue 26 attempt (removed in the next commit; rows in the model card). Usage, from training/demo/:
# [SRC=bundle] NPOOL=15 LENS=256,1024,1024,2048,4096 STEPS=200 ACC=12 LR=5e-4 SMEAR=0|1 python needleswap.py OUT
"""Needle-free long haystacks pre-filled once (no grad); each sample puts a fresh random needle into a random
unit, pre-fills that unit again with gradients at its true position (context: the store's rows, detached),
splices its rows into the real bi-level cache, and trains on the question's answer. Stage-3 short batches
(full gradient) keep the short-video skills. The answer cannot be learnt from the haystack."""

import math, os, shutil, sys, tempfile, time
import numpy as np, torch, torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from videoxl2 import load_model, load_tokenizer
from videoxl2.defaults import DEFAULT_MODEL
from videoxl2.engine.session import VideoSession
from videoxl2.engine.settings import EngineSettings
from videoxl2.engine.runner import LayerRunner, attention
from videoxl2.data.synthetic import COLOURS, SHAPES, Needle, VideoSpec, questions, render_frame, write_video
from videoxl2.video import read_video
from videoxl2.video.synthetic import write_synthetic_video
from videoxl2.video.preprocess import preprocess_frames
from videoxl2.train.config import load_config
from videoxl2.train.data import Collator, SupervisedDataset, load_samples
from videoxl2.train.features import FeatureStore, frozen_fingerprint

OUT = sys.argv[1]
E = os.environ.get
STEPS = int(E("STEPS", "300")); ACC = int(E("ACC", "8")); SB = int(E("SB", "8")); LR = float(E("LR", "3e-4"))
NPOOL = int(E("NPOOL", "40")); LENS = [int(x) for x in E("LENS", "256,1024,4096").split(",")]
SMEAR = int(E("SMEAR", "1")); PWHAT = float(E("PWHAT", "0.6")); PCHOICE = float(E("PCHOICE", "0.4")); PWHEN = float(E("PWHEN", "0"))
EXTRA = int(E("EXTRA", "3")); WLONG = float(E("WLONG", "1.0")); REROT = float(E("REROT", "0"))
torch.manual_seed(0); rng = np.random.default_rng(int(E("SEED", "2031"))); torch.set_num_threads(2)
src = E("SRC", DEFAULT_MODEL)
model = load_model(src); tok = load_tokenizer(src)
engine = EngineSettings.from_config(model.config, mode="bilevel")
runner = LayerRunner(model); L = runner.num_layers
tmpdir = tempfile.mkdtemp(prefix="needleswap-"); t0 = time.time()
closing = tok("<|im_end|>\n", add_special_tokens=False)["input_ids"]
def answer_ids(text): return torch.tensor(tok(text, add_special_tokens=False)["input_ids"] + closing)

def decoded(path, n):
    plan, batches = read_video(path, max_num_frames=n, sample_fps=1.0)
    return np.concatenate(list(batches))

def unit_forward(mem, first, last, ids, emb):
    """The unit's rows pre-filled again as chunked pre-fill computes them (context detached)."""
    lay, st = mem.layout, engine
    a, b = lay.groups[first].time_start, lay.groups[last].end
    hidden = model.embed_inputs(ids, emb)
    own_k, own_v = [None] * L, [None] * L
    def attend(layer, q, k, v):
        own_k[layer], own_v[layer] = k, v
        K, V = mem.keys[layer], mem.values[layer]
        out = []
        for gi in range(first, last + 1):
            g = lay.groups[gi]
            block = gi // st.block_size
            wg = max(0, block - st.prev_blocks) * st.block_size
            ws = lay.groups[wg].time_start
            t0_, v0, e0 = g.time_start - a, g.visual_start - a, g.end - a
            tk = torch.cat([K[:, :a], k[:, :v0]], 1); tv = torch.cat([V[:, :a], v[:, :v0]], 1)
            out.append(attention(q[:, t0_:v0], tk, tv, causal=True))
            gidx = torch.cat([torch.arange(lay.video_start)] + [torch.arange(lay.groups[j].time_start, lay.groups[j].visual_start) for j in range(wg)])
            if ws < a:
                gk = torch.cat([K.index_select(1, gidx), K[:, ws:a], k[:, :e0]], 1); gv = torch.cat([V.index_select(1, gidx), V[:, ws:a], v[:, :e0]], 1)
            else:
                gk = torch.cat([K.index_select(1, gidx), k[:, ws - a : e0]], 1); gv = torch.cat([V.index_select(1, gidx), v[:, ws - a : e0]], 1)
            out.append(attention(q[:, v0:e0], gk, gv, causal=True))
        return torch.cat(out, 1)
    runner.forward(hidden, torch.arange(a, b), attend)
    return a, b, own_k, own_v

# -- the haystack pool: needle-free, pre-filled once ------------------------------------------------------
pool = []
for i in range(NPOOL):
    n = int(LENS[i % len(LENS)]); g = int(rng.integers(n // 4))
    needles = (Needle(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), g * 4),) if SMEAR else ()
    spec = VideoSpec(n, 1.0, 7_000_000 + i, needles)
    path = write_video(spec, f"{tmpdir}/h{i}.mp4")
    plan, batches = read_video(path, max_num_frames=n, sample_fps=1.0); frames = np.concatenate(list(batches)); os.remove(path)
    s = VideoSession.from_frames(model, tok, frames, plan.timestamps, settings=engine, progress=False)
    with torch.inference_mode():
        mem = s.prefill(); mem.build_sparse(s.runner)
    pool.append(dict(spec=spec, frames=frames, session=s, mem=mem))
    print(f"haystack {i} {n} frames, {mem.num_units} units, {time.time()-t0:.0f}s", flush=True)

def long_sample():
    h = pool[int(rng.integers(len(pool)))]; mem, spec = h["mem"], h["spec"]
    U = mem.num_units
    if spec.needles:
        gi = spec.needles[0].start_frame // 4; u = gi // mem.unit_size; first, last = mem.unit_groups(u)
    else:
        u = int(rng.integers(U)); first, last = mem.unit_groups(u); gi = int(rng.integers(first, last + 1))
    needle = Needle(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), gi * 4)
    nspec = VideoSpec(spec.num_frames, spec.fps, spec.seed, (needle,))
    clip = write_synthetic_video(f"{tmpdir}/clip.mp4", 4, 1.0, spec.size, spec.seed, lambda j: render_frame(nspec, gi * 4 + j))
    frames = h["frames"][first * 4 : (last + 1) * 4].copy()
    frames[(gi - first) * 4 : (gi - first + 1) * 4] = decoded(clip, 4)
    px = preprocess_frames(frames, image_size=model.config.vision_config.image_size)
    emb = model.encode_video(px)
    lay = mem.layout
    a, b = lay.groups[first].time_start, lay.groups[last].end
    _, _, ok, ov = unit_forward(mem, first, last, lay.input_ids[a:b].clone(), emb)
    qs = questions(nspec, rng)
    r = rng.random()
    fam = "what" if r < PWHAT else "choice" if r < PWHAT + PCHOICE else "when" if r < PWHAT + PCHOICE + PWHEN else "count"
    q = next((x for x in qs if x.family == fam), qs[0])
    dense = {0, U - 1, u}; extra = [i for i in range(U) if i not in dense]; rng.shuffle(extra); dense |= set(extra[:EXTRA])
    rerot = rng.random() < REROT
    with torch.no_grad():
        cache = mem.assemble(runner, sorted(dense), rerotate=rerot)
    s0, s1 = cache.unit_slices[u]
    if rerot:
        raise SystemExit("rerotate splicing not implemented")
    keys = [torch.cat([cache.keys[l][:, :s0], ok[l], cache.keys[l][:, s1:cache.length]], 1) for l in range(L)]
    vals = [torch.cat([cache.values[l][:, :s0], ov[l], cache.values[l][:, s1:cache.length]], 1) for l in range(L)]
    return loss_on(keys, vals, cache.next_position, h["session"].question_ids(q.question), answer_ids(q.answer))

def loss_on(keys, vals, nextpos, q, a):
    ids = torch.cat([q, a]); n = ids.numel()
    emb = model.get_input_embeddings()(ids)
    def attend(layer, qq, k, v):
        return attention(qq, torch.cat([keys[layer], k], 1), torch.cat([vals[layer], v], 1), causal=True)
    hidden = runner.forward(emb, torch.arange(n) + nextpos, attend)
    logits = model.get_output_embeddings()(runner.llm.norm(hidden[q.numel() - 1 : n - 1]))
    return F.cross_entropy(logits.float(), a)

# -- short batches: stage 3's data, full gradient ------------------------------------------------------------
cfg = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "stage3.yaml"))
samples = load_samples(cfg.data, 0)
store = FeatureStore(cfg.feature_cache, frozen_fingerprint(model))
dataset = SupervisedDataset(samples, tok, model.config, cfg.data, feature_store=store)
collate = Collator(tok.pad_token_id)
def short_loss():
    items = [dataset[int(i)] for i in rng.integers(len(dataset), size=SB)]
    batch = collate(items)
    keys = batch.pop("feature_keys", None)
    if keys is not None:
        feats = []
        for k, f, px in zip(keys, batch.pop("visual_features"), batch.pop("pixel_values")):
            if f is None:
                with torch.no_grad(): f = model.visual_features(px)
                store.put(k, f)
            feats.append(f)
        batch["visual_features"] = feats
    return model(**batch).loss

for p in model.parameters(): p.requires_grad_(False)
params = list(model.language_model.parameters()) + list(model.projector.parameters())
for p in params: p.requires_grad_(True)
print("trainable", sum(p.numel() for p in params), f"pool done {time.time()-t0:.0f}s", flush=True)
opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * min(s, STEPS) / STEPS)))
hist = {"long": [], "short": []}; t1 = time.time()
for step in range(STEPS):
    opt.zero_grad()
    for _ in range(ACC):
        loss = long_sample(); hist["long"].append(float(loss.detach()))
        (WLONG * loss / ACC).backward()
    if SB:
        loss = short_loss(); hist["short"].append(float(loss.detach())); loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); sched.step()
    if step % 10 == 0 or step == STEPS - 1:
        print(f"step {step} long {np.mean(hist['long'][-80:]):.3f} short {np.mean(hist['short'][-10:] or [0]):.3f} {time.time()-t1:.0f}s", flush=True)
os.makedirs(OUT, exist_ok=True)
for f in ("config.json", "tokenizer.json", "tokenizer_config.json"): shutil.copyfile(f"{src}/{f}", f"{OUT}/{f}")
with safe_open(f"{src}/model.safetensors", "pt") as hnd: names = list(hnd.keys())
sd = model.state_dict(); save_file({k: sd[k].detach().contiguous().clone() for k in names}, f"{OUT}/model.safetensors")
print("saved", OUT, f"pool {t1-t0:.0f}s train {time.time()-t1:.0f}s"); shutil.rmtree(tmpdir, ignore_errors=True)

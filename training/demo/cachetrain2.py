# Issue 26 attempt (removed in the next commit; row in the model card). Usage: [SRC=bundle] NPOOL=100 LENS=256,512,1024,2048,4096 STEPS=600 LR=4e-4 python cachetrain2.py OUT
"""Experiment (issue 26): fine-tune the demo model's question reading on caches bi-level decoding assembles.
Caches are composed (no grad) from units of pre-filled short videos; only question+answer tokens get grads."""
import json, math, os, shutil, sys, tempfile, time
import numpy as np, torch, torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from videoxl2 import load_model, load_tokenizer
from videoxl2.defaults import DEFAULT_MODEL
from videoxl2.engine.session import VideoSession
from videoxl2.engine.settings import EngineSettings
from videoxl2.engine.runner import LayerRunner, attention
from videoxl2.data.synthetic import (COLOURS, SHAPES, Needle, needle_haystack_spec, random_spec, questions,
                                     choice_question, write_video)
from videoxl2.video import read_video

OUT = sys.argv[1]
STEPS = int(os.environ.get("STEPS", "150")); ACC = int(os.environ.get("ACC", "8")); LR = float(os.environ.get("LR", "2e-4"))
NPOOL = int(os.environ.get("NPOOL", "150")); SPOOL = int(os.environ.get("SPOOL", "150")); LONG = float(os.environ.get("LONG", "0.6"))
REROT = float(os.environ.get("REROT", "0.5"))
torch.manual_seed(0); rng = np.random.default_rng(2026)
torch.set_num_threads(2)
src = os.environ.get("SRC", DEFAULT_MODEL)
model = load_model(src); tok = load_tokenizer(src)
engine = EngineSettings.from_config(model.config, mode="bilevel")
runner = LayerRunner(model)
L = runner.num_layers
tmp = Path = None
tmpdir = tempfile.mkdtemp(prefix="cachetrain-")
t0 = time.time()

def prefill(spec, name):
    path = write_video(spec, f"{tmpdir}/{name}.mp4")
    plan, batches = read_video(path, max_num_frames=spec.num_frames, sample_fps=1.0)
    frames = np.concatenate(list(batches))
    s = VideoSession.from_frames(model, tok, frames, plan.timestamps, settings=engine, progress=False)
    with torch.inference_mode():
        mem = s.prefill(); mem.build_sparse(s.runner)
    return s, mem

def units_of(mem, spec):
    lay = mem.layout; out = []
    needle_groups = {n.start_frame // 4: n for n in spec.needles}
    spos = mem.sparse_positions
    for u in range(mem.num_units):
        first, last = mem.unit_groups(u)
        a, b = lay.groups[first].time_start, lay.groups[last].end
        sa, sb = mem.sparse_offsets[first], mem.sparse_offsets[last + 1]
        needles = [needle_groups[g] for g in range(first, last + 1) if g in needle_groups]
        out.append(dict(K=[mem.keys[l][:, a:b].clone() for l in range(L)], V=[mem.values[l][:, a:b].clone() for l in range(L)],
                        SK=[mem.sparse_keys[l][:, sa:sb].clone() for l in range(L)], SV=[mem.sparse_values[l][:, sa:sb].clone() for l in range(L)],
                        start=a, srel=(spos[sa:sb] - a).clone(), needles=needles))
    return out

needle_units, distractors, shorts, longs = [], [], [], []
prefix = None
LENS = [int(x) for x in os.environ.get("LENS", "256,512,1024,2048").split(",")]
for i in range(NPOOL):
    n = int(rng.choice(LENS))
    spec = random_spec(rng, n, max_needles=3)
    spec = type(spec)(spec.num_frames, spec.fps, 7_000_000 + i, spec.needles)
    s, mem = prefill(spec, f"n{i}")
    qs = questions(spec, rng)
    needle_units_of = {}
    for u in range(mem.num_units):
        first, last = mem.unit_groups(u)
        for nd in spec.needles:
            if first <= nd.start_frame // 4 <= last:
                needle_units_of.setdefault(nd.name, []).append(u)
    longs.append(dict(mem=mem, spec=spec, qs=[(s.question_ids(q.question), q.answer, q.family) for q in qs], nu=needle_units_of))
    os.remove(f"{tmpdir}/n{i}.mp4")
for i in range(SPOOL):
    n = int(rng.integers(2, 25)) * 4
    spec = random_spec(rng, n)
    s, mem = prefill(spec, f"s{i}")
    qs = questions(spec, rng)
    shorts.append(dict(units=units_of(mem, spec), qs=[(s.question_ids(q.question), q.answer) for q in qs]))
    if prefix is None:
        vs = mem.layout.video_start; prefix = ([mem.keys[l][:, :vs].clone() for l in range(L)], [mem.values[l][:, :vs].clone() for l in range(L)], vs)
print(f"pool: {len(longs)} long haystacks, {len(shorts)} short videos, {time.time()-t0:.0f}s", flush=True)
closing = tok("<|im_end|>\n", add_special_tokens=False)["input_ids"]
def answer_ids(text):
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"] + closing)

@torch.no_grad()
def compose(slots, rerotate):
    pk, pv, vs = prefix
    keys = [[pk[l]] for l in range(L)]; vals = [[pv[l]] for l in range(L)]
    turns = [torch.zeros(vs, dtype=torch.float64)]
    cursor, pos = vs, vs
    for u, dense in slots:
        nd = u["K"][0].shape[1]
        if dense:
            for l in range(L): keys[l].append(u["K"][l]); vals[l].append(u["V"][l])
            turns.append(torch.full((nd,), float((cursor if rerotate else pos) - u["start"]), dtype=torch.float64)); cursor += nd
        else:
            ns = u["SK"][0].shape[1]
            for l in range(L): keys[l].append(u["SK"][l]); vals[l].append(u["SV"][l])
            turns.append(torch.arange(cursor, cursor + ns, dtype=torch.float64) if rerotate else pos + u["srel"]); cursor += ns
        pos += nd
    keys = [torch.cat(k, 1) for k in keys]; vals = [torch.cat(v, 1) for v in vals]
    runner.rotate_(keys, torch.cat(turns))
    return keys, vals, (cursor if rerotate else pos)

def loss_on(keys, vals, nextpos, q, a):
    ids = torch.cat([q, a]); n = ids.numel()
    emb = model.get_input_embeddings()(ids)
    def attend(layer, qq, k, v):
        return attention(qq, torch.cat([keys[layer], k], 1), torch.cat([vals[layer], v], 1), causal=True)
    hidden = runner.forward(emb, torch.arange(n) + nextpos, attend)
    logits = model.get_output_embeddings()(runner.llm.norm(hidden[q.numel() - 1 : n - 1]))
    return F.cross_entropy(logits.float(), a)

WHAT = float(os.environ.get("WHAT", "0.6"))
def long_sample():
    h = longs[int(rng.integers(len(longs)))]
    mem = h["mem"]
    what = [q for q in h["qs"] if q[2] == "what"]
    q, ans, fam = what[0] if rng.random() < WHAT else h["qs"][int(rng.integers(len(h["qs"])))]
    n = mem.num_units
    dense = {0, n - 1}
    if fam in ("what", "choice", "when"):
        dense |= set(h["nu"].get(h["spec"].needles[0].name, []))
    else:
        for us in h["nu"].values(): dense |= set(us[:1])
    extra = [i for i in range(n) if i not in dense]; rng.shuffle(extra)
    dense |= set(extra[: max(0, 6 - len(dense))])
    return mem, sorted(dense), q, answer_ids(ans)

def short_sample():
    v = shorts[int(rng.integers(len(shorts)))]
    q, a = v["qs"][int(rng.integers(len(v["qs"])))]
    n = len(v["units"])
    if rng.random() < 0.5 or n <= 6:
        dense = set(range(n))
    else:
        dense = {0, n - 1} | {i for i, u in enumerate(v["units"]) if u["needles"]}
        extra = [i for i in range(n) if i not in dense]; rng.shuffle(extra)
        dense |= set(extra[: max(0, 6 - len(dense))])
    return [(u, i in dense) for i, u in enumerate(v["units"])], q, answer_ids(a)

params = [p for p in model.llm.parameters() if p.requires_grad]
for p in model.parameters(): p.requires_grad_(False)
for p in model.llm.parameters(): p.requires_grad_(True)
params = list(model.llm.parameters())
opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * min(s, STEPS) / STEPS)))
model.train(False)
hist = []; kinds = {"long": [], "short": []}
for step in range(STEPS):
    opt.zero_grad(); tot = 0.0
    for _ in range(ACC):
        kind = "long" if rng.random() < LONG else "short"
        rr = rng.random() < REROT
        if kind == "long":
            mem, dense, q, a = long_sample()
            with torch.no_grad():
                cache = mem.assemble(runner, dense, rerotate=rr)
            keys = [k[:, : cache.length] for k in cache.keys]; vals = [v[:, : cache.length] for v in cache.values]; nextpos = cache.next_position
        else:
            slots, q, a = short_sample()
            keys, vals, nextpos = compose(slots, rr)
        loss = loss_on(keys, vals, nextpos, q, a)
        kinds[kind].append(float(loss.detach()))
        (loss / ACC).backward(); tot += float(loss.detach()) / ACC
    torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); sched.step(); hist.append(tot)
    if step % 10 == 0 or step == STEPS - 1:
        print(f"step {step} loss {np.mean(hist[-10:]):.3f} long {np.mean(kinds['long'][-40:]):.3f} short {np.mean(kinds['short'][-40:]):.3f} {time.time()-t0:.0f}s", flush=True)
os.makedirs(OUT, exist_ok=True)
for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
    shutil.copyfile(f"{src}/{f}", f"{OUT}/{f}")
with safe_open(f"{src}/model.safetensors", "pt") as h:
    names = list(h.keys())
sd = model.state_dict()
save_file({k: sd[k].detach().contiguous().clone() for k in names}, f"{OUT}/model.safetensors")
print("saved", OUT, f"{time.time()-t0:.0f}s total")
shutil.rmtree(tmpdir, ignore_errors=True)

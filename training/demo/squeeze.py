# Issue 26 attempt (removed in the next commit; row in the model card). Usage: SCALE=0.1 [DROP=1] [LOGN=640] python squeeze.py niah ...
"""Experiment (issue 26): rerotated bi-level cache with sparse units' positions squeezed by SCALE."""
import math, os, sys, torch
from videoxl2.engine import memory as M
from videoxl2.engine.runner import upload
from videoxl2.engine.prefill import empty_kv
SCALE = float(os.environ.get("SCALE", "1"))
orig = M.VideoMemory.assemble
def assemble(self, runner, dense_units=None, rerotate=True, device=None, reserve=0):
    if not rerotate or SCALE == 1:
        return orig(self, runner, dense_units, rerotate, device, reserve)
    self.check_model(runner)
    layout = self.layout
    device = torch.device(device) if device is not None else runner.device
    dense = self._check_units(dense_units)
    if len(dense) < self.num_units:
        self.build_sparse(runner)
    dense_src = [torch.arange(0, layout.video_start)]; dense_dst = [torch.arange(0, layout.video_start)]
    dense_pos = [torch.arange(0, layout.video_start, dtype=torch.float64)]
    sparse_src, sparse_dst, sparse_pos, slices = [], [], [], []
    cursor, pos = layout.video_start, float(layout.video_start)
    for u in range(self.num_units):
        first, last = self.unit_groups(u)
        if u in dense:
            start, end = layout.groups[first].time_start, layout.groups[last].end
            dense_src.append(torch.arange(start, end)); dense_dst.append(torch.arange(cursor, cursor + end - start))
            dense_pos.append(pos + torch.arange(end - start, dtype=torch.float64)); pos += end - start
        elif os.environ.get("DROP"):
            slices.append((cursor, cursor)); continue
        else:
            start, end = self.sparse_offsets[first], self.sparse_offsets[last + 1]
            sparse_src.append(torch.arange(start, end)); sparse_dst.append(torch.arange(cursor, cursor + end - start))
            sparse_pos.append(pos + SCALE * torch.arange(end - start, dtype=torch.float64)); pos += SCALE * (end - start)
        slices.append((cursor, cursor + end - start)); cursor += end - start
    dense_src, dense_dst, dense_pos = torch.cat(dense_src), torch.cat(dense_dst), torch.cat(dense_pos)
    if not sparse_src:
        sparse_src=[torch.zeros(0,dtype=torch.long)]; sparse_dst=[torch.zeros(0,dtype=torch.long)]; sparse_pos=[torch.zeros(0,dtype=torch.float64)]
    sparse_src = torch.cat(sparse_src); sparse_dst = torch.cat(sparse_dst); sparse_pos = torch.cat(sparse_pos)
    dense_turn = dense_pos - dense_src.double()
    sparse_turn = sparse_pos
    next_position = int(math.ceil(pos))
    keys, values = [], []
    for layer in range(len(self.keys)):
        shape = (self.keys[layer].shape[0], cursor + reserve, self.keys[layer].shape[2])
        k = empty_kv(shape, self.dtype, device, False); v = empty_kv(shape, self.dtype, device, False)
        k.index_copy_(1, dense_dst, self.keys[layer].index_select(1, dense_src))
        v.index_copy_(1, dense_dst, self.values[layer].index_select(1, dense_src))
        k.index_copy_(1, sparse_dst, self.sparse_keys[layer].index_select(1, sparse_src))
        v.index_copy_(1, sparse_dst, self.sparse_values[layer].index_select(1, sparse_src))
        keys.append(k); values.append(v)
    turns = torch.empty(cursor, dtype=torch.float64)
    turns[dense_dst], turns[sparse_dst] = dense_turn, sparse_turn
    runner.rotate_(keys, turns)
    return M.MixedCache(keys, values, cursor, next_position, slices, sorted(dense))
M.VideoMemory.assemble = assemble
LOGN = float(os.environ.get("LOGN", "0"))
if LOGN:
    from videoxl2.engine import decode as D
    base_attention = D.attention
    def logn_attention(q, k, v, causal=False):
        m = k.shape[1]
        f = max(1.0, math.log(m) / math.log(LOGN))
        return base_attention(q * f, k, v, causal)
    D.attention = logn_attention
from videoxl2.cli import main
sys.exit(main(sys.argv[1:]))

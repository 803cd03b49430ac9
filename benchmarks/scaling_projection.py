"""The arithmetic behind docs/scaling.md: memory of a streamed run and single-thread CPU hours,
projected from the SmolLM2 per-block seconds measured in docs/results.md (1 thread, 32 x 512).

    python benchmarks/scaling_projection.py
"""

models = {
 "SmolLM2-135M": dict(h=576, kv=192, i=1536, L=30, vocab=49152),
 "Llama-3-8B": dict(h=4096, kv=1024, i=14336, L=32, vocab=128256),
 "Llama-3-70B": dict(h=8192, kv=1024, i=28672, L=80, vocab=128256),
}
def mats(m):
    h, kv, i = m["h"], m["kv"], m["i"]
    return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]  # (out, in)
def hess_cost(m):  # SparseGPT-like: in^3 + out*in^2 per matrix (dominant terms)
    return sum(o * n * n + n ** 3 for o, n in mats(m))
def svd_cost(m):
    return sum(o * n * min(o, n) for o, n in mats(m))
base = models["SmolLM2-135M"]
measured = {  # seconds for 30 blocks incl. calibration, results.md
 "wanda": (290.3, "hess"), "sparsegpt": (395.4, "hess"), "oats (20 it)": (1003.6, "svd"),
 "hassle_free (20 it)": (816.4, "hess"), "threebasil (<=100 it)": (1971.1, "hess"),
}
for name, m in models.items():
    params = sum(o * n for o, n in mats(m))
    block_bytes = params * 2  # bf16 dense block
    H_bytes = (m["h"] ** 2 * 3 + m["i"] ** 2) * 4  # q/k/v share one input, o, gate/up share, down
    act = 128 * 2048 * m["h"] * 4 * 3
    nonblock = m["vocab"] * m["h"] * 2 * 2
    print(f"{name}: block {block_bytes/2**30:.2f} GiB bf16, H {H_bytes/2**30:.2f} GiB, activations(128x2048) {act/2**30:.1f} GiB, non-block {nonblock/2**30:.2f} GiB")
    for meth, (sec, kind) in measured.items():
        per_block = sec / base["L"]
        scale = (hess_cost(m) / hess_cost(base)) if kind == "hess" else (svd_cost(m) / svd_cost(base))
        cpu_hours = per_block * scale * m["L"] / 3600
        print(f"   {meth:24s} CPU-1-thread {cpu_hours:10.1f} h")

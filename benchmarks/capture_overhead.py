"""What does every-step recording cost? The same training loop with and without a Recorder.

For every (model, input size, batch) the script runs rounds of phases in one process: one bare
phase and one recorded phase per tier (``--tiers``), each ``--steps`` optimizer steps from the
same weights and optimizer state after a warm-up. The order of the phases rotates from round
to round (bare, lossless, rounded:7 / lossless, rounded:7, bare / ...), so drift of the machine
hits every phase alike; each tier's ratio is taken against the bare phase of the same round.
A recorded phase's time includes draining the writer's queue (``rec.flush()``), not the one-off
close (trim + consolidate). Between phases the page cache is flushed (``os.sync``, untimed) so
one phase's disk writeback does not land in the next one's timing; a phase is short, so the
kernel's own background writeback (after 30 s, or past 10% of memory dirty) rarely starts
inside it: long runs pay that extra on top.

Usage (the README quotes these)::

    .venv/bin/python benchmarks/capture_overhead.py --quick              # checks the script, ~15 s
    .venv/bin/python benchmarks/capture_overhead.py                      # CNN ~1M params, 8x8 and 32x32
    .venv/bin/python benchmarks/capture_overhead.py --tiers lossless rounded:7 sketch:4096
    .venv/bin/python benchmarks/capture_overhead.py --model resnet18 --steps 10 --repeats 3
    .venv/bin/python benchmarks/capture_overhead.py --writer-threads 4 --device cuda   # GPU host

``--model mlp`` is the fast step of a GPU-scale loop on this CPU: an MLP 784-1024-256-10
(1.07M parameters), batch 256, plain SGD, on MNIST-like 28x28 images (scikit-learn's 8x8
digits scaled to 20x20 and framed by a zero border as MNIST is, so that gradients hold the
exact zeros of real ones); ``--model cnn`` is a 4-block CNN of ~0.9-1.0M parameters;
``--model resnet18`` is torchvision's ResNet-18 (11.2M parameters, 10 classes) on 32x32
inputs, the ~10M-parameter case.

Besides the ratio, every row gives the cost per parameter-step (one parameter's gradient and
weight, one step) of the training thread inside ``record()``, of the helper thread that copies
the weights ahead during the next forward/backward (CPU only) and of the writer thread's CPU
(``time.thread_time``), beside floors measured in the same run on the same gradients: one
memcpy of the weights (the training thread's floor: it must copy the weights before the
update), one read of gradient and weights (the per-tensor float64 scalars), the tier's codec
(the writer's own encoders, rounding and sketch kernels included) and the page-cache write
of its bytes into fresh files.
``--page-cache keep drop`` records every tier both ways (``Recorder(page_cache=...)``; rows
``TIER/keep`` and ``TIER/drop``; ``auto``, the default, gives plain ``TIER`` rows); the write
floors are the page cache's (kept pages) in every case.
``--writer-threads N`` is passed to ``Recorder(writer_threads=N)``; ``--threads N`` sets the
training's torch threads (on a CPU host the writer thread competes with them for cores).

Prints two markdown tables. One row per (model, input size, batch, tier): bare and recorded
ms per step (medians over rounds), their ratio (median and range of the per-round ratios),
the writer's ms per row, the time the training thread spent in ``record()`` and blocked on a
busy writer (both per step), and stored MB per step. Then the same rows in ns per
parameter-step: training thread (target <= 0.6) beside its memcpy floor, writer CPU beside
read + codec + write floors.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from capture import Recorder  # noqa: E402

# printed once per store by rec.close() (consolidation): noise in a benchmark's output
warnings.filterwarnings("ignore", message="Consolidated metadata")


def small_cnn(hw: int, widths=(32, 64, 128, 256), n_classes: int = 10) -> nn.Sequential:
    """Four 3x3 conv blocks (pooling after blocks 2-4) and a 2-layer head: ~0.9-1.0M params."""
    layers: list[nn.Module] = []
    cin, size = 3, hw
    for i, cout in enumerate(widths):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]
        if i > 0 and size >= 2:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        cin = cout
    layers += [nn.Flatten(), nn.Linear(cin * size * size, 128), nn.ReLU(), nn.Linear(128, n_classes)]
    return nn.Sequential(*layers)


class TinyLM(nn.Module):
    """A decoder-only transformer language model from ``torch.nn`` parts (no downloads):
    ``layers`` pre-norm blocks of width ``width``, a causal mask, untied embedding and head.
    The defaults (12 x 1024, vocabulary 16384) have 185M parameters. ``forward`` returns the
    logits flattened to (batch * seq, vocab), so ``CrossEntropyLoss`` takes flattened targets."""

    def __init__(self, vocab: int = 16384, width: int = 1024, layers: int = 12, heads: int = 16, seq: int = 256):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(seq, width))
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, tokens):
        s = tokens.shape[1]
        h = self.embed(tokens) + self.pos[:s]
        h = self.blocks(h, mask=self.mask[:s, :s], is_causal=True)
        return self.head(self.norm(h)).flatten(0, 1)


def build(name: str, hw: int) -> nn.Module:
    if name == "transformer":
        return TinyLM()
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 256), nn.ReLU(),
                             nn.Linear(256, 10))
    if name == "cnn":
        # widths chosen so that both input sizes give ~1M parameters
        return small_cnn(hw, (32, 64, 128, 256) if hw >= 32 else (64, 128, 256, 256))
    if name == "resnet18":
        import torchvision

        return torchvision.models.resnet18(num_classes=10)
    raise SystemExit(f"unknown model {name!r}: use cnn or resnet18")


def mnist_like(batch: int, n_batches: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of 28x28 digit images: scikit-learn's 8x8 digits scaled to 20x20, zero border."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # a GPU host without scikit-learn: smooth random blobs in the same frame
        print("mnist_like: scikit-learn is missing; random 8x8 images stand in for the digits", file=sys.stderr)
        gen = torch.Generator().manual_seed(1)
        X, y = torch.rand(1797, 64, generator=gen).numpy(), torch.randint(0, 10, (1797,), generator=gen).numpy()
    else:
        X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    X = nn.functional.pad(nn.functional.interpolate(X, size=(20, 20), mode="bilinear"), (4, 4, 4, 4))
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n_batches):
        i = torch.randint(0, len(X), (batch,), generator=g)
        out.append((X[i].to(device), y[i].to(device)))
    return out


FLOOR_REPEATS = 7


def _median_s(f, n: int | None = None) -> float:
    n = FLOOR_REPEATS if n is None else n
    f()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def floors(model, tiers: list[str], root: Path, steps: int = 1) -> dict:
    """ns per parameter-step of the floors, on the model's current gradient and weights.

    ``memcpy``: one copy of the weights (float32, d entries). ``read``: the per-tensor float64
    scalars of gradient and weights (one sweep over both). Per tier: ``codec`` (the writer's
    encoders on both rows, with its rounding or sketch kernels), ``write`` (its encoded
    bytes appended to an open file, page cache, median of a few rows) and ``write_phase``
    (the same bytes ``steps`` times into one new file, once: as many new page-cache pages as
    a recorded phase takes; on a VM whose host hands out memory lazily a new page can cost
    several times a recycled one, and long phases meet that cost).
    """
    import numpy as np

    from capture import kernels
    from capture.recorder import model_table
    from capture.writer import StoreWriter, _scratch, scalar_tasks

    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.cat([p.grad.detach().reshape(-1).float().cpu() for p in params]).numpy()
    w = torch.cat([p.detach().reshape(-1).float().cpu() for p in params]).numpy()
    d = g.size
    table = model_table(model)
    out = {}
    buf = np.empty_like(w)
    out["memcpy"] = _median_s(lambda: np.copyto(buf, w)) / d * 1e9
    n_t = len(table)
    gg, ww, gw = np.zeros(n_t), np.zeros(n_t), np.zeros(n_t)

    def read():
        for task in scalar_tasks(table, g, w, gg, ww, gw):
            task()

    out["read"] = _median_s(read) / d * 1e9
    for tier in tiers:
        path = root / f"floor-{tier.replace(':', '-')}.zarr"
        sw = StoreWriter(path, table, {"grad": tier, "weight": tier}, mode="overwrite", expected_steps=1)
        encoded: list[bytes] = []

        def codec():
            encoded.clear()
            sk_w = sw._sketchers.get("weight")
            both = sk_w.both(g, w) if sk_w is not None and sk_w.twin is not None else None
            for col, (name, vec) in enumerate((("grad", g), ("weight", w))):
                t = sw.tiers[name]
                if t.is_sketch:
                    sk = sw._sketchers[name]  # the writer's own compiled sketch and bit buffers
                    row = sk(vec) if both is None else both[:, col]  # both rows in one sweep
                    parts = {f"{name}_sketch": row.astype(np.float32)}
                    sb, nz = sk.bits
                    kernels.pack_signs_into(vec, sb, nz)
                    parts[f"{name}_signbits"], parts[f"{name}_nonzero"] = sb, nz
                else:
                    parts = {name: vec}
                for arr, row in parts.items():
                    aw = sw._w[arr]
                    cw = aw.chunks[1]
                    for j in range(aw.n_col_chunks):
                        piece = row[j * cw:(j + 1) * cw]
                        if piece.shape[0] < cw:
                            piece = np.concatenate([piece, np.full(cw - piece.shape[0], aw.fill)])
                        if aw.frames:  # the rounded tier's frames: rounding, shuffle and frame in one pass
                            encoded.append(b"".join(aw._frame_parts(piece, t.keepbits)))  # one copy, as for c-blosc's bytes
                            continue
                        if t.rounds:
                            piece = kernels.bitround_into(piece, int(t.keepbits), _scratch(piece.shape[0]))
                        encoded.append(aw.encode(piece))

        out[f"codec {tier}"] = _median_s(codec) / d * 1e9
        sw.abort()
        shutil.rmtree(path)
        files = root / "floor-files"
        files.mkdir(exist_ok=True)
        # the writer appends a row's chunks to open shard files (a new file every few rows):
        # the floor is appending the encoded bytes to an open file
        fd = os.open(files / "append", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

        def write():
            for b in encoded:
                os.write(fd, b)

        os.sync()
        out[f"write {tier}"] = _median_s(write) / d * 1e9
        os.close(fd)
        fd = os.open(files / "phase", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        t0 = time.perf_counter()
        for _ in range(steps):
            write()
        out[f"write_phase {tier}"] = (time.perf_counter() - t0) / steps / d * 1e9
        os.close(fd)
        shutil.rmtree(files)
        os.sync()
    return out


def store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_phase(model, opt, batches, steps: int, start: int, rec: Recorder | None, device) -> float:
    """Seconds for ``steps`` training steps (and, when recording, for draining the queue)."""
    loss_fn = nn.CrossEntropyLoss()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        x, y = batches[i % len(batches)]
        loss = loss_fn(model(x), y)
        loss.backward()
        if rec is not None:
            rec.record(start + i, loss=loss)
        opt.step()
        opt.zero_grad()
    if rec is not None:
        rec.flush()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def phase_order(phases: list[str], r: int) -> list[str]:
    """The phases of repeat ``r``: rotated by r, so each phase takes every position in turn."""
    k = r % len(phases)
    return phases[k:] + phases[:k]


def _spin(stop) -> None:
    x = 0
    while not stop.is_set():
        x += 1


def busy_core_ratio(model, opt, batches, steps: int, start: int, device, rounds: int = 2) -> float:
    """The bare step with a CPU-bound process spinning on another core, over the bare step alone
    (median of ``rounds`` interleaved pairs). It measures the machine, not gradtrace: the cost to
    the training of *any* work beside it (cores that share a physical core, a VM's CPU quota,
    memory bandwidth). The writer's duty cycle times (this - 1) is what it costs at least."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    ratios = []
    for _ in range(rounds):
        alone = run_phase(model, opt, batches, steps, start, None, device)
        stop = ctx.Event()
        proc = ctx.Process(target=_spin, args=(stop,), daemon=True)
        proc.start()
        time.sleep(0.2)
        try:
            busy = run_phase(model, opt, batches, steps, start, None, device)
        finally:
            stop.set()
            proc.join()
        ratios.append(busy / alone)
    return statistics.median(ratios)


def bench(name: str, hw: int, batch: int, steps: int, repeats: int, tiers: list[str], device, root: Path,
          param_chunk: int | None = None, writer_threads: int = 1, lag_band: int = 0) -> list[dict]:
    """One row per tier; every repeat runs one bare phase and one recorded phase per tier."""
    torch.manual_seed(0)
    model = build(name, hw).to(device)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if name == "mlp":
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        batches = mnist_like(batch, 4, device)
    elif name == "transformer":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(0)
        batches = []
        for _ in range(4):
            tok = torch.randint(0, 16384, (batch, 257), generator=g)
            batches.append((tok[:, :-1].to(device), tok[:, 1:].reshape(-1).to(device)))
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        batches = [
            (torch.randn(batch, 3, hw, hw, device=device), torch.randint(0, 10, (batch,), device=device))
            for _ in range(4)
        ]
    run_phase(model, opt, batches, 5, 0, None, device)  # warm-up
    x, y = batches[0]
    nn.CrossEntropyLoss()(model(x), y).backward()
    floor = floors(model, sorted({t.split("/")[0] for t in tiers}), root, steps)
    opt.zero_grad()
    # every phase starts from the same weights and optimizer state, so bare and recorded
    # phases run the very same arithmetic (denormals, NaNs and all)
    init_model = copy.deepcopy(model.state_dict())
    init_opt = copy.deepcopy(opt.state_dict())
    bare: list[float] = []
    m = {t: {k: [] for k in ("rec", "ratio", "writer", "record", "wait", "mb", "writer_cpu", "readahead_cpu")} for t in tiers}
    step = 10
    for r in range(repeats):
        times = {}
        for phase in phase_order(["bare", *tiers], r):
            os.sync()
            model.load_state_dict(init_model)
            opt.load_state_dict(init_opt)
            if phase == "bare":
                times[phase] = run_phase(model, opt, batches, steps, step, None, device)
            else:
                path = root / f"{name}-{hw}-{batch}-{phase.replace(':', '-').replace('/', '-')}-{r}.zarr"
                kw = {"param_chunk": param_chunk} if param_chunk else {}
                tier, _, page_cache = phase.partition("/")  # "lossless/drop": Recorder(page_cache="drop")
                rec = Recorder(model, path, opt, tiers=tier, overwrite=True, expected_steps=steps,
                               writer_threads=writer_threads, lag_band=lag_band, page_cache=page_cache or "auto",
                               **kw)
                times[phase] = run_phase(model, opt, batches, steps, step, rec, device)
                s = rec.summary()
                rec.close()
                mt = m[phase]
                mt["writer"].append(s["writer_seconds"] / steps * 1e3)
                mt["writer_cpu"].append(s["writer_cpu_seconds"] / steps * 1e3)
                mt["readahead_cpu"].append(s["readahead_cpu_seconds"] / steps * 1e3)
                mt["record"].append(s["record_seconds"] / steps * 1e3)
                mt["wait"].append(s["wait_seconds"] / steps * 1e3)
                mt["mb"].append(store_bytes(path) / (steps + 1) / 1e6)
                shutil.rmtree(path)
            print(f"  {name} round {r + 1}/{repeats} {phase}: {times[phase] / steps * 1e3:.2f} ms/step",
                  file=sys.stderr, flush=True)  # a run cut short still tells its phases
            step += steps
        bare.append(times["bare"] / steps * 1e3)
        for t in tiers:
            m[t]["rec"].append(times[t] / steps * 1e3)
            m[t]["ratio"].append(times[t] / times["bare"])
    beside = busy_core_ratio(model, opt, batches, steps, step, device) if device.type == "cpu" else None
    med = statistics.median
    return [
        {
            "beside": beside,
            "model": {"mlp": "MLP 784-1024-256-10", "transformer": f"transformer LM, seq {hw}"}.get(name, f"{name} {hw}x{hw}"),
            "params": n_params,
            "batch": batch,
            "tier": t,
            "bare": med(bare),
            "rec": med(m[t]["rec"]),
            "ratio": med(m[t]["ratio"]),
            "ratio_min": min(m[t]["ratio"]),
            "ratio_max": max(m[t]["ratio"]),
            "writer": med(m[t]["writer"]),
            "record": med(m[t]["record"]),
            "wait": med(m[t]["wait"]),
            "mb": med(m[t]["mb"]),
            "writer_cpu": med(m[t]["writer_cpu"]),
            "readahead_cpu": med(m[t]["readahead_cpu"]),
            "floors": floor,
        }
        for t in tiers
    ]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", nargs="+", default=["cnn"], choices=["mlp", "cnn", "resnet18", "transformer"],
                    help="one or more models (default: cnn); mlp is the fast-step case, transformer a 185M "
                         "decoder-only language model (for a GPU host)")
    ap.add_argument("--hw", type=int, nargs="*", default=None, help="input sizes (default: 8 32 for cnn, 32 for resnet18)")
    ap.add_argument("--batch", type=int, nargs="*", default=None, help="batch sizes (default: 256 at 8x8, 64 at 32x32)")
    ap.add_argument("--steps", type=int, default=None, help="steps per phase (default 30; --quick 5)")
    ap.add_argument("--repeats", type=int, default=None, help="rounds of phases (default 5; --quick 2); a multiple of 1 + number of tiers puts every phase in every position equally often")
    ap.add_argument("--tiers", "--tier", nargs="+", default=["lossless"], metavar="TIER",
                    help="tiers to record with, one row each (e.g. lossless rounded:7 sketch:4096); "
                         "--tier is an alias")
    ap.add_argument("--writer-threads", type=int, default=1, help="Recorder(writer_threads=N) (default 1)")
    ap.add_argument("--lag-band", type=int, default=0, help="Recorder(lag_band=L) (default 0)")
    ap.add_argument("--page-cache", nargs="+", default=["auto"], choices=["auto", "keep", "drop"],
                    help="Recorder(page_cache=...) (default auto, the Recorder's); several: every tier "
                         "with each, rows 'TIER' (auto), 'TIER/keep', 'TIER/drop'")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for the training (default: torch's own, = cores); on a "
                         "small CPU host, cores - 1 leaves the writer thread a core")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--floor-repeats", type=int, default=7, help="timings per floor (median; default 7)")
    ap.add_argument("--param-chunk", type=int, default=None, help="chunk width along param (default: the format's)")
    ap.add_argument("--dir", default=None, help="where to write the stores (default: a temp dir)")
    ap.add_argument("--quick", action="store_true",
                    help="a fast small run: 5 steps x 2 repeats, cnn at 8x8 only, batch 64 (checks the script, "
                         "not a figure to quote)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    global FLOOR_REPEATS
    FLOOR_REPEATS = max(1, args.floor_repeats)
    steps = args.steps or (5 if args.quick else 30)
    repeats = args.repeats or (2 if args.quick else 5)
    device = torch.device(args.device)
    root = Path(args.dir or tempfile.mkdtemp(prefix="gradtrace-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for model in args.model:
            default_hw = {"cnn": [8] if args.quick else [8, 32], "mlp": [28], "transformer": [256]}.get(model, [32])
            for hw in args.hw or default_hw:
                default_batch = [{"mlp": 256, "transformer": 8}.get(model, 64 if args.quick or hw > 8 else 256)]
                for batch in args.batch or default_batch:
                    tiers = [t if pc == "auto" else f"{t}/{pc}" for t in args.tiers for pc in args.page_cache]
                    rows += bench(model, hw, batch, steps, repeats, tiers, device, root,
                                  args.param_chunk, args.writer_threads, args.lag_band)
                    print(f"done: {rows[-1]['model']} batch {batch}", file=sys.stderr, flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(
        f"\nevery-step recording, {steps} steps x {repeats} repeats, writer_threads {args.writer_threads}, "
        f"lag_band {args.lag_band}, "
        f"device {device}, torch threads {torch.get_num_threads()}, {os.cpu_count()} cores\n"
    )
    print("| model | params | batch | tier | bare ms/step | recorded ms/step | ratio (min-max) | writer ms/row | record() ms | blocked ms | MB/step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['batch']} | {r['tier']} | {r['bare']:.1f} | {r['rec']:.1f} | "
            f"**{r['ratio']:.3f}** ({r['ratio_min']:.3f}-{r['ratio_max']:.3f}) | {r['writer']:.1f} | "
            f"{r['record']:.2f} | {r['wait']:.2f} | {r['mb']:.3f} |"
        )
    cpu_rows = [r for r in rows if r.get("beside") is not None]
    if cpu_rows:
        print("\nthis machine's core sharing: the bare step with a CPU-bound process on another core, over the bare "
              "step alone; a writer busy for a share u of the step costs the training about 1 + u x (that - 1)\n")
        print("| model | batch | bare step beside a busy core | writer CPU per row / bare step (u) | expected ratio from u |")
        print("|---|---|---|---|---|")
        for r in cpu_rows:
            u = r["writer_cpu"] / r["bare"]
            print(f"| {r['model']} ({r['tier']}) | {r['batch']} | {r['beside']:.2f}x | {u:.2f} | "
                  f"{1 + u * (r['beside'] - 1):.2f}x |")
    print("\nns per parameter-step (gradient + weight of one parameter, one step); floors measured in this run\n")
    print("| model | tier | training thread | read-ahead thread | floor: memcpy | writer CPU | floor: read + codec + write "
          "| read | codec | write | write, a phase's bytes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f, d = r["floors"], r["params"]
        main = r["record"] * 1e6 / d
        ahead = r["readahead_cpu"] * 1e6 / d
        writer = r["writer_cpu"] * 1e6 / d
        tier = r["tier"].split("/")[0]
        codec, write = f[f"codec {tier}"], f[f"write {tier}"]
        phase = f[f"write_phase {tier}"]
        r["ns"] = {"main": main, "readahead": ahead, "writer": writer, "memcpy": f["memcpy"], "read": f["read"],
                   "codec": codec, "write": write, "write_phase": phase}
        print(
            f"| {r['model']} | {r['tier']} | **{main:.2f}** | {ahead:.2f} | {f['memcpy']:.2f} | **{writer:.2f}** | "
            f"{f['read'] + codec + write:.2f} | {f['read']:.2f} | {codec:.2f} | {write:.2f} | {phase:.2f} |"
        )
    return rows


if __name__ == "__main__":
    main()

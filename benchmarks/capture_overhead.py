"""What does every-step recording cost? The same training loop with and without a Recorder.

Phases alternate in one process (bare, recorded, recorded, bare, ...) so that drift of the
machine hits both alike; each phase runs ``--steps`` optimizer steps after a warm-up, and the
recorded phase's time includes draining the writer's queue (``rec.flush()``), not the one-off
close (trim + consolidate). Between phases the page cache is flushed (``os.sync``, untimed) so
one phase's disk writeback does not land in the next one's timing; a phase is short, so the
kernel's own background writeback (after 30 s, or past 10% of memory dirty) rarely starts
inside it: long runs pay that extra on top.

Usage (the README quotes these)::

    .venv/bin/python benchmarks/capture_overhead.py                      # CNN ~1M params, 8x8 and 32x32
    .venv/bin/python benchmarks/capture_overhead.py --model resnet18 --steps 10 --repeats 3
    .venv/bin/python benchmarks/capture_overhead.py --device cuda        # on a GPU machine

Prints a markdown table: bare and recorded ms per step (medians over repeats), their ratio
(median and range of the per-repeat ratios), the writer's ms per row, the time the training
thread spent in ``record()`` and blocked on a busy writer, and stored MB per step.
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
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from capture import Recorder  # noqa: E402


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


def build(name: str, hw: int) -> nn.Module:
    if name == "cnn":
        # widths chosen so that both input sizes give ~1M parameters
        return small_cnn(hw, (32, 64, 128, 256) if hw >= 32 else (64, 128, 256, 256))
    if name == "resnet18":
        import torchvision

        return torchvision.models.resnet18(num_classes=10)
    raise SystemExit(f"unknown model {name!r}: use cnn or resnet18")


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


def bench(name: str, hw: int, batch: int, steps: int, repeats: int, tier: str, device, root: Path,
          param_chunk: int | None = None) -> dict:
    torch.manual_seed(0)
    model = build(name, hw).to(device)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = [
        (torch.randn(batch, 3, hw, hw, device=device), torch.randint(0, 10, (batch,), device=device))
        for _ in range(4)
    ]
    run_phase(model, opt, batches, 5, 0, None, device)  # warm-up
    # every phase starts from the same weights and optimizer state, so bare and recorded
    # phases run the very same arithmetic (denormals, NaNs and all)
    init_model = copy.deepcopy(model.state_dict())
    init_opt = copy.deepcopy(opt.state_dict())
    bare, rec_t, ratios, writer_ms, record_ms, wait_ms, mb = [], [], [], [], [], [], []
    step = 10
    for r in range(repeats):
        order = ("bare", "rec") if r % 2 == 0 else ("rec", "bare")
        times = {}
        for phase in order:
            os.sync()
            model.load_state_dict(init_model)
            opt.load_state_dict(init_opt)
            if phase == "bare":
                times[phase] = run_phase(model, opt, batches, steps, step, None, device)
            else:
                path = root / f"{name}-{hw}-{r}.zarr"
                kw = {"param_chunk": param_chunk} if param_chunk else {}
                rec = Recorder(model, path, opt, tiers=tier, overwrite=True, expected_steps=steps, **kw)
                times[phase] = run_phase(model, opt, batches, steps, step, rec, device)
                s = rec.summary()
                rec.close()
                writer_ms.append(s["writer_seconds"] / steps * 1e3)
                record_ms.append(s["record_seconds"] / steps * 1e3)
                wait_ms.append(s["wait_seconds"] / steps * 1e3)
                mb.append(store_bytes(path) / (steps + 1) / 1e6)
                shutil.rmtree(path)
            step += steps
        bare.append(times["bare"] / steps * 1e3)
        rec_t.append(times["rec"] / steps * 1e3)
        ratios.append(times["rec"] / times["bare"])
    return {
        "model": f"{name} {hw}x{hw}",
        "params": n_params,
        "batch": batch,
        "bare": statistics.median(bare),
        "rec": statistics.median(rec_t),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "writer": statistics.median(writer_ms),
        "record": statistics.median(record_ms),
        "wait": statistics.median(wait_ms),
        "mb": statistics.median(mb),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="cnn", choices=["cnn", "resnet18"])
    ap.add_argument("--hw", type=int, nargs="*", default=None, help="input sizes (default: 8 32 for cnn, 32 for resnet18)")
    ap.add_argument("--batch", type=int, nargs="*", default=None, help="batch sizes (default: 256 at 8x8, 64 at 32x32)")
    ap.add_argument("--steps", type=int, default=30, help="steps per phase")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tier", default="lossless")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--param-chunk", type=int, default=None, help="chunk width along param (default: the format's)")
    ap.add_argument("--dir", default=None, help="where to write the stores (default: a temp dir)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    hws = args.hw or ([8, 32] if args.model == "cnn" else [32])
    root = Path(args.dir or tempfile.mkdtemp(prefix="gradtrace-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for hw in hws:
            for batch in args.batch or [256 if hw <= 8 else 64]:
                rows.append(bench(args.model, hw, batch, args.steps, args.repeats, args.tier, device, root, args.param_chunk))
                print(f"done: {rows[-1]['model']} batch {batch}", file=sys.stderr, flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(
        f"\nevery-step recording, tier {args.tier}, {args.steps} steps x {args.repeats} repeats, "
        f"device {device}, torch threads {torch.get_num_threads()}, {os.cpu_count()} cores\n"
    )
    print("| model | params | batch | bare ms/step | recorded ms/step | ratio (min-max) | writer ms/row | record() ms | blocked ms | MB/step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['batch']} | {r['bare']:.1f} | {r['rec']:.1f} | "
            f"**{r['ratio']:.3f}** ({r['ratio_min']:.3f}-{r['ratio_max']:.3f}) | {r['writer']:.1f} | "
            f"{r['record']:.2f} | {r['wait']:.2f} | {r['mb']:.2f} |"
        )


if __name__ == "__main__":
    main()

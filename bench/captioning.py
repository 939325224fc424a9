"""Captioning benchmark on fmnist-captions: ours against two peers, same data, same CPU budget, one run.

    python bench/captioning.py                 # 10 minutes of training per model (the issue's budget)
    python bench/captioning.py --minutes 3     # a shorter budget (a shared machine)

Rows, each scored by pycocoevalcap (PTB tokenizer, BLEU-4, METEOR, ROUGE-L, CIDEr-D) on the same 1000 test scenes,
over all of them and over the seen (500) and unseen (500: a class-colour pair never in training) combinations:

- ours: `modelworks train captioning --recipe fmnist-captions` with `train.time_budget_s` = the budget (the
  engine scales the schedule to it), tested with beam 3 as `modelworks evaluate` runs it; then exported, and
  beam-5 captioning of one image timed end to end through the ONNX package (PNG bytes -> decode, resize ->
  encode graph -> decode graph per token and beam -> caption), median of 50 test images after one warm-up.
- nearest neighbour: the first reference of the training image closest (cosine) to the test image in our trained
  encoder's feature space (the grid features averaged). It trains nothing itself: it borrows ours.
- Show-and-Tell (Vinyals et al. 2015): the same FastNet trunk pooled to one vector, fed as the LSTM's first input,
  then the caption words; teacher forcing, greedy decoding. Written here (~60 lines), trained for the same
  wall-clock budget on the same batches size and optimiser.

Writes bench/results/captioning.json and prints a table. Run nothing else meanwhile: the budget is wall-clock.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from modelworks.config import load_config, read_recipe  # noqa: E402
from modelworks.models.convnets import fastnet_features  # noqa: E402
from modelworks.tasks.captioning.model import PIXEL_MEAN, PIXEL_STD  # noqa: E402
from modelworks.tasks.captioning.task import IGNORE, CaptioningTask  # noqa: E402
from machine import cpu_name  # bench/machine.py: bench/ is on sys.path when a script runs

THREADS = 2
TIMED_IMAGES = 50


def modelworks(args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(THREADS), "MPLBACKEND": "Agg",
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "modelworks", *args], capture_output=True, text=True, env=env,
                          timeout=timeout_s, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"modelworks {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def load_task(overrides: dict | None = None) -> CaptioningTask:
    raw = read_recipe("captioning", "fmnist-captions")
    raw.update(task="captioning", output_dir=str(RESULTS / "runs"))
    raw.setdefault("train", {}).update(device="cpu")
    for key, value in (overrides or {}).items():
        raw.setdefault(key, {}).update(value)
    return CaptioningTask(load_config(CaptioningTask, raw))


# ---------------------------------------------------------------------------------------------- ours


def our_row(budget_s: float) -> tuple[dict, Path]:
    name = f"bench-ours-{time.strftime('%Y%m%d-%H%M%S')}"
    tic = time.perf_counter()
    modelworks(["train", "captioning", "--recipe", "fmnist-captions", "--name", name, "--set",
                f"train.time_budget_s={budget_s}", "--set", "output_dir=bench/results/runs"], budget_s * 4 + 600)
    wall = time.perf_counter() - tic
    run = RESULTS / "runs" / "captioning" / name
    metrics = {k.removeprefix("test/"): v for k, v in json.loads((run / "evaluation" / "test.json").read_text()).items()}
    row = {"row": "ours (grid encoder + transformer decoder, beam 3)", "train_wall_s": round(wall, 1), **metrics}
    try:  # the quality rows stand without the timing
        modelworks(["export", str(run), "--format", "onnx", "--force"], 900)
        row["beam5_ms_per_image"] = beam5_ms(run / "package")
    except (SystemExit, Exception) as exc:  # noqa: BLE001
        row["export_error"] = str(exc)[-2000:]
    return row, run


def beam5_ms(package: Path) -> float:
    """Median end-to-end milliseconds of one beam-5 caption through the ONNX package, one image per call."""
    from modelworks.inference import open_model

    torch.set_num_threads(THREADS)
    model = open_model(package, "onnx", THREADS)
    files = sorted((ROOT / "data").glob("fmnist-captions-*/images/test/*.png"))[:TIMED_IMAGES]
    request = model.predictor.Request(beam=5)
    times = []
    for path in [files[0], *files]:
        tic = time.perf_counter()
        model.predict([model.predictor.parse(request, path.read_bytes())])
        times.append(1000 * (time.perf_counter() - tic))
    return round(statistics.median(times[1:]), 2)


# ---------------------------------------------------------------------------------------------- peers


def load_trained(task: CaptioningTask, run: Path) -> nn.Module:
    from modelworks.engine.loop import load_for_evaluation

    return load_for_evaluation(task, run, torch.device("cpu"), task.cfg, "best").eval()


@torch.no_grad()
def pooled_features(model, images: torch.Tensor) -> torch.Tensor:
    feats = [F.normalize(model.encode(images[i:i + 500].float() / 255).mean(1), dim=-1)
             for i in range(0, len(images), 500)]
    return torch.cat(feats)


def nearest_neighbour_row(task: CaptioningTask, splits, run: Path) -> dict:
    model = load_trained(task, run)
    tic = time.perf_counter()
    train = pooled_features(model, splits.train.images)
    test = pooled_features(model, splits.test.images)
    nearest = (test @ train.T).argmax(1)
    train_ids = splits.train.ids[nearest].tolist()
    captions = {i: task.captions[j][0] for i, j in zip(splits.test.ids.tolist(), train_ids)}
    scores, _ = task.score(captions, full=True)
    return {"row": "nearest-neighbour retrieval (our encoder's features)", "train_wall_s": 0.0,
            "retrieval_s": round(time.perf_counter() - tic, 1), **scores}


class ShowAndTell(nn.Module):
    """Vinyals et al. 2015: CNN -> image embedding as the LSTM's first input, then the words; greedy decoding."""

    def __init__(self, vocab: int, widths=(32, 64, 128, 192), hidden: int = 256):
        super().__init__()
        self.cnn = fastnet_features(3, widths, "relu", strided_stages=3)
        self.image = nn.Linear(widths[-1], hidden)
        self.embed = nn.Embedding(vocab, hidden)
        self.lstm = nn.LSTM(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def image_input(self, images):
        return self.image(self.cnn((images - PIXEL_MEAN) / PIXEL_STD).mean((2, 3)))[:, None]  # [B, 1, H]

    def forward(self, images, words):  # words [B, T]: the caption (no start token): predicts words then end
        x = torch.cat([self.image_input(images), self.embed(words)], 1)
        return self.head(self.lstm(x)[0])  # [B, T + 1, V]

    @torch.no_grad()
    def greedy(self, images, end: int, max_length: int) -> list[list[int]]:
        out, state = self.lstm(self.image_input(images))
        tokens, done = [], torch.zeros(len(images), dtype=torch.bool)
        for _ in range(max_length):
            token = self.head(out[:, -1]).argmax(-1)
            tokens.append(token)
            done |= token == end
            if done.all():
                break
            out, state = self.lstm(self.embed(token)[:, None], state)
        rows = torch.stack(tokens, 1).tolist()
        return [row[:row.index(end)] if end in row else row for row in rows]


def show_and_tell_row(task: CaptioningTask, splits, budget_s: float) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    cfg = task.cfg
    model = ShowAndTell(task.vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    generator = torch.Generator().manual_seed(0)
    n, batch_size = len(splits.train), cfg.train.batch_size
    tic, steps = time.perf_counter(), 0
    while (elapsed := time.perf_counter() - tic) < budget_s:
        for group in optimizer.param_groups:  # linear decay over the budget, as a schedule fitted to the time
            group["lr"] = cfg.optim.lr * max(0.05, 1 - elapsed / budget_s)
        indices = torch.randint(n, (batch_size,), generator=generator)
        batch = task.prepare_batch(splits.train.get_batch(indices), generator)
        words = batch["inputs"][:, 1:]  # the caption without its start token
        logits = model(batch["images"], words)
        loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE,
                               label_smoothing=cfg.model.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm or 1.0)
        optimizer.step()
        steps += 1
    wall = time.perf_counter() - tic
    model.eval()
    captions = {}
    images = splits.test.images.float() / 255
    for i in range(0, len(images), 250):
        rows = model.greedy(images[i:i + 250], task.tokenizer.eot_id, cfg.model.max_length)
        for image_id, tokens in zip(splits.test.ids[i:i + 250].tolist(), rows):
            captions[image_id] = task.tokenizer.decode(tokens)
    scores, _ = task.score(captions, full=True)
    return {"row": "Show-and-Tell (CNN -> LSTM, greedy)", "train_wall_s": round(wall, 1), "steps": steps,
            "final_loss": round(loss.item(), 3), **scores}


# ---------------------------------------------------------------------------------------------- table


def table(rows: list[dict]) -> str:
    columns = [("BLEU-4", "bleu4"), ("METEOR", "meteor"), ("ROUGE-L", "rouge_l"), ("CIDEr-D", "cider"),
               ("BLEU-4 seen", "bleu4_seen"), ("CIDEr-D seen", "cider_seen"), ("BLEU-4 unseen", "bleu4_unseen"),
               ("CIDEr-D unseen", "cider_unseen")]
    lines = ["| model | train s | " + " | ".join(c for c, _ in columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    for r in rows:
        values = [f"{100 * r[k]:.1f}" if k in r else "-" for _, k in columns]
        lines.append(f"| {r['row']} | {r.get('train_wall_s', 0):.0f} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget per model (default 10)")
    args = parser.parse_args()
    budget_s = 60 * args.minutes
    os.chdir(ROOT)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    ours, run = our_row(budget_s)
    task = load_task()
    task.cfg.name = ""
    splits = task.datasets(torch.device("cpu"))
    nearest = nearest_neighbour_row(task, splits, run)
    show_and_tell = show_and_tell_row(task, splits, budget_s)
    rows = [ours, nearest, show_and_tell]
    targets = {
        "cider_unseen_ratio_vs_show_and_tell": ours["cider_unseen"] / max(show_and_tell["cider_unseen"], 1e-9),
        "cider_unseen_target": 1.3,
        "bleu4_points_over_show_and_tell": 100 * (ours["bleu4"] - show_and_tell["bleu4"]),
        "bleu4_points_target": 10.0,
        "beam5_ms_per_image": ours.get("beam5_ms_per_image"), "beam5_ms_target": 30.0,
    }
    targets["met"] = {"cider_unseen": targets["cider_unseen_ratio_vs_show_and_tell"] >= 1.3,
                      "bleu4": targets["bleu4_points_over_show_and_tell"] >= 10.0,
                      "beam5_latency": ours.get("beam5_ms_per_image", 1e9) <= 30.0}
    record = {"command": f"python bench/captioning.py --minutes {args.minutes:g}", "date": started, "cpu": cpu_name(),
              "threads": THREADS, "budget_s_per_model": budget_s, "rows": rows, "targets": targets,
              "run": str(run.relative_to(ROOT))}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "captioning.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"{record['command']} · {started} · {record['cpu']} · {THREADS} threads · {budget_s:.0f} s per model")
    print(table(rows))
    print(json.dumps(targets, indent=1))


if __name__ == "__main__":
    main()

"""Speedrun records: run `make speedrun` from a fresh clone, once per seed, timed, and keep the result.

    python records/record.py new NAME [--seeds 0,1,2] [-- TRAIN ARGS...]   # writes records/NAME/
    python records/record.py rerun records/NAME [--seeds 0]                 # runs it again, compares

Each seed is a fresh `git clone` of this repository's HEAD into a temporary folder, then
`make speedrun ARGS="--seed S TRAIN ARGS"` there, so the wall time includes the setup a new user
pays (virtual environment, packages, the one-off caption encoding) and nothing carries over from
another run. A record folder holds what it took to get the number: `command.txt`, the resolved
`config.json` (of the first seed), one `seed<S>.log` per seed (all the run printed),
`scores.json` (each seed's shapes score and wall time, their median and spread) and `record.md`
(the date, the machine, the commit and the table). The benchmark is the shapes score's "every
attribute of every object" share of the 150 held-out scenes (`prx.eval.shapes_score`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECORDS = REPO / "records"
sys.path.insert(0, str(REPO))


def run_seed(seed: int, train_args: list[str], log_path: Path) -> dict:
    """`make speedrun` from a fresh clone of HEAD with --seed `seed`; its score and wall time."""
    with tempfile.TemporaryDirectory(prefix="prx-record-") as tmp:
        clone = Path(tmp) / "prx"
        start = time.perf_counter()
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        args = shlex.join(["--seed", str(seed), *train_args])
        with log_path.open("w") as log:
            done = subprocess.run(["make", "speedrun", f"ARGS={args}"], cwd=clone, stdout=log,
                                  stderr=subprocess.STDOUT)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"seed {seed}: make speedrun failed (exit {done.returncode}); see {log_path}")
        run_dir = clone / "runs" / "tiny"
        score = json.loads((run_dir / "shapes_score.json").read_text())
        config = json.loads((run_dir / "config.json").read_text())
    return {"seed": seed, "wall_s": round(wall, 1), "score": score, "config": config}


def summarize(runs: list[dict]) -> dict:
    scenes = [r["score"]["shapes_all_correct"] for r in runs]
    walls = [r["wall_s"] for r in runs]
    return {"median_all_correct": statistics.median(scenes), "min_all_correct": min(scenes),
            "max_all_correct": max(scenes), "median_wall_s": statistics.median(walls), "max_wall_s": max(walls)}


def machine() -> dict:
    import torch

    from bench.common import environment

    return environment(torch.device("cpu"))


def table(runs: list[dict]) -> str:
    rows = ["| seed | every attribute (scenes) | color | shape | position | wall, setup included |",
            "| --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        s = r["score"]
        rows.append(f"| {r['seed']} | {s['shapes_all_correct']:.1%} | {s['shapes_color']:.3f} | "
                    f"{s['shapes_shape']:.3f} | {s['shapes_position']:.3f} | {r['wall_s'] / 60:.1f} min |")
    return "\n".join(rows)


def new(name: str, seeds: list[int], train_args: list[str]) -> Path:
    folder = RECORDS / name
    if folder.exists():
        raise SystemExit(f"records/{name} exists already: pick another name, or delete it to record it again")
    folder.mkdir(parents=True)
    env = machine()
    runs = []
    for seed in seeds:
        print(f"record {name}: seed {seed} (fresh clone, make speedrun) ...", flush=True)
        runs.append(run_seed(seed, train_args, folder / f"seed{seed}.log"))
        print(f"  {runs[-1]['score']['shapes_all_correct']:.1%} of scenes, {runs[-1]['wall_s'] / 60:.1f} min",
              flush=True)
    summary = summarize(runs)
    make_args = " ".join(["--seed S", shlex.join(train_args)]).strip()
    (folder / "command.txt").write_text(shlex.join(["make", "speedrun", f"ARGS={make_args}"]) + "\n")
    (folder / "config.json").write_text(json.dumps(runs[0]["config"], indent=1) + "\n")
    (folder / "scores.json").write_text(json.dumps(
        {"train_args": train_args, "machine": env, **summary,
         "seeds": [{k: r[k] for k in ("seed", "wall_s", "score")} for r in runs]}, indent=1) + "\n")
    (folder / "record.md").write_text(
        f"# {name}\n\n{env['date']}, {env['device']}, torch {env['torch']}, commit {env['git']}\n\n"
        f"`{(folder / 'command.txt').read_text().strip()}`\n\n{table(runs)}\n\n"
        f"Median {summary['median_all_correct']:.1%} of scenes with every attribute right "
        f"(spread {summary['min_all_correct']:.1%} to {summary['max_all_correct']:.1%}); "
        f"median wall {summary['median_wall_s'] / 60:.1f} min, longest {summary['max_wall_s'] / 60:.1f} min.\n")
    print((folder / "record.md").read_text())
    return folder


def rerun(folder: Path, seeds: list[int] | None) -> None:
    recorded = json.loads((folder / "scores.json").read_text())
    by_seed = {r["seed"]: r for r in recorded["seeds"]}
    for seed in seeds if seeds is not None else list(by_seed):
        if seed not in by_seed:
            raise SystemExit(f"{folder} has no seed {seed}; it has {', '.join(map(str, by_seed))}")
        with tempfile.NamedTemporaryFile(suffix=".log", delete=False) as log:
            got = run_seed(seed, recorded["train_args"], Path(log.name))
        was, now = by_seed[seed]["score"]["shapes_all_correct"], got["score"]["shapes_all_correct"]
        print(f"seed {seed}: {now:.1%} of scenes (recorded {was:.1%}, {'same' if now == was else 'differs'}), "
              f"{got['wall_s'] / 60:.1f} min (recorded {by_seed[seed]['wall_s'] / 60:.1f}); log {log.name}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python records/record.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    p_new = sub.add_parser("new", help="record NAME: one fresh-clone speedrun per seed")
    p_new.add_argument("name")
    p_new.add_argument("--seeds", default="0,1,2")
    p_rerun = sub.add_parser("rerun", help="run a record's command again and compare")
    p_rerun.add_argument("folder", type=Path)
    p_rerun.add_argument("--seeds", default=None)
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    if args.what == "new":
        new(args.name, seeds, train_args)
    else:
        if not (args.folder / "scores.json").exists():
            raise SystemExit(f"{args.folder} is not a record (no scores.json)")
        rerun(args.folder, seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())

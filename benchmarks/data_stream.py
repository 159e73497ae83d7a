"""`lorakit check` on a large messages JSONL: wall time and peak RSS, to show rows are streamed.

Writes a seeded N-row file of short support conversations (system + user + assistant, ~110 tokens
each with the embedded SmolLM2 tokenizer; 1% exact duplicates), then runs `lorakit.data.check` on it
with packing on, sampling the process RSS every second. Peak RSS should not grow with N: what grows
is a few numbers per example (lengths, duplicate hashes), not token ids.

    python benchmarks/data_stream.py --rows 100000
    python benchmarks/data_stream.py --rows 1000000
Results: benchmarks/results/data_stream_<date>_<rows>[_<tag>].json, and a summary on stdout. The
tokenizer runs on one thread (TOKENIZERS_PARALLELISM=false), as the lorakit CLI runs it. The machine
is shared, so the load average at the start and the end are recorded next to the time.
"""

import argparse
import datetime
import json
import os
import platform
import random
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

WORDS = ("order package refund charge card blanket lamp kettle chair late broken missing arrived twice week "
         "please thanks help urgent store online account email address number delivery return exchange").split()
CATEGORIES = ("billing", "shipping", "returns", "account", "other")


def write_rows(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    system = {"role": "system", "content": "Extract the support ticket as JSON with keys category, order_id."}
    with open(path, "w") as f:
        line = ""
        for i in range(rows):
            if i % 100 == 99:  # an exact duplicate of the line before
                f.write(line)
                continue
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 40)))
            answer = json.dumps({"category": rng.choice(CATEGORIES), "order_id": f"ORD-{rng.randint(10000, 99999)}"})
            line = json.dumps({"messages": [system, {"role": "user", "content": f"Ticket {i}: {text}."},
                                            {"role": "assistant", "content": answer}]}) + "\n"
            f.write(line)


def rss_mib() -> tuple[float, float]:
    """(current, peak) resident set size of this process, MiB, from /proc/self/status."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def versions() -> dict:
    from importlib.metadata import version

    import lorakit

    libraries = {name: version(name) for name in ("transformers", "tokenizers", "jinja2")}
    return {"lorakit": lorakit.__version__, "git_head": git_head(), **libraries}


def git_head() -> str:
    import subprocess

    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return head.stdout.strip()


def cpu_model() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--file", type=Path, default=None, help="where to write the data (default /tmp)")
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # what `lorakit check` does (console.py)
    path = args.file or Path(f"/tmp/lorakit_stream_{args.rows}.jsonl")
    if not path.exists():
        t = time.time()
        write_rows(path, args.rows)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.time() - t:.0f}s", flush=True)

    import lorakit
    from lorakit import data, models

    cfg = lorakit.load_config(overrides=[f"data.train={path}", "data.max_length=1024", "data.packing=true"])
    tokenizer = models.load_tokenizer(models.resolve_model(cfg.model))
    baseline = rss_mib()[0]
    samples, done = [], threading.Event()

    def sample():
        start = time.time()
        while not done.wait(1.0):
            samples.append((round(time.time() - start), round(rss_mib()[0])))

    threading.Thread(target=sample, daemon=True).start()
    load_at_start = os.getloadavg()[0]
    t, cpu = time.time(), time.process_time()
    report = data.check(cfg, tokenizer)
    seconds, cpu = time.time() - t, time.process_time() - cpu
    done.set()
    result = {
        "date": datetime.date.today().isoformat(), "rows": args.rows, "file_mib": round(path.stat().st_size / 2**20),
        "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "rows_per_s": round(args.rows / seconds),
        "load_average_1m_at_start": load_at_start, "load_average_1m_at_end": os.getloadavg()[0],
        "rss_before_check_mib": round(baseline),
        "peak_rss_mib": round(rss_mib()[1]), "rss_samples_s_mib": samples[:: max(1, len(samples) // 40)],
        "examples_kept": report["train"]["examples_kept"], "tokens_total": report["train"]["tokens_total"],
        "exact_duplicates": report["train"]["duplicates"]["exact"]["count"], "packing": report["train"]["packing"],
        "errors": report["errors"]["count"], "fingerprint": report["fingerprint"], "versions": versions(),
        "python": platform.python_version(), "machine": platform.machine(), "cpu": cpu_model(),
        "cpus": os.cpu_count(), "tokenizers_parallelism": os.environ["TOKENIZERS_PARALLELISM"],
    }
    name = f"data_stream_{result['date']}_{args.rows}" + (f"_{args.tag}" if args.tag else "")
    out = ROOT / "benchmarks" / "results" / f"{name}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rss_samples_s_mib"}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

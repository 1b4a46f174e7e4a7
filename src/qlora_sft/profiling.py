"""QLORA_SFT_PROFILE_STEP=N: what one optimizer step spends its time and memory on, per rank.
`profile_callback` profiles the step with torch.profiler and writes, to the run's logs/: the top
kernels and operators (profile-rank<i>.txt), how much of the step the GPU spent idle and how often
and where the host waited for it (`gpu_timeline`, `host_waits`, `SyncSites`; timeline-rank<i>.json,
also at the top of the text file), and on a CUDA GPU the blocks alive at the step's memory peak by the line that
allocated them (`peak_breakdown`; memory-peak-rank<i>.json). With QLORA_SFT_PROFILE_HOST=1 the step is
profiled on the host instead, by Python function (cProfile: host-profile-rank<i>.txt), with the
pauses of Python's garbage collector (`GcPauses`): where a host-bound step's time goes."""

from __future__ import annotations

import contextlib
import cProfile
import gc
import io
import json
import logging
import os
import re
import time
import traceback
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import UserError

log = logging.getLogger("qlora_sft")

PROFILE_STEP_ENV = "QLORA_SFT_PROFILE_STEP"
PROFILE_HOST_ENV = "QLORA_SFT_PROFILE_HOST"


def profile_step(env: Mapping[str, str] | None = None) -> int | None:
    """QLORA_SFT_PROFILE_STEP, checked: the optimizer step to profile (from 1), or None when unset."""
    raw = (os.environ if env is None else env).get(PROFILE_STEP_ENV, "").strip()
    if not raw:
        return None
    if not re.fullmatch(r"[0-9]{1,9}", raw) or int(raw) < 1:
        raise UserError(
            f"{PROFILE_STEP_ENV}={raw!r}: name the optimizer step to profile, a whole number from 1 (a step after "
            "the first few, e.g. 5, shows the steady state); unset it to profile nothing"
        )
    return int(raw)


def profile_host(env: Mapping[str, str] | None = None) -> bool:
    """QLORA_SFT_PROFILE_HOST, checked (`launch.env_switch`): 1 profiles the step on the host by Python
    function (cProfile) instead of with torch.profiler; 0 or unset does not."""
    from .launch import env_switch

    return env_switch(PROFILE_HOST_ENV, env) is True


class GcPauses:
    """The pauses of Python's cyclic garbage collector while this records, by generation: how many
    and how long (`gc.callbacks`)."""

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {}
        self._began = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            pause = self.pauses.setdefault(int(info.get("generation", -1)), [0, 0.0])
            pause[0] += 1
            pause[1] += time.perf_counter() - self._began

    def start(self) -> None:
        self.stop()
        self.pauses = {}
        gc.callbacks.append(self._callback)

    def stop(self) -> dict[str, dict[str, float]]:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._callback)
        return {
            f"generation {g}": {"count": int(n), "ms": round(s * 1e3, 2)} for g, (n, s) in sorted(self.pauses.items())
        }


def describe_host_profile(step: int, wall_s: float, stats: Any, pauses: dict[str, dict[str, float]]) -> str:
    """The text of host-profile-rank<i>.txt: the step's wall time, the collector's pauses, and the
    Python functions by their own time and by their time with what they called (pstats)."""
    import pstats

    lines = [
        f"step {step}: {wall_s:.3f} s wall on the host, profiled by cProfile (slower than unprofiled; on a GPU the"
        " host's time includes its waits for the GPU)",
        "garbage collector pauses: "
        + (", ".join(f"{g}: {p['count']} x, {p['ms']:.1f} ms" for g, p in pauses.items()) or "none"),
        "",
    ]
    out = io.StringIO()
    ranked = pstats.Stats(stats, stream=out)
    ranked.sort_stats("tottime").print_stats(50)
    ranked.sort_stats("cumulative").print_stats(50)
    return "\n".join(lines) + out.getvalue()


# frames from these packages name where a block was allocated; torch's own frames are skipped
OWN_FRAMES = ("qlora_sft", "peft", "transformers", "bitsandbytes", "liger_kernel", "trl", "accelerate")
# operators that read a device value back to the host (`.item()`, `bool(t)`, `if t:`, a boolean mask's
# size): on a GPU each one waits until every kernel queued before it has run
HOST_READS = ("aten::_local_scalar_dense", "aten::nonzero")
# runtime calls that block the host until the GPU catches up (`torch.cuda.synchronize()`, a pageable copy)
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
# torch's warning for a synchronizing CUDA operation (`torch.cuda.set_sync_debug_mode("warn")`)
SYNC_WARNING = "called a synchronizing CUDA operation"
# frames that only forward a call (module dispatch, autograd.Function.apply, decorators, warnings)
PASS_THROUGH = (
    "torch/nn/modules/module.py",
    "torch/utils/_contextlib.py",
    "torch/autograd/function.py",
    "torch/_tensor.py",
    "/warnings.py",
    "qlora_sft/profiling.py",
)


def _under(event: Any, names: tuple[str, ...]) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in names:
            return True
        parent = parent.cpu_parent
    return False


def host_waits(events: Any) -> list[dict[str, Any]]:
    """The operators of a profile that read a device value back or waited for the GPU: count, and host
    time spent in them (on a GPU mostly waiting for the kernels queued before). Each wait empties
    the GPU's queue, which then idles while the host queues the next kernels."""
    ops: dict[str, list[float]] = {}
    for ev in events:
        if ev.name in HOST_READS or (ev.name in SYNC_CALLS and not _under(ev, HOST_READS)):
            op = ops.setdefault(ev.name, [0, 0.0])
            op[0] += 1
            op[1] += ev.cpu_time_total
    ranked = sorted(ops.items(), key=lambda kv: -kv[1][1])
    return [{"op": op, "count": int(n), "host_ms": round(us / 1e3, 3)} for op, (n, us) in ranked]


class SyncSites:
    """Where the code synchronized with the GPU, by the innermost `depth` Python frames: torch warns
    on every synchronizing CUDA operation (`torch.cuda.set_sync_debug_mode("warn")`) while this
    records, and each warning is counted under the stack that raised it instead of being shown.
    Operations in C++ without Python frames (most of autograd's backward) count under the frame
    that started them. Other warnings pass through."""

    def __init__(self, depth: int = 4) -> None:
        self.depth = depth
        self.counts: dict[str, int] = {}
        self._saved: Any = None

    def where(self) -> str:
        frames = [f for f in traceback.extract_stack() if not any(p in f.filename for p in PASS_THROUGH)]
        named = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in reversed(frames)]
        return " <- ".join(named[: self.depth]) or "(no Python frame)"

    def start(self) -> None:
        self.stop()  # (started twice: the first one's filters go back first)
        self.counts = {}
        self._saved = warnings.catch_warnings()  # puts the filters and `showwarning` back on exit
        self._saved.__enter__()
        shown = warnings.showwarning
        warnings.filterwarnings("always", message=f".*{SYNC_WARNING}")

        def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
            if SYNC_WARNING in str(message):
                key = self.where()
                self.counts[key] = self.counts.get(key, 0) + 1
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show

    def stop(self) -> list[dict[str, Any]]:
        if self._saved is not None:
            self._saved.__exit__(None, None, None)
            self._saved = None
        return [{"count": n, "where": w} for w, n in sorted(self.counts.items(), key=lambda kv: -kv[1])]


def _union_us(intervals: list[tuple[float, float]]) -> float:
    return sum(hi - lo for lo, hi in _merged(intervals))


def _merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The intervals' union as disjoint intervals, in order."""
    out: list[tuple[float, float]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def gpu_timeline(events: Any, wall_s: float) -> dict[str, Any]:
    """How much of the step's wall time some GPU kernel ran (the union of their intervals), with and
    without the copies (which run on a side stream beside the compute), and the rest: the share of
    the step the GPU's compute waited for the host."""
    device = [ev for ev in events if getattr(ev.device_type, "name", "") == "CUDA"]
    spans = [(ev.time_range.start, ev.time_range.end) for ev in device]
    kernels = [
        (ev.time_range.start, ev.time_range.end, ev.name)
        for ev in device
        if not ev.name.startswith(("Memcpy", "Memset"))
    ]
    compute = [(lo, hi) for lo, hi, _ in kernels]
    wall_ms = wall_s * 1e3
    compute_ms = _union_us(compute) / 1e3
    copies = [(ev.time_range.start, ev.time_range.end) for ev in device if ev.name.startswith("Memcpy")]
    gaps = idle_gaps(kernels, copies)
    return {
        "wall_ms": round(wall_ms, 1),
        "gpu_busy_ms": round(_union_us(spans) / 1e3, 1),
        "gpu_compute_busy_ms": round(compute_ms, 1),
        # (clamped: the GPU's and the host's clocks may disagree by a little)
        "gpu_compute_idle_share": round(min(1.0, max(0.0, 1 - compute_ms / wall_ms)), 3)
        if device and wall_ms
        else None,
        "kernels": len(compute),
        **gaps,
    }


GAP_BUCKETS_US = ((0.0, "<10us"), (10.0, "10-100us"), (100.0, "0.1-1ms"), (1000.0, ">=1ms"))


def idle_gaps(
    kernels: list[tuple[float, float, str]], copies: list[tuple[float, float]], top: int = 12
) -> dict[str, Any]:
    """Where the GPU's compute idled between its first and last kernel (microsecond intervals): the
    idle time by gap length (many short gaps: the host queues kernels slower than they run; a few
    long ones: the GPU waits for something, such as a sync or a copy), how much of it a copy
    (offloading's fetches) was running, and the longest gaps with the kernels on either side."""
    totals = {label: [0, 0.0] for _, label in GAP_BUCKETS_US}
    longest: list[tuple[float, float, str, str]] = []
    spans = _merged(copies)
    end, before, first, covered, c = float("-inf"), "", None, 0.0, 0
    for lo, hi, name in sorted(kernels):
        if first is None:
            first = lo
        elif lo > end:  # a gap: (end, lo)
            gap = lo - end
            label = next(lab for floor, lab in reversed(GAP_BUCKETS_US) if gap >= floor)
            totals[label][0] += 1
            totals[label][1] += gap
            while c < len(spans) and spans[c][1] <= end:
                c += 1
            i = c
            while i < len(spans) and spans[i][0] < lo:
                covered += min(spans[i][1], lo) - max(spans[i][0], end)
                i += 1
            longest.append((gap, end - first, before, name))
        if hi > end:
            end, before = hi, name
    longest.sort(key=lambda g: -g[0])
    return {
        "idle_gaps": {label: {"count": n, "ms": round(us / 1e3, 2)} for label, (n, us) in totals.items()},
        "idle_with_a_copy_running_ms": round(covered / 1e3, 2),
        "longest_gaps": [
            {"ms": round(gap / 1e3, 3), "at_ms": round(at / 1e3, 1), "after": b[:80], "before": a[:80]}
            for gap, at, b, a in longest[:top]
        ],
    }


def describe_timeline(step: int, timeline: dict[str, Any], waits: list[dict[str, Any]], sites: list[dict]) -> str:
    lines = [f"step {step}: {timeline['wall_ms'] / 1e3:.3f} s wall (profiled, so slower than unprofiled)"]
    if timeline["gpu_compute_idle_share"] is not None:
        lines.append(
            f"GPU compute busy {timeline['gpu_compute_busy_ms'] / 1e3:.3f} s in {timeline['kernels']} kernels:"
            f" idle {timeline['gpu_compute_idle_share']:.0%} of the step"
        )
    if timeline.get("kernels"):
        lines.append(
            "the compute's idle gaps by length: "
            + ", ".join(f"{k} {v['count']} x, {v['ms']:.1f} ms" for k, v in timeline["idle_gaps"].items())
            + f"; a copy ran during {timeline['idle_with_a_copy_running_ms']:.1f} ms of them; the longest:"
        )
        lines += [
            f"  {g['ms']:8.3f} ms at {g['at_ms']:8.1f} ms: after {g['after']} / before {g['before']}"
            for g in timeline["longest_gaps"]
        ]
    lines.append("host reads of device values and waits for the GPU:" + ("" if waits else " none"))
    lines += [f"  {w['count']:>5} x {w['op']}: {w['host_ms']:.1f} ms" for w in waits]
    if sites:
        lines.append("where the host synchronized with the GPU (torch's sync debug mode):")
        lines += [f"  {s['count']:>5} x {s['where']}" for s in sites]
    return "\n".join(lines) + "\n\n"


def peak_breakdown(
    snapshot: dict[str, Any], held_before: int, peak: int | None = None, top: int = 30, device: int | None = None
) -> dict[str, Any]:
    """The blocks alive at the step's peak of allocated memory, by the line that allocated them (from
    `torch.cuda.memory._snapshot()` recorded over the step). `held_before` is what was allocated
    when recording started (weights, optimizer state): the step's peak is that plus the step's
    largest live total (or `peak`, the allocator's own number, where its statistics were reset)."""
    traces = snapshot.get("device_traces", [])
    if device is not None and device < len(traces):
        trace = traces[device]  # this rank's GPU (a rank may have touched another)
    else:
        trace = next((t for t in traces if t), [])
    live: dict[int, dict[str, Any]] = {}
    current = best = best_at = 0
    for i, ev in enumerate(trace):
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
            current += ev["size"]
            if current > best:
                best, best_at = current, i
        elif ev["action"] == "free_completed":
            live.pop(ev["addr"], None)
            current -= ev["size"]  # blocks allocated before recording started count too
    live, freed_before_step = {}, 0
    for ev in trace[: best_at + 1]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
        elif ev["action"] == "free_completed":
            if live.pop(ev["addr"], None) is None:
                freed_before_step += ev["size"]  # a block allocated before recording started
    groups: dict[str, int] = {}
    for ev in live.values():
        frames = ev.get("frames") or []
        own = [f for f in frames if any(f"/{pkg}/" in f["filename"] for pkg in OWN_FRAMES)]
        where = own[0] if own else (frames[0] if frames else {"filename": "?", "line": 0, "name": "?"})
        key = f"{where['filename'].split('site-packages/')[-1]}:{where['line']} {where['name']}"
        groups[key] = groups.get(key, 0) + ev["size"]
    ranked = sorted(groups.items(), key=lambda kv: -kv[1])[:top]
    return {
        "peak_gib": (held_before + best if peak is None else peak) / 2**30,
        "held_before_gib": held_before / 2**30,
        "freed_before_peak_gib": freed_before_step / 2**30,
        "above_held_before_at_peak_gib": best / 2**30,
        "by_line_mib": {k: round(v / 2**20, 1) for k, v in ranked},
    }


def profile_files(logs_dir: Path, rank: int) -> list[Path]:
    """The files a rank's profile writes."""
    return [logs_dir / f"{kind}-rank{rank}.{ext}" for kind, ext in PROFILE_FILES]


PROFILE_FILES = (("profile", "txt"), ("timeline", "json"), ("memory-peak", "json"), ("host-profile", "txt"))


def profile_callback(step: int, logs_dir: Path, rank: int, host: bool = False) -> Any:
    """QLORA_SFT_PROFILE_STEP=N: torch.profiler over optimizer step N. Each rank writes its own files:
    where the host waited for the GPU and how long the GPU idled (timeline-rank<i>.json, and at the
    top of profile-rank<i>.txt), the top kernels and operators by device and CPU time
    (profile-rank<i>.txt), and on a CUDA GPU what was alive at the step's memory peak, by the line
    that allocated it (memory-peak-rank<i>.json). An earlier launch's files are removed when training
    starts, so what is there is this launch's. A step that does not end (an exception, an
    out-of-memory retry) or that never comes (a resume past it) leaves no files and is said in the
    log; `close()` (also called when training ends, however it ends) switches everything off. The
    profiled step runs slower. `host` (QLORA_SFT_PROFILE_HOST=1): cProfile over the step instead,
    with the collector's pauses (host-profile-rank<i>.txt)."""
    import torch
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()

    class ProfileCallback(TrainerCallback):
        def __init__(self) -> None:
            self.prof: Any = None
            self.held_before = 0
            self.started = 0.0
            self.syncs = SyncSites()
            self.gc = GcPauses()
            self.host: cProfile.Profile | None = None
            self.written = False

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.close()
            stale = [f for f in profile_files(logs_dir, rank) if f.is_file()]
            for f in stale:
                f.unlink()
            if stale and rank == 0:
                log.info("profile: removed an earlier launch's %s", ", ".join(f.name for f in stale))
            if state.global_step >= step and rank == 0:
                log.warning(
                    "%s=%d: training starts after step %d (resumed), so no step is profiled",
                    PROFILE_STEP_ENV,
                    step,
                    state.global_step,
                )

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.prof is not None:  # the step begun before never ended (an out-of-memory retry)
                log.warning("profile: step %d did not end; its profile is discarded", step)
                self.close()
            if state.global_step + 1 != step:
                return
            if host:
                if cuda:
                    torch.cuda.synchronize()  # the step's own kernels only
                self.gc.start()
                self.host = self.prof = cProfile.Profile()
                self.started = time.perf_counter()
                self.host.enable()
                return
            activities = [torch.profiler.ProfilerActivity.CPU]
            if cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.synchronize()  # (the run's peak statistics are left alone: the run reports them)
                torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
                self.held_before = torch.cuda.memory_allocated()
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.__enter__()
            if cuda:
                self.syncs.start()
                torch.cuda.set_sync_debug_mode("warn")
            self.started = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.prof is None:
                return
            if state.global_step != step:  # not the step that began profiling
                self.close()
                return
            try:  # a diagnostic: if it fails, the run goes on without it
                self.write()
                self.written = True
            except Exception as e:
                log.warning("the profile of step %d failed (%s: %s); training goes on", step, type(e).__name__, e)
            finally:
                self.close()

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.close()
            if not self.written and state.global_step < step and rank == 0:
                log.warning(
                    "%s=%d: training ended at step %d; no step was profiled", PROFILE_STEP_ENV, step, state.global_step
                )

        def close(self) -> None:
            """Switch off whatever the profiled step switched on (idempotent)."""
            prof, self.prof = self.prof, None
            self.gc.stop()
            if self.host is not None:
                self.host.disable()
                self.host = prof = None
            if cuda:
                with contextlib.suppress(Exception):
                    torch.cuda.set_sync_debug_mode("default")
            self.syncs.stop()
            if prof is not None:
                with contextlib.suppress(Exception):
                    prof.__exit__(None, None, None)
                if cuda:
                    with contextlib.suppress(Exception):
                        torch.cuda.memory._record_memory_history(enabled=None)

        def write(self) -> None:
            prof = self.prof
            if cuda:
                torch.cuda.synchronize()
            wall_s = time.perf_counter() - self.started
            if self.host is not None:
                self.host.disable()
                text = describe_host_profile(step, wall_s, self.host, self.gc.stop())
                self.host = self.prof = None
                path = logs_dir / f"host-profile-rank{rank}.txt"
                path.write_text(text)
                log.info("host profile of step %d written to %s", step, path)
                return
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
            sites = self.syncs.stop()
            prof.__exit__(None, None, None)
            self.prof = None
            if cuda:
                snapshot = torch.cuda.memory._snapshot()
                torch.cuda.memory._record_memory_history(enabled=None)
            timeline = gpu_timeline(prof.events(), wall_s)
            waits = host_waits(prof.events())
            path = logs_dir / f"timeline-rank{rank}.json"
            path.write_text(json.dumps({"step": step, **timeline, "host_waits": waits, "sync_sites": sites}, indent=1))
            events = prof.key_averages()
            device_key = "self_device_time_total" if cuda else "self_cpu_time_total"
            text = (
                describe_timeline(step, timeline, waits, sites)
                + events.table(sort_by=device_key, row_limit=30)
                + "\n"
                + events.table(sort_by="cpu_time_total", row_limit=30)
            )
            path = logs_dir / f"profile-rank{rank}.txt"
            path.write_text(text)
            log.info("profile of step %d written to %s", step, path)
            if cuda:
                peak = peak_breakdown(snapshot, self.held_before, device=torch.cuda.current_device())
                path = logs_dir / f"memory-peak-rank{rank}.json"
                path.write_text(json.dumps(peak, indent=1))
                log.info("memory alive at step %d's peak (%.2f GiB) written to %s", step, peak["peak_gib"], path)

    return ProfileCallback()

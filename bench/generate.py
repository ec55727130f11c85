"""Generation throughput: stock diffusers StableDiffusionPipeline against ours, in one process.

Stock is `StableDiffusionPipeline.from_pretrained` as its documentation uses it (fp16 on CUDA, diffusers'
default SDPA attention, safety checker on), at batch 1. Ours is `Generator.load` + `generate_batch` at each
batch size; then the job system (JobQueue, JobRunner and GpuWorker with a temporary store) with several
members submitting at once; then the largest batch again with the interrogation models resident beside it
and every image scored for fidelity, as the product runs. Both sides use the same scheduler, steps,
guidance, size, prompts and seeds; stock is measured and unloaded before ours loads, so each peak-memory
figure is its own. The compute floor is the UNet and VAE-decoder FLOPs of one image (counted, not assumed)
over the device's measured dense matmul rate. Prints a table, writes JSON, ends with the headline figures:

    python bench/generate.py [--random-weights] [--batches 1,2,4,8] [--steps N] [--size PX] [--users N]

With no flag the smoke models run at a small size (wiring, not speed); --random-weights runs the real SD
v1-4, ViT-L-14 and BLIP-large architectures with random weights (see bench/models.py). Run it as a file: it
imports its siblings in bench/ (measure, models, guide_sets) from the folder Python puts first on the path.

    python bench/generate.py --keep none,layout,edges,depth,look,edges+depth [--batches 8] ...

measures instead what each set of guides costs per image against the prompt alone (`none`), side by side
in one generator that offers them all, at the largest of --batches: s/image, and its ratio to none's
(`layout` runs only steps × strength of the steps, so it may cost less). It ends with
`none_s_per_image=… layout_ratio=… edges_depth_ratio=…` and writes bench/results/generate-guides-*.json.

    python bench/generate.py --presets sd-v1-4,sd2 [--batches 4] [--reps 3] ...

measures instead two smoke presets alternating through the engine with one generator on the device
(bench/preset_swaps.py): images/s of the first alone, of both alternating with the swapped-out generator
kept in CPU RAM and with it unloaded, and the median swap time of each, side by side; --reps rounds of A
then B at the largest of --batches. Writes bench/results/generate-presets-*.json.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, get_args

import numpy as np
import torch
from guide_sets import (
    GuideSet,
    components_for,
    guided_batch,
    guides_needed,
    hold_source,
    load_guides,
    parse_guide_sets,
)
from measure import (
    Measurement,
    count,
    count_or_zero,
    default_json_path,
    device_syncs,
    environment,
    fmt,
    headline,
    measure,
    peak_bytes,
    print_table,
    release,
    reset_peak,
    synchronize,
    write_json,
)
from models import COMPONENTS, BenchModels, bench_models
from preset_swaps import parse_presets, presets_main

from i2p2i_bot import progress_bars
from i2p2i_bot.config import CompileMode, GenerateSettings, InterrogateSettings, QueueSettings
from i2p2i_bot.generate import Generator
from i2p2i_bot.gpu import GpuWorker, resolve_device
from i2p2i_bot.jobs import EventKind, JobRequest
from i2p2i_bot.queue import JobQueue
from i2p2i_bot.request import SCHEDULERS, GenerationParams, GenerationRequest, ImageSpec
from i2p2i_bot.runner import JobRunner
from i2p2i_bot.store import Store

log = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_CACHE = Path(os.environ.get("I2P2I_BENCH_CACHE", Path.home() / ".cache" / "i2p2i-bench"))
PROMPTS = (
    "an astronaut riding a horse on the moon, highly detailed, digital painting",
    "a lighthouse on a cliff at sunset, oil on canvas, dramatic sky",
    "a red fox sleeping in fresh snow, macro photograph, soft lighting",
    "a cozy reading room with tall windows, warm light, concept art",
    "a futuristic city street in the rain, neon signs, cinematic",
    "a bowl of ramen on a wooden table, studio photograph, 8k",
    "a sailing ship in a storm, matte painting, volumetric lighting",
    "portrait of an old fisherman, charcoal sketch, high contrast",
)
FIRST_SEED = 1000


@dataclass(frozen=True)
class Row:
    """One line of the table: a way of making images and what it achieved."""

    run: str
    batch: str
    images: int
    seconds: float  # median seconds for `images` images
    peak_bytes: int | None
    per_batch_s: float | None

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run every row, print the table and the headline line, write the JSON; return the headline figures."""
    args = _parser().parse_args(argv)
    load_at_start = os.getloadavg()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    progress_bars.only_on_a_terminal()
    device = resolve_device(args.device)
    if args.inductor_tuning:
        _inductor_tuning()
    batches = sorted({int(b) for b in args.batches.split(",") if b.strip()})
    if not batches or batches[0] < 1:
        raise SystemExit(f"--batches takes positive whole numbers (got {args.batches!r})")
    cache_dir = Path(args.cache_dir).expanduser()
    if args.presets is not None:
        json_out = (
            Path(args.json_out) if args.json_out else default_json_path("generate-presets", device, "smoke")
        )
        return presets_main(
            parse_presets(args.presets),
            cache_dir=cache_dir,
            labels=Path(args.labels).expanduser() if args.labels else None,
            device=device,
            size=args.size or 128,
            steps=args.steps or 10,
            batch=max(batches),
            rounds=args.reps,
            json_out=json_out,
            load_at_start=load_at_start,
        )
    guide_sets = parse_guide_sets(args.keep) if args.keep is not None else None
    needed = guides_needed(guide_sets or [])
    models = bench_models(
        cache_dir,
        random_weights=args.random_weights,
        device=device,
        components=[*COMPONENTS, *components_for(needed)],
    )
    size = args.size or (512 if models.random_weights else 128)
    steps = args.steps or (25 if models.random_weights else 10)
    jobs_per_user = args.jobs_per_user or (4 if device.type == "cuda" else 2)
    settings = GenerateSettings(
        steps=steps,
        guidance=args.guidance,
        scheduler=args.scheduler,
        width=size,
        height=size,
        min_side=min(size, 256),
        max_side=max(size, 768),
        max_count=max([*batches, args.images_per_job]),
        compile=args.compile,
        compile_buckets=batches,
    )
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    floor = _compute_floor(models.generator, size, steps, args.guidance)
    peak_tflops = args.peak_tflops or _matmul_tflops(device, dtype)
    floor_images_per_s = peak_tflops * 1e12 / floor["per_image_flops"]
    reps, warmup = args.reps, args.warmup
    if guide_sets is not None:
        return _guides_main(args, models, settings, device, dtype, guide_sets, max(batches), load_at_start)

    # Stock first, then unloaded, so its weights do not count in our peak memory.
    stock_row, stock_image = _stock(models, settings, device, dtype, warmup=warmup, reps=reps)
    release(device)

    # The fast path one step at a time, at the largest batch: each step is kept only where it pays.
    steps_rows = (
        _fast_path_steps(models, settings, device, max(batches), warmup=warmup, reps=reps)
        if args.fast_path_steps
        else []
    )

    # Ours lives on one GPU thread, as in the bot: loaded, compiled, warmed and run there (torch keeps a
    # compiled UNet's CUDA graphs per thread), each timed run handed to it and waited for.
    gpu = GpuWorker()
    try:
        generator = _on(gpu, Generator.load, str(models.generator), settings, device)
        params = generator.plan(GenerationRequest("x")).params
        rows = [stock_row, *steps_rows]
        first_image = None
        for batch in batches:
            run = functools.partial(_on, gpu, generator.generate_batch, params, _specs(batch))
            timing, result = measure(run, device, warmup=warmup, reps=reps)
            rows.append(_row("ours", str(batch), batch, timing, per_batch=True))
            if batch == 1:
                first_image = result.images[0].image
        syncs = _on(gpu, _device_syncs, generator, params, device)
        jobs = asyncio.run(
            _through_jobs(
                generator, gpu, params, device, args.users, jobs_per_user, args.images_per_job, max(batches)
            )
        )
        rows.append(jobs.row)
        resident = _resident(
            generator, gpu, params, models, device, cache_dir, args.labels, max(batches), warmup, reps
        )
        rows.extend(resident)
    finally:
        gpu.close()

    same_pixels = None
    if first_image is not None:
        diff = np.abs(np.asarray(first_image, np.int16) - np.asarray(stock_image, np.int16))
        same_pixels = int(diff.max())
    stock_rate = stock_row.images_per_s
    ours_rows = [r for r in rows if r.run == "ours"]
    ours_best = max(ours_rows, key=lambda r: r.images_per_s)
    payload: dict[str, Any] = {
        "benchmark": "generate",
        "environment": environment(device, load_at_start),
        "models": {"kind": models.kind, "generator": str(models.generator), "precision": str(dtype)},
        "settings": {
            "size": size,
            "steps": steps,
            "guidance": args.guidance,
            "scheduler": args.scheduler,
            "batches": batches,
            "users": args.users,
            "jobs_per_user": jobs_per_user,
            "images_per_job": args.images_per_job,
            "warmup": warmup,
            "reps": reps,
        },
        "compute_floor": {
            **floor,
            "peak_tflops": peak_tflops,
            "peak_tflops_source": "given" if args.peak_tflops else "measured dense matmul",
            "images_per_s": floor_images_per_s,
        },
        "stock_vs_ours_batch1_max_pixel_difference": same_pixels,
        "fast_path": [*generator.fast_path, *(["inductor-tuning"] if args.inductor_tuning else [])],
        "compile_warmup_s": None if generator.buckets is None else generator.buckets.warmup_s,
        "device_syncs": syncs,
        "jobs": jobs.details,
        "rows": [
            {
                "run": r.run,
                "batch": r.batch,
                "images": r.images,
                "seconds": r.seconds,
                "images_per_s": r.images_per_s,
                "s_per_image": 1 / r.images_per_s,
                "s_per_batch": r.per_batch_s,
                "peak_gib": None if r.peak_bytes is None else r.peak_bytes / 2**30,
                "ratio_to_stock": r.images_per_s / stock_rate,
                "floor_pct": 100 * r.images_per_s / floor_images_per_s,
            }
            for r in rows
        ],
    }
    figures = {
        "ours_images_per_s": ours_best.images_per_s,
        "ours_batch": float(ours_best.batch),
        "stock_images_per_s": stock_rate,
        "ratio": ours_best.images_per_s / stock_rate,
        f"users{args.users}_images_per_s": jobs.row.images_per_s,
        f"users{args.users}_ratio": jobs.row.images_per_s / stock_rate,
    }
    batch4 = next((r for r in rows if r.run == "ours" and r.batch == "4"), None)
    if batch4 is not None and batch4.per_batch_s is not None:
        figures["batch4_s"] = batch4.per_batch_s
    figures["floor_pct"] = 100 * ours_best.images_per_s / floor_images_per_s
    if syncs is not None and "per_step" in syncs:
        figures["syncs_per_step"] = syncs["per_step"]
    if resident[0].peak_bytes is not None:
        figures["resident_peak_gib"] = resident[0].peak_bytes / 2**30
        if len(resident) > 1 and resident[1].peak_bytes is not None:
            figures["resident_sliced_peak_gib"] = resident[1].peak_bytes / 2**30
    payload["headline"] = figures
    json_out = Path(args.json_out) if args.json_out else default_json_path("generate", device, models.kind)
    write_json(json_out, payload)
    _print_report(payload, rows, stock_rate, floor_images_per_s, json_out)
    print(headline(figures))
    return figures


def _guides_main(
    args: argparse.Namespace,
    models: BenchModels,
    settings: GenerateSettings,
    device: torch.device,
    dtype: torch.dtype,
    guide_sets: list[GuideSet],
    batch: int,
    load_at_start: tuple[float, float, float],
) -> dict[str, float]:
    """Each guide set at one batch size in one generator that offers them all, none first; the table, the
    JSON and the headline (none's s/image and each other set's ratio to it)."""
    names = guides_needed(guide_sets)
    gpu = GpuWorker()
    rows: list[tuple[GuideSet, Row]] = []
    try:
        guides = _on(gpu, load_guides, models, names, device, dtype)
        generator = _on(
            gpu,
            functools.partial(Generator.load, str(models.generator), settings, device, guides=guides),
        )
        hold_source(generator)
        for guide_set in guide_sets:
            params, specs = guided_batch(generator, guide_set, PROMPTS, FIRST_SEED, batch)
            run = functools.partial(_on, gpu, generator.generate_batch, params, specs)
            timing, _ = measure(run, device, warmup=args.warmup, reps=args.reps)
            rows.append((guide_set, _row(guide_set.label, str(batch), batch, timing, per_batch=True)))
        fast_path = generator.fast_path
    finally:
        gpu.close()
    none_s = 1 / rows[0][1].images_per_s
    figures = {"none_s_per_image": none_s}
    for guide_set, row in rows[1:]:
        figures[f"{guide_set.key}_ratio"] = (1 / row.images_per_s) / none_s
    payload: dict[str, Any] = {
        "benchmark": "generate-guides",
        "environment": environment(device, load_at_start),
        "models": {"kind": models.kind, "generator": str(models.generator), "precision": str(dtype)},
        "settings": {
            "size": settings.width,
            "steps": settings.steps,
            "guidance": settings.guidance,
            "scheduler": settings.scheduler,
            "batch": batch,
            "warmup": args.warmup,
            "reps": args.reps,
        },
        "fast_path": fast_path,
        "rows": [
            {
                "keep": guide_set.label,
                "guides": [str(guide) for guide in guide_set.guides],
                "batch": batch,
                "seconds": row.seconds,
                "s_per_image": 1 / row.images_per_s,
                "s_per_batch": row.per_batch_s,
                "peak_gib": None if row.peak_bytes is None else row.peak_bytes / 2**30,
                "ratio_to_none": (1 / row.images_per_s) / none_s,
            }
            for guide_set, row in rows
        ],
        "headline": figures,
    }
    json_out = (
        Path(args.json_out) if args.json_out else default_json_path("generate-guides", device, models.kind)
    )
    write_json(json_out, payload)
    env = payload["environment"]
    print(
        f"guides: cost per image against the prompt alone, {models.kind} models ({dtype}) on "
        f"{env['device_name']} [{env['device']}], {env['torch_threads']} threads"
    )
    print(
        f"{settings.width}x{settings.height}, {settings.steps} steps {settings.scheduler}, guidance "
        f"{settings.guidance:g}, batch {batch}; median of {args.reps} runs after {args.warmup} warm-up; "
        f"fast path: {', '.join(fast_path) or 'none'}"
    )
    print()
    print_table(
        ["keep", "batch", "s/image", "s/batch", "peak GiB", "x none"],
        [
            [
                r["keep"],
                str(batch),
                fmt(r["s_per_image"], 3),
                fmt(r["s_per_batch"], 3),
                fmt(r["peak_gib"], 2),
                fmt(r["ratio_to_none"], 2),
            ]
            for r in payload["rows"]
        ],
    )
    print()
    print(f"JSON: {json_out}")
    print(headline(figures))
    return figures


def _inductor_tuning() -> None:
    """The Inductor settings diffusers' speed-up guide gives for a compiled SD UNet."""
    import torch._inductor.config as inductor

    inductor.conv_1x1_as_mm = True
    inductor.coordinate_descent_tuning = True
    inductor.epilogue_fusion = False
    inductor.coordinate_descent_check_all_directions = True


def _parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="the real SD v1-4, ViT-L-14 and BLIP-large architectures with random weights (built once, "
        "~4.3 GB)",
    )
    parser.add_argument("--batches", default="1,2,4,8", help="our batch sizes, comma-separated")
    parser.add_argument("--size", type=count, help="image side in pixels (default 512; smoke models 128)")
    parser.add_argument("--steps", type=count, help="denoising steps (default 25; 10 for the smoke models)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--scheduler", default="dpm", choices=SCHEDULERS)
    parser.add_argument("--reps", type=count, default=5, help="timed runs per row")
    parser.add_argument("--warmup", type=count_or_zero, default=1, help="untimed runs per row first")
    parser.add_argument("--users", type=count, default=4, help="members submitting at once to the job system")
    parser.add_argument("--jobs-per-user", type=count, help="jobs per member (default 4 on CUDA, 2 on CPU)")
    parser.add_argument("--images-per-job", type=count, default=4)
    parser.add_argument("--labels", help="short label lists for the interrogation models (default: packaged)")
    parser.add_argument(
        "--peak-tflops", type=float, help="the device's dense rate for the compute floor (default: measured)"
    )
    parser.add_argument(
        "--compile",
        default="off",
        choices=get_args(CompileMode),
        help="torch.compile mode for our UNet, compiled for each of --batches at start (default off)",
    )
    parser.add_argument(
        "--inductor-tuning",
        action="store_true",
        help="diffusers' Inductor settings for a compiled UNet: 1x1 convolutions as matmuls, "
        "coordinate-descent tuning, no epilogue fusion (more compile time)",
    )
    parser.add_argument(
        "--no-fast-path-steps",
        dest="fast_path_steps",
        action="store_false",
        help="skip the rows that add the fast path's steps one at a time",
    )
    parser.add_argument(
        "--keep",
        help="instead: each guide set's cost per image against none, e.g. none,layout,edges,depth,look,"
        "edges+depth (guides of one set joined by +, each NAME[:WEIGHT])",
    )
    parser.add_argument(
        "--presets",
        help="instead: two smoke presets alternating, e.g. sd-v1-4,sd2: swap time and images/s against the "
        "first alone",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="models and label tables (reused)")
    parser.add_argument("--json-out", help="default: bench/results/generate-<device>.json")
    return parser


def _fast_path_steps(
    models: BenchModels,
    settings: GenerateSettings,
    device: torch.device,
    batch: int,
    *,
    warmup: int,
    reps: int,
) -> list[Row]:
    """Our generator at one batch size with none, each, and both of the uncompiled fast-path steps."""
    variants = [
        ("ours, fp16/SDPA only" if device.type == "cuda" else "ours, no fast path", False, False),
        ("ours + fused QKV", False, True),
        ("ours + channels-last", True, False),
        ("ours + channels-last + fused QKV", True, True),
    ]
    rows = []
    for name, channels_last, fuse_qkv in variants:
        variant = dataclasses.replace(
            settings, channels_last="on" if channels_last else "off", fuse_qkv=fuse_qkv, compile="off"
        )
        generator = Generator.load(str(models.generator), variant, device)
        params = generator.plan(GenerationRequest("x")).params
        run = functools.partial(generator.generate_batch, params, _specs(batch))
        timing, _ = measure(run, device, warmup=warmup, reps=reps)
        rows.append(_row(name, str(batch), batch, timing, per_batch=True))
        del generator, run
        release(device)
    return rows


def _on(gpu: GpuWorker, fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) run on the GPU thread; its result, or its exception raised here."""
    return gpu.submit(fn, *args).result()


def _specs(count: int, offset: int = 0) -> list[ImageSpec]:
    return [
        ImageSpec(PROMPTS[(offset + i) % len(PROMPTS)], "", FIRST_SEED + offset + i) for i in range(count)
    ]


def _row(run: str, batch: str, images: int, timing: Measurement, *, per_batch: bool) -> Row:
    return Row(run, batch, images, timing.median_s, timing.peak_bytes, timing.median_s if per_batch else None)


def _device_syncs(
    generator: Generator, params: GenerationParams, device: torch.device
) -> dict[str, Any] | None:
    """How often one image's batch makes the host wait for the GPU, at 2 and at 4 steps (None off CUDA).

    The difference is what each step adds: 0 when no step waits for the one before it to finish.
    """
    if device.type != "cuda":
        return None

    def batch_of(steps: int) -> Callable[[], object]:
        return lambda: generator.generate_batch(dataclasses.replace(params, steps=steps), _specs(1))

    try:
        counts = {steps: device_syncs(batch_of(steps), device) for steps in (2, 4)}
    except Exception as exc:  # a debugging aid of torch's: its failure must not cost the other figures
        log.warning("could not count device syncs: %s", exc, exc_info=True)
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"2_steps": counts[2], "4_steps": counts[4], "per_step": ((counts[4] or 0) - (counts[2] or 0)) / 2}


def _stock(
    models: BenchModels,
    settings: GenerateSettings,
    device: torch.device,
    dtype: torch.dtype,
    *,
    warmup: int,
    reps: int,
) -> tuple[Row, Any]:
    """diffusers' own pipeline at batch 1 with our scheduler; returns its row and its first image."""
    from diffusers import DPMSolverMultistepScheduler, PNDMScheduler, StableDiffusionPipeline

    pipe: Any = StableDiffusionPipeline.from_pretrained(str(models.generator), dtype=dtype).to(device)
    scheduler_class = {"dpm": DPMSolverMultistepScheduler, "pndm": PNDMScheduler}[settings.scheduler]
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    spec = _specs(1)[0]

    def call() -> Any:
        with torch.inference_mode():
            return pipe(
                spec.prompt,
                negative_prompt=spec.negative_prompt,
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance,
                height=settings.height,
                width=settings.width,
                generator=torch.Generator("cpu").manual_seed(spec.seed),
            )

    timing, out = measure(call, device, warmup=warmup, reps=reps)
    # The pipeline is freed when this returns: nothing else holds it.
    return _row("stock diffusers", "1", 1, timing, per_batch=True), out.images[0]


@dataclass(frozen=True)
class JobsOutcome:
    row: Row
    details: dict[str, Any]


async def _through_jobs(
    generator: Generator,
    gpu: GpuWorker,
    params: GenerationParams,
    device: torch.device,
    users: int,
    jobs_per_user: int,
    images_per_job: int,
    batch: int,
) -> JobsOutcome:
    """Members submit all their jobs at once; timed from the first submission to the last stored image."""
    total_jobs = users * jobs_per_user
    settings = QueueSettings(
        max_batch_images=batch,
        max_queued_jobs_per_user=jobs_per_user,
        max_queued_jobs=max(total_jobs, 1),
    )
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="i2p2i-bench-", dir=shm) as tmp:
        folder = Path(tmp)
        store = await Store.open(folder / "bench.sqlite3", images_dir=folder / "images")
        try:
            queue = await JobQueue.open(store, settings)
            runner = JobRunner(queue, generator, gpu, timeout_s=settings.job_timeout_s)
            subscription = queue.subscribe()
            queued_at: dict[int, float] = {}
            latencies: list[float] = []
            finished = 0

            async def listen() -> None:
                nonlocal finished
                async for event in subscription:
                    if event.kind is EventKind.QUEUED:
                        queued_at[event.job_id] = time.perf_counter()
                    elif event.kind is EventKind.FINISHED:
                        finished += 1
                        latencies.append(time.perf_counter() - queued_at.pop(event.job_id))

            async def member(user: int) -> None:
                for j in range(jobs_per_user):
                    spec = _specs(1, offset=user * jobs_per_user + j)[0]
                    await queue.submit(
                        JobRequest(
                            owner_id=user + 1,
                            request=generator.plan(
                                GenerationRequest(spec.prompt, count=images_per_job, seed=spec.seed)
                            ),
                        )
                    )

            listener = asyncio.create_task(listen())
            reset_peak(device)
            started = time.perf_counter()
            runner.start()
            await asyncio.gather(*(member(user) for user in range(users)))
            await queue.join()
            await asyncio.get_running_loop().run_in_executor(None, synchronize, device)
            elapsed = time.perf_counter() - started
            peak = peak_bytes(device)
            await runner.stop()
            subscription.close()
            await listener
        finally:
            await store.close()
    if finished != total_jobs:
        raise SystemExit(f"the job system finished {finished} of {total_jobs} jobs")
    images = total_jobs * images_per_job
    per_batch_s = elapsed / runner.batches_run
    row = Row(f"ours, job system, {users} users", f"<={batch}", images, elapsed, peak, per_batch_s)
    details = {
        "users": users,
        "jobs": total_jobs,
        "images": images,
        "gpu_batches": runner.batches_run,
        "mean_images_per_batch": images / runner.batches_run,
        "elapsed_s": elapsed,
        "job_latency_median_s": statistics.median(latencies),
        "job_latency_max_s": max(latencies),
    }
    return JobsOutcome(row, details)


def _resident(
    generator: Generator,
    gpu: GpuWorker,
    params: GenerationParams,
    models: BenchModels,
    device: torch.device,
    cache_dir: Path,
    labels: str | None,
    batch: int,
    warmup: int,
    reps: int,
) -> list[Row]:
    """The largest batch with the interrogation models (and their label table) loaded and fidelity scored,
    then the same with VAE slicing (unless the settings slice already)."""
    import skimage.data
    from PIL import Image

    from i2p2i_bot.interrogate import Interrogator

    settings = InterrogateSettings(labels_dir=str(Path(labels).expanduser()) if labels else "")
    interrogator = _on(
        gpu, Interrogator.load, str(models.clip), str(models.caption), settings, device, cache_dir
    )
    source = _on(gpu, interrogator.interrogate, Image.fromarray(skimage.data.astronaut()), "fast")
    # As the engine wires them: decoded pixels go to CLIP on the device, PIL images as the fallback.
    generator.embed_images, generator.embed_pixels = interrogator.embed_images, interrogator.embed_pixels
    specs = [ImageSpec(s.prompt, s.negative_prompt, s.seed, source.image_embedding) for s in _specs(batch)]
    run = functools.partial(_on, gpu, generator.generate_batch, params, specs)
    rows = []
    unsliced = generator.settings
    try:
        timing, _ = measure(run, device, warmup=warmup, reps=reps)
        rows.append(_row("ours + interrogation models, fidelity", str(batch), batch, timing, per_batch=True))
        if batch > 1 and not unsliced.vae_slicing_from:
            # The same with the VAE decoding one image at a time: what generate.vae_slicing_from saves.
            generator.settings = dataclasses.replace(unsliced, vae_slicing_from=batch)
            timing, _ = measure(run, device, warmup=warmup, reps=reps)
            rows.append(_row("  the same, VAE slicing", str(batch), batch, timing, per_batch=True))
    finally:
        generator.embed_images = generator.embed_pixels = None
        generator.settings = unsliced
    return rows


def _compute_floor(generator_dir: Path, size: int, steps: int, guidance: float) -> dict[str, Any]:
    """FLOPs of one image: UNet forwards (two per step with guidance) and one VAE decode, counted on meta."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(generator_dir / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(generator_dir / "vae"))
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    latents = torch.empty(1, unet.config.in_channels, size // scale, size // scale, device="meta")
    context = torch.empty(1, 77, unet.config.cross_attention_dim, device="meta")
    with FlopCounterMode(display=False) as counter:
        unet(latents, torch.tensor([500], device="meta"), context)
    unet_flops = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        vae.decode(latents)
    vae_flops = counter.get_total_flops()
    # diffusers skips the unconditional pass when guidance is 1 or less.
    forwards = steps * (2 if guidance > 1 else 1)
    return {
        "unet_forward_tflop": unet_flops / 1e12,
        "unet_forwards_per_image": forwards,
        "vae_decode_tflop": vae_flops / 1e12,
        "per_image_flops": forwards * unet_flops + vae_flops,
    }


def _matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """The device's dense matmul rate in the pipeline's precision: the practical peak for the floor."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timing, _ = measure(lambda: a @ b, device, warmup=2, reps=10 if device.type == "cuda" else 5)
    return 2 * n**3 / min(timing.runs_s) / 1e12


def _print_report(
    payload: dict[str, Any], rows: list[Row], stock_rate: float, floor_rate: float, json_out: Path
) -> None:
    env, s, jobs = payload["environment"], payload["settings"], payload["jobs"]
    floor = payload["compute_floor"]
    print(
        f"generation: stock diffusers {env['versions']['diffusers']} vs ours, {payload['models']['kind']} "
        f"models ({payload['models']['precision']}) on {env['device_name']} [{env['device']}], "
        f"{env['torch_threads']} threads, host load {env['load_average_at_start'][0]:.2f} at start"
    )
    print(
        f"{s['size']}x{s['size']}, {s['steps']} steps {s['scheduler']}, guidance {s['guidance']:g}; "
        f"median of {s['reps']} runs after {s['warmup']} warm-up"
    )
    print(
        f"compute floor: {floor['unet_forwards_per_image']} x {floor['unet_forward_tflop']:.4g} TFLOP UNet + "
        f"{floor['vae_decode_tflop']:.4g} TFLOP VAE decode per image at {floor['peak_tflops']:.4g} TFLOP/s "
        f"({floor['peak_tflops_source']}) = {floor_rate:.4g} images/s"
    )
    print(
        f"job system: {jobs['users']} users x {s['jobs_per_user']} jobs x {s['images_per_job']} images in "
        f"{jobs['gpu_batches']} GPU batches; job latency median {jobs['job_latency_median_s']:.2f} s, "
        f"max {jobs['job_latency_max_s']:.2f} s"
    )
    warm = payload["compile_warmup_s"]
    compiled = (
        ""
        if not warm
        else " (compile at start: " + ", ".join(f"batch {b} {t:.0f} s" for b, t in warm.items()) + ")"
    )
    print(f"our fast path: {', '.join(payload['fast_path']) or 'none'}{compiled}")
    syncs = payload["device_syncs"]
    if syncs is not None and "per_step" in syncs:
        print(
            f"host waits for the GPU in a batch of one image: {syncs['2_steps']} at 2 steps, "
            f"{syncs['4_steps']} at 4 steps ({syncs['per_step']:g} per step)"
        )
    diff = payload["stock_vs_ours_batch1_max_pixel_difference"]
    if diff is not None:
        print(f"stock and ours at batch 1, same seed: largest pixel difference {diff} of 255")
    print()
    print_table(
        ["run", "batch", "images/s", "s/image", "s/batch", "peak GiB", "x stock", "% floor"],
        [
            [
                r.run,
                r.batch,
                fmt(r.images_per_s, 3),
                fmt(1 / r.images_per_s, 3),
                fmt(r.per_batch_s, 3),
                fmt(None if r.peak_bytes is None else r.peak_bytes / 2**30, 2),
                fmt(r.images_per_s / stock_rate, 2),
                fmt(100 * r.images_per_s / floor_rate, 1),
            ]
            for r in rows
        ],
    )
    print()
    print(f"JSON: {json_out}")


if __name__ == "__main__":
    main()

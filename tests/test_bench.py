"""The benchmark scripts run end to end on the smoke models and report what they promise."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from i2p2i_bot.cli import main as cli
from i2p2i_bot.images import open_image
from i2p2i_bot.interrogate import MODES, ClipEncoder
from i2p2i_bot.smoke import SmokeModels
from tests.redis_server import redis_server_path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, argv: list[str], returncode: int = 0) -> str:
    """Run a benchmark as its documentation says, `python bench/<script>`, offline; return its stdout."""
    return _run_both(script, argv, returncode)[0]


def _run_both(script: str, argv: list[str], returncode: int = 0) -> tuple[str, str]:
    """_run's stdout, and the benchmark's stderr."""
    # The package of this checkout, whichever one is installed.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=300,
        check=False,
    )
    stderr = done.stderr.decode(errors="replace")
    assert done.returncode == returncode, stderr[-4000:]
    # Bytes, as written: no progress bar redrawn with carriage returns into what is a log here.
    assert b"\r" not in done.stderr and "%|" not in stderr, stderr[-4000:]
    return done.stdout.decode(), stderr


def _headline(out: str) -> dict[str, float]:
    """The last printed line as key=value pairs; every value must be a positive number."""
    last = out.strip().splitlines()[-1]
    figures = dict(pair.split("=", 1) for pair in last.split())
    values = {key: float(value) for key, value in figures.items()}
    assert all(math.isfinite(v) and v > 0 for v in values.values()), last
    return values


def _environment_ok(env: dict[str, Any]) -> None:
    assert env["device"] == "cpu" and env["device_name"] and env["date"]
    assert set(env["versions"]) == {
        "torch",
        "diffusers",
        "transformers",
        "open-clip-torch",
        "clip-interrogator",
    }


def test_generate_bench_runs_on_smoke_models(
    smoke_models: SmokeModels, smoke_cache: Path, labels_dir: Path, tmp_path: Path
) -> None:
    """generate.py times stock, each batch, the job system and the resident row, then prints its headline."""
    json_out = tmp_path / "generate.json"
    argv = ["--device", "cpu", "--cache-dir", str(smoke_cache), "--labels", str(labels_dir),
            "--size", "64", "--steps", "2", "--batches", "1,2", "--reps", "1", "--warmup", "1",
            "--users", "4", "--jobs-per-user", "1", "--images-per-job", "2",
            "--json-out", str(json_out)]  # fmt: skip
    figures = _headline(_run("generate.py", argv))
    expected = {"ours_images_per_s", "ours_batch", "stock_images_per_s", "ratio", "users4_images_per_s",
                "users4_ratio", "floor_pct"}  # fmt: skip
    assert expected <= set(figures) and "resident_peak_gib" not in figures  # no device memory on CPU

    payload = json.loads(json_out.read_text(encoding="utf-8"))
    assert payload["benchmark"] == "generate" and payload["models"]["kind"] == "smoke"
    _environment_ok(payload["environment"])
    runs = [(row["run"], row["batch"]) for row in payload["rows"]]
    assert runs == [
        ("stock diffusers", "1"),
        ("ours, no fast path", "2"),
        ("ours + fused QKV", "2"),
        ("ours + channels-last", "2"),
        ("ours + channels-last + fused QKV", "2"),
        ("ours", "1"),
        ("ours", "2"),
        ("ours, job system, 4 users", "<=2"),
        ("ours + interrogation models, fidelity", "2"),
        ("  the same, VAE slicing", "2"),
    ]
    for row in payload["rows"]:
        assert row["images_per_s"] > 0 and row["peak_gib"] is None
        assert row["ratio_to_stock"] > 0 and row["floor_pct"] > 0
    assert payload["rows"][0]["ratio_to_stock"] == 1.0
    assert payload["jobs"]["images"] == 8 and payload["jobs"]["gpu_batches"] >= 4
    assert payload["compute_floor"]["unet_forwards_per_image"] == 4  # two steps, guided
    # Same pipeline, scheduler, seed and prompt: stock's image and ours agree.
    assert payload["stock_vs_ours_batch1_max_pixel_difference"] <= 2
    assert payload["fast_path"] == ["fused_qkv"] and payload["compile_warmup_s"] is None
    assert payload["headline"] == pytest.approx(figures, rel=0.01)


def test_generate_bench_compares_each_guide_set_with_none(
    smoke_models: SmokeModels, smoke_cache: Path, tmp_path: Path
) -> None:
    """generate.py --keep times each guide set at one batch size in one generator, none first, and gives
    each set's s/image and its ratio to none's."""
    json_out = tmp_path / "guides.json"
    argv = ["--device", "cpu", "--cache-dir", str(smoke_cache), "--size", "64", "--steps", "2",
            "--batches", "1,2", "--reps", "1", "--warmup", "0",
            "--keep", "layout,edges,depth,look:0.8,edges+depth", "--json-out", str(json_out)]  # fmt: skip
    out = _run("generate.py", argv)
    figures = _headline(out)
    assert list(figures) == [
        "none_s_per_image",
        "layout_ratio",
        "edges_ratio",
        "depth_ratio",
        "look_0_8_ratio",
        "edges_depth_ratio",
    ]
    payload = json.loads(json_out.read_text(encoding="utf-8"))
    assert payload["benchmark"] == "generate-guides" and payload["models"]["kind"] == "smoke"
    _environment_ok(payload["environment"])
    rows = payload["rows"]
    assert [(r["keep"], r["guides"], r["batch"]) for r in rows] == [
        ("none", [], 2),
        ("layout", ["layout:0.6"], 2),
        ("edges", ["edges:0.8"], 2),
        ("depth", ["depth:0.8"], 2),
        ("look:0.8", ["look:0.8"], 2),
        ("edges+depth", ["edges:0.8", "depth:0.8"], 2),
    ]
    none = rows[0]["s_per_image"]
    for row in rows:
        assert row["s_per_image"] == pytest.approx(row["s_per_batch"] / 2)
        assert row["ratio_to_none"] == pytest.approx(row["s_per_image"] / none)
    assert figures["edges_depth_ratio"] == pytest.approx(rows[-1]["ratio_to_none"], rel=0.01)
    lines = out.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("keep ")) + 2 :][:6]
    assert [line.split()[0] for line in table] == [r["keep"] for r in rows]
    assert table[0].split()[-1] == "1.00"  # none against itself


def test_generate_bench_alternates_two_presets(
    smoke_models: SmokeModels, smoke_cache: Path, tmp_path: Path
) -> None:
    """generate.py --presets times the first preset alone, then both alternating with the swapped-out
    generator kept in CPU RAM and with it unloaded, each swap counted and timed, side by side."""
    json_out = tmp_path / "presets.json"
    argv = ["--device", "cpu", "--cache-dir", str(smoke_cache), "--size", "64", "--steps", "2",
            "--batches", "2", "--reps", "2", "--presets", "sd-v1-4,sd2",
            "--json-out", str(json_out)]  # fmt: skip
    out = _run("generate.py", argv)
    figures = _headline(out)
    assert list(figures) == [
        "single_images_per_s",
        "alternating_ram_images_per_s",
        "alternating_ram_ratio",
        "swap_ram_s",
        "alternating_unloaded_images_per_s",
        "alternating_unloaded_ratio",
        "swap_unloaded_s",
    ]
    payload = json.loads(json_out.read_text(encoding="utf-8"))
    assert payload["benchmark"] == "generate-presets"
    _environment_ok(payload["environment"])
    rows = payload["rows"]
    # Two rounds of two batches of 2: A A A A alone; A B A B alternating, three swaps after the first A.
    assert [(r["run"], r["images"], r["swaps"]) for r in rows] == [
        ("sd-v1-4 alone", 8, 0),
        ("sd-v1-4,sd2 kept in RAM", 8, 3),
        ("sd-v1-4,sd2 unloaded", 8, 3),
    ]
    assert rows[0]["swap_s"] is None and all(r["swap_s"] > 0 for r in rows[1:])
    assert rows[1]["ratio_to_single"] == pytest.approx(rows[1]["images_per_s"] / rows[0]["images_per_s"])
    assert figures["swap_ram_s"] == pytest.approx(rows[1]["swap_s"], rel=0.01)
    lines = out.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("run ")) + 2 :][:3]
    assert [line.split()[-2] for line in table] == ["0", "3", "3"]


def test_a_guide_set_the_bench_cannot_read_is_one_line(smoke_cache: Path) -> None:
    """An unknown guide in --keep stops the bench before any model loads, with the guide's own sentence."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "generate.py"), "--device", "cpu",
         "--cache-dir", str(smoke_cache), "--keep", "edges+pose"],
        cwd=ROOT, capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.decode().strip().splitlines()[-1] == (
        "--keep 'edges+pose': There is no guide called 'pose'; the guides are layout, edges, depth, look."
    )


def test_interrogate_bench_runs_on_smoke_models(
    smoke_models: SmokeModels, smoke_cache: Path, labels_dir: Path, tmp_path: Path
) -> None:
    """interrogate.py times stock and ours in every mode and says whether their prompts agree."""
    json_out = tmp_path / "interrogate.json"
    argv = ["--device", "cpu", "--cache-dir", str(smoke_cache), "--labels", str(labels_dir),
            "--reps", "1", "--warmup", "0", "--json-out", str(json_out)]  # fmt: skip
    figures = _headline(_run("interrogate.py", argv))
    assert {f"{mode}_ms" for mode in MODES} | {f"{mode}_ratio" for mode in MODES} == set(figures)

    payload = json.loads(json_out.read_text(encoding="utf-8"))
    assert payload["benchmark"] == "interrogate" and payload["models"]["kind"] == "smoke"
    _environment_ok(payload["environment"])
    assert set(payload["modes"]) == set(MODES)
    for mode, result in payload["modes"].items():
        assert result["stock_ms"] > 0 and result["ours_ms"] > 0
        assert result["ratio"] == pytest.approx(result["stock_ms"] / result["ours_ms"])
        assert result["ours_prompt"]
        if mode == "candidates":  # stock has no such mode, so there is no single prompt to compare
            assert result["same_prompt"] is None
        else:
            assert isinstance(result["same_prompt"], bool)
    # Short lists fit in one of stock's chunks, so its ranking is exact and the prompts must agree.
    assert all(payload["modes"][mode]["same_prompt"] for mode in ("fast", "classic", "best"))
    assert payload["labels"]["total"] > 0 and payload["load_s"]["stock"] > 0
    components = payload["ours_components"]
    assert components["caption_ms"] > 0 and components["image_embedding_ms"] > 0
    assert payload["first_fast_call_ms"] > 0
    # The fast caption decoder is on, and its tokens are generate()'s.
    assert components["caption_decoder"] == 1 and components["caption_same_tokens"] == 1
    assert components["caption_decode_ms"] > 0 and components["caption_generate_ms"] > 0
    assert components["chain_round_stock_ms"] > 0 and components["chain_round_ms"] > 0
    # Our chain round scores the same texts as the stock way, to float rounding.
    assert components["chain_round_max_abs_diff"] < 1e-4


def test_bot_bench_measures_lag_and_throughput(
    smoke_models: SmokeModels, smoke_cache: Path, labels_dir: Path, tmp_path: Path
) -> None:
    """bot.py times the event loop idle and under GPU work, then a crowd against a zero-cost engine."""
    json_out = tmp_path / "bot.json"
    argv = ["--device", "cpu", "--cache-dir", str(smoke_cache), "--labels", str(labels_dir),
            "--lag-s", "0.3", "--size", "64", "--steps", "1", "--batch", "1", "--members", "3",
            "--json-out", str(json_out)]  # fmt: skip
    figures = _headline(_run("bot.py", argv))
    assert set(figures) == {
        "lag_idle_p99_ms",
        "lag_busy_p99_ms",
        "lag_busy_max_ms",
        "interactions_per_s",
        "serving_lag_max_ms",
    }

    payload = json.loads(json_out.read_text(encoding="utf-8"))
    assert payload["benchmark"] == "bot" and payload["tick_ms"] == 10
    _environment_ok(payload["environment"])
    assert set(payload["environment"]["bot_versions"]) == {"discord.py", "aiohttp", "aiosqlite"}
    states = [row["state"] for row in payload["lag"]]
    assert states[0] == "idle" and states[1].startswith("GPU thread generating") and len(states) == 3
    for row in payload["lag"]:
        assert row["ticks"] > 0 and 0 <= row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
    assert payload["lag"][0]["work_runs"] == 0 and all(row["work_runs"] > 0 for row in payload["lag"][1:])
    throughput = payload["throughput"]
    # Three members, ten interactions and three jobs each, every one answered and delivered.
    assert (throughput["members"], throughput["interactions"], throughput["jobs"]) == (3, 30, 9)
    assert throughput["failures"] == [] and throughput["ack_p50_ms"] <= throughput["ack_max_ms"]
    assert throughput["gc_tracked_objects_at_start"] > 0
    assert all(pause >= 0 for pause in throughput["gc_full_collections_ms"])
    assert payload["headline"] == pytest.approx(figures, rel=0.01)


def test_load_bench_runs_the_crowd(
    smoke_models: SmokeModels, smoke_cache: Path, labels_dir: Path, tmp_path: Path
) -> None:
    """load.py runs the load test's crowd on the smoke models and reports acknowledgement times."""
    json_out = tmp_path / "load.json"
    argv = ["--device", "cpu", "--cache-dir", str(smoke_cache), "--labels", str(labels_dir),
            "--members", "3", "--spread-s", "0.2", "--json-out", str(json_out)]  # fmt: skip
    figures = _headline(_run("load.py", argv))
    assert set(figures) == {"ack_p50_ms", "ack_p99_ms", "ack_max_ms", "interactions_per_s"}

    payload = json.loads(json_out.read_text(encoding="utf-8"))
    assert payload["benchmark"] == "load" and payload["failures"] == []
    _environment_ok(payload["environment"])
    assert payload["settings"]["members"] == 3 and payload["settings"]["steps"] == 1
    assert payload["interactions"] == payload["answered"] == 30
    assert sum(payload["jobs"].values()) == 9 and set(payload["jobs"]) <= {"complete", "cancelled"}
    kinds = {row["kind"]: row["count"] for row in payload["ack_ms_by_kind"]}
    assert kinds["Generate"] == kinds["Reroll"] == kinds["/history"] == 3 and sum(kinds.values()) == 30
    overall = payload["ack_ms"]
    assert overall["count"] == 30 and overall["p50"] <= overall["p99"] <= overall["max"]
    assert payload["headline"] == pytest.approx(figures, rel=0.01)


def test_load_bench_runs_the_describe_flood(
    smoke_models: SmokeModels, smoke_cache: Path, labels_dir: Path, tmp_path: Path
) -> None:
    """load.py's describe flood serves every member, refuses the flooder's surplus and reports the waits."""
    json_out = tmp_path / "flood.json"
    argv = ["--scenario", "describe-flood", "--device", "cpu", "--cache-dir", str(smoke_cache),
            "--labels", str(labels_dir), "--flood", "8", "--flood-over-s", "0.3",
            "--json-out", str(json_out)]  # fmt: skip
    last = _run("load.py", argv).strip().splitlines()[-1]
    figures = {key: float(value) for key, value in (pair.split("=", 1) for pair in last.split())}
    ahead = {"describes_ahead_of_job", "describes_ahead_of_card"}
    assert set(figures) == {"other_card_s", "job_result_s", *ahead}
    assert figures["other_card_s"] > 0 and figures["job_result_s"] > 0, json_out.read_text()

    payload = json.loads(json_out.read_text(encoding="utf-8"))
    assert payload["benchmark"] == "load-describe-flood" and payload["failures"] == []
    _environment_ok(payload["environment"])
    assert payload["settings"]["flood"] == 8 and payload["settings"]["max_describes_per_user"] == 3
    members = payload["members"]
    flooder, other, imaginer = members["alice"], members["bob"], members["mod"]
    assert flooder["sent"] == 8 and flooder["served"] + flooder["refused"] == 8 and flooder["served"] >= 3
    assert (other["sent"], other["served"], imaginer["sent"], imaginer["served"]) == (1, 1, 1, 1)
    order = payload["gpu_order"]
    assert order.count("generate") == 1 and order.count("describe bob") == 1
    assert order.count("describe alice") == flooder["served"] and len(order) == flooder["served"] + 2
    assert payload["headline"] == pytest.approx(figures, rel=0.01)


def test_memory_bench_counts_weights_and_peaks_on_fake_cuda_tensors(tmp_path: Path) -> None:
    """memory.py builds the real architectures on fake CUDA tensors: exact weight sizes, ordered peaks."""
    json_out = tmp_path / "memory.json"
    argv = ["--batch", "2", "--size", "256", "--labels", "1000", "--json-out", str(json_out)]
    figures = _headline(_run("memory.py", argv))
    assert set(figures) == {"stock_peak_gib", "resident_gib", "peak_gib", "peak_sliced_gib"}
    payload = json.loads(json_out.read_text(encoding="utf-8"))
    weights = payload["weights_bytes"]
    # fp16, two bytes per parameter of the published architectures.
    assert weights["UNet"] == 2 * 859_520_964 and weights["VAE"] == 2 * 83_653_863
    assert weights["label table"] == 2 * 1000 * 768
    # Everything resident holds more than the pipeline alone; slicing lowers the peak.
    assert figures["stock_peak_gib"] < figures["resident_gib"] < figures["peak_sliced_gib"]
    assert figures["peak_sliced_gib"] < figures["peak_gib"]
    peaks = payload["activation_peak_bytes"]
    assert peaks["sliced"]["VAE decode, 2 images, sliced"] < peaks["ours"]["VAE decode, 2 images"]
    assert payload["headline"] == pytest.approx(figures, rel=0.01)


def test_memory_bench_measures_each_guide_sets_peak(
    smoke_models: SmokeModels, smoke_cache: Path, tmp_path: Path
) -> None:
    """memory.py --keep counts the weights each guide adds and measures each set's peak resident set in a
    batch from a source it has not seen; "alone" takes off the weights of the guides a set does not keep."""
    json_out = tmp_path / "memory-guides.json"
    argv = ["--device", "cpu", "--cache-dir", str(smoke_cache), "--keep", "none,edges,depth,look",
            "--batch", "1", "--size", "64", "--steps", "2", "--json-out", str(json_out)]  # fmt: skip
    figures = _headline(_run("memory.py", argv))
    sets = ["none", "edges", "depth", "look"]
    assert list(figures) == [f"{s}_{what}_gib" for s in sets for what in ("peak", "alone")] + [
        "guide_weights_gib"
    ]
    payload = json.loads(json_out.read_text(encoding="utf-8"))
    assert payload["benchmark"] == "memory-guides"
    assert payload["settings"]["memory"] == "process RSS (VmHWM)"
    weights = payload["weights_bytes"]
    assert list(weights) == ["generator", "edges", "depth", "look"]
    # The smoke ControlNet is the smoke UNet's encoder half; depth's adds the estimator.
    assert 0 < weights["edges"] < weights["depth"] < weights["generator"]
    assert weights["look"] > 0 and payload["loaded_bytes_measured"] > 0
    others = sum(weights.values()) - weights["generator"]
    assert figures["guide_weights_gib"] * 2**30 == pytest.approx(others, rel=0.01)
    rows = {row["keep"]: row for row in payload["rows"]}
    assert list(rows) == sets
    for keep, row in rows.items():
        assert row["peak_bytes"] > 0 and row["batch_s"] > 0
        assert row["over_none_bytes"] == row["peak_bytes"] - rows["none"]["peak_bytes"]
        assert row["alone_peak_bytes"] == row["peak_bytes"] - others + weights.get(keep, 0)
        assert figures[f"{keep}_alone_gib"] * 2**30 == pytest.approx(row["alone_peak_bytes"], rel=0.01)


@pytest.mark.skipif(redis_server_path() is None, reason="redis-server is not installed")
def test_scale_bench_runs_with_stub_workers() -> None:
    """scale.py runs a tiny workload on one and two stub workers and prints efficiency and fairness."""
    argv = ["--workers", "1,2", "--batch-s", "0.2", "--members", "4", "--jobs-per-member", "1"]
    out = _run("scale.py", argv)
    assert set(_headline(out)) == {"efficiency_2", "jain_min"}
    rows = [line.split() for line in out.splitlines() if line[:1].isdigit()]
    assert [(row[0], row[1], row[2]) for row in rows] == [("1", "8", "2"), ("2", "16", "4")]


def test_fidelity_bench_scores_each_guide_set_as_the_engine_does(
    smoke_models: SmokeModels, smoke_cache: Path, labels_dir: Path, tmp_path: Path, astronaut: Image.Image
) -> None:
    """fidelity.py reads the folders `i2p2i imagine-from` and `generate --source` write, groups their images
    by guide set and weight, and gives each image the fidelity the engine recorded for it and the CLIP
    similarity of its prompt's words; a moved source is found with --sources, and only with its own bytes."""
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
data_dir = "{tmp_path / "data"}"
[models]
preset = "smoke"
cache_dir = "{smoke_cache}"
device = "cpu"
[interrogate]
labels_dir = "{labels_dir}"
[generate]
steps = 2
width = 64
height = 64
min_side = 64
[guides]
enabled = ["layout", "edges"]
""",
        encoding="utf-8",
    )
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    astronaut.save(photos / "astronaut.png")
    source = str(photos / "astronaut.png")
    imagine = ["--config", str(config), "-q", "imagine-from", source, "-n", "2", "--seed", "5",
               "--mode", "fast"]  # fmt: skip
    assert cli([*imagine, "--out", str(out)]) == 0
    assert cli([*imagine, "--keep", "edges:0.9", "--out", str(out)]) == 0
    weighted = "a (red:1.2) fox in the snow"
    generate = ["--config", str(config), "-q", "generate", weighted, "-n", "2", "--seed", "5"]
    assert cli([*generate, "--source", source, "--keep", "layout:0.5", "--out", str(out / "generated")]) == 0

    payload = json.loads(_run("fidelity.py", ["--config", str(config), "--json", str(out)]))
    assert payload["benchmark"] == "fidelity" and payload["clip"] == "smoke:clip"
    assert payload["notes"] == [] and payload["problems"] == []
    sets = payload["sets"]
    assert [(s["keep"], s["guides"], s["images"], s["fidelity"]["n"]) for s in sets] == [
        ("none", [], 2, 2),
        ("edges:0.9", [{"name": "edges", "weight": 0.9}], 2, 2),
        ("layout:0.5", [{"name": "layout", "weight": 0.5}], 2, 2),
    ]
    images = {Path(i["file"]).relative_to(out).as_posix(): i for i in payload["images"]}
    assert {name: i["keep"] for name, i in images.items()} == {
        "astronaut.1.png": "none",
        "astronaut.2.png": "none",
        "astronaut_2.1.png": "edges:0.9",
        "astronaut_2.2.png": "edges:0.9",
        "generated/a-red-1-2-fox-in-the-snow.1.png": "layout:0.5",
        "generated/a-red-1-2-fox-in-the-snow.2.png": "layout:0.5",
    }
    # The engine's own score of each image imagine-from made, from the PNG instead of the decoded pixels.
    for name in ("astronaut.1.png", "astronaut.2.png", "astronaut_2.1.png", "astronaut_2.2.png"):
        record = json.loads((out / f"{name.split('.')[0]}.json").read_text(encoding="utf-8"))
        recorded = {i["file"]: i["fidelity"] for i in record["images"]}[name]
        assert images[name]["recorded_fidelity"] == recorded
        assert images[name]["fidelity"] == pytest.approx(recorded, abs=2e-3)
    # generate records no fidelity; the bench gives the same cosine, and adherence is to the prompt's words.
    clip = ClipEncoder.load(str(smoke_models.clip), torch.device("cpu"))
    source_embedding = clip.encode_images([open_image((photos / "astronaut.png").read_bytes())])[0]
    words = clip.encode_texts(["a red fox in the snow"])[0]
    for name, image in images.items():
        if not name.startswith("generated/"):
            continue
        assert image["recorded_fidelity"] is None and image["prompt"] == weighted
        with Image.open(out / name) as png:
            embedding = clip.encode_images([png.convert("RGB")])[0]
        assert image["fidelity"] == pytest.approx(float(embedding @ source_embedding), abs=1e-4)
        assert image["adherence"] == pytest.approx(float(embedding @ words), abs=1e-4)
    for s in sets:
        members = [i for i in images.values() if i["keep"] == s["keep"]]
        for score in ("fidelity", "adherence"):
            values = [i[score] for i in members]
            assert s[score]["mean"] == pytest.approx(sum(values) / len(values), abs=1e-5)
            assert s[score]["sd"] == pytest.approx(float(torch.tensor(values).std()), abs=1e-5)
    assert payload["headline"]["edges_0_9_fidelity"] == sets[1]["fidelity"]["mean"]
    assert payload["headline"]["layout_0_5_adherence"] == sets[2]["adherence"]["mean"]

    # The source moved away; a file of the same name with other bytes is not taken for it.
    moved, other = tmp_path / "moved", tmp_path / "other"
    photos.rename(moved)
    other.mkdir()
    astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(other / "astronaut.png")
    argv = ["--config", str(config), "--json", "--sources", str(other), "--sources", str(moved), str(out)]
    found = json.loads(_run("fidelity.py", argv))
    assert [i["fidelity"] for i in found["images"]] == [i["fidelity"] for i in payload["images"]]
    table, stderr = _run_both(
        "fidelity.py", ["--config", str(config), "--sources", str(other), str(out)], returncode=1
    )
    assert stderr.count("with the sha256 it records (give its folder with --sources DIR)") == 1
    rows = {line.split()[0]: line for line in table.splitlines()[3:6]}
    assert list(rows) == ["none", "edges:0.9", "layout:0.5"]
    for s in sets:
        # Fidelity is left out where the source is lost; adherence is not.
        assert rows[s["keep"]].split()[1:] == [
            "2", "n/a", f"{s['adherence']['mean']:.3f}", "±", f"{s['adherence']['sd']:.3f}"
        ]  # fmt: skip


def test_png_bench_encodes_the_same_files_both_ways() -> None:
    figures = _headline(_run("png.py", ["--batch", "3", "--size", "64", "--reps", "1"]))
    assert set(figures) == {"serial_s", "ours_s", "speedup"}

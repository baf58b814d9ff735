"""A batch meets what real folders and real machines do: odd file names, broken photos, a stage
worker that dies mid-photo, and the whole batch killed with SIGKILL then run again.

Real subprocesses on CPU: the built-in backends, the stand-in vLLM (tests/fake_vllm.py) whose
answers take a while (FAKE_VLLM_CHAT_DELAY) so that there is a photo in flight to kill.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from batch_fixture import (
    FAST,
    ROOT,
    VLM_LITE,
    alive,
    batch_argv,
    by_rel,
    children,
    make_photos,
    make_user_folder,
    planned_ahead,
    processes,
    read_batch,
    read_stats,
    run_batch,
    server_starts,
    stand_in_vllm,
    start_batch,
    survivors,
    temp_files,
    wait_for,
)

SAFE_RUN_DIR = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$")
LITE = ["--profile", "lite", "--lifter", "inflate", "--renderer", "cpu"]


# ---------------------------------------------------------------- a folder like a user's


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("my photos")
    expect = make_user_folder(folder)
    return folder, expect


def test_user_folder_statuses_errors_and_run_folders(user_folder, tmp_path: Path):
    folder, expect = user_folder
    out = tmp_path / "out"
    proc = run_batch(folder, out, *LITE, *FAST)
    assert proc.returncode == 1, f"some photos failed, the rest are done: exit 1\n{proc.stderr[-3000:]}"
    batch = read_batch(out)
    found = by_rel(batch, folder)
    assert set(found) == set(expect), f"photos found: {sorted(found)}; expected {sorted(expect)}"
    assert list(found) == sorted(found), "photos are listed sorted by relative path"
    for rel, want in expect.items():
        entry = found[rel]
        assert entry["status"] == want, (rel, entry)
        if want == "done":
            assert entry["error"] is None and entry["objects"] >= 1, (rel, entry)
            assert (out / entry["run_dir"] / "scene" / "scene.ply").is_file(), rel
        else:
            assert entry["error"] and "\n" not in entry["error"], (rel, entry)
    assert "truncated" in found["broken/cut.jpg"]["error"].lower() or "cannot" in found["broken/cut.jpg"]["error"].lower()
    assert "not an image" in found["broken/notes.jpg"]["error"].lower()
    run_dirs = [e["run_dir"] for e in batch["photos"]]
    assert len(set(run_dirs)) == len(run_dirs), "two photos share a run folder"
    for rd in run_dirs:
        assert SAFE_RUN_DIR.match(rd), f"unsafe run folder name {rd!r}"
        assert (out / rd).resolve().is_relative_to(out.resolve())
    # The same stem in two folders and in two formats, and a duplicate photo: each its own folder.
    assert len({found[r]["run_dir"] for r in ("holiday/beach.jpg", "work/beach.jpg", "holiday/beach.png")}) == 3
    assert found["holiday/sunset.png"]["run_dir"] != found["holiday/sunset copy.png"]["run_dir"]
    assert not temp_files(out)
    # Deterministic: another batch root gives the same run folders, and a rerun keeps them.
    proc2 = run_batch(folder, tmp_path / "out2", *LITE, *FAST)
    assert proc2.returncode == 1
    assert [e["run_dir"] for e in read_batch(tmp_path / "out2")["photos"]] == run_dirs
    proc3 = run_batch(folder, out, *LITE, *FAST)
    assert proc3.returncode == 1
    again = read_batch(out)
    assert [e["run_dir"] for e in again["photos"]] == run_dirs
    assert {e["image"]: e["status"] for e in again["photos"]} == {e["image"]: e["status"] for e in batch["photos"]}


def test_photo_list_file_resolves_relative_to_itself(user_folder, tmp_path: Path):
    folder, _ = user_folder
    listing = folder / "list.txt"
    listing.write_text("# two photos\nholiday/beach.jpg\n\n" + str(folder / "a b" / "ç été №1.JPG") + "\n")
    out = tmp_path / "out"
    try:
        proc = run_batch(listing, out, *LITE, *FAST)
    finally:
        listing.unlink()
    assert proc.returncode == 0, proc.stderr[-3000:]
    batch = read_batch(out)
    assert sorted(Path(e["image"]).name for e in batch["photos"]) == ["beach.jpg", "ç été №1.JPG"]
    assert {e["status"] for e in batch["photos"]} == {"done"}


def test_no_photos_and_both_image_flags_are_bad_input(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no photos here")
    proc = run_batch(empty, tmp_path / "out", *LITE, *FAST)
    assert proc.returncode == 2
    assert "no photos" in proc.stderr.lower()
    make_photos(tmp_path / "p", 1)
    proc = subprocess.run(
        [*batch_argv(tmp_path / "p", tmp_path / "out2", *LITE, *FAST), "--image", str(tmp_path / "p" / "photo_000.png")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--image" in proc.stderr and "--images" in proc.stderr


# ---------------------------------------------------------------- a stage worker killed mid-photo


def _stage_workers(stage: str, tmp_path: Path) -> dict[int, str]:
    """This test's stage workers (their argv names the stand-in's model folder under tmp_path; other
    batches may run on the same machine)."""
    return processes("pipeline", "worker", "--stage", stage, str(tmp_path))


def _batch_with_slow_vlm(tmp_path: Path, n_photos: int, *extra: str):
    """A driver started on n photos, the stand-in vLLM answering each request in 2 s (so a photo is
    in flight long enough to kill its worker): (driver, the stand-in's stats file, the stage 1
    workers that ran before it)."""
    photos = tmp_path / "photos"
    make_photos(photos, n_photos)
    flags, env = stand_in_vllm(tmp_path / "vllm", chat_delay=2.0)
    before = set(_stage_workers("stage1", tmp_path))
    driver = start_batch(photos, tmp_path / "out", *VLM_LITE, *FAST, *flags, *extra, env=env)
    return driver, tmp_path / "vllm" / "stats.jsonl", before


def test_stage_worker_killed_mid_photo_is_restarted_and_the_photo_retried(tmp_path: Path):
    driver, stats_path, before = _batch_with_slow_vlm(tmp_path, 3, "--vlm-concurrency", "1")
    try:
        # The driver plans ahead while the worker starts (its log says how many); the next VLM
        # request is the worker's own: a photo in flight there for 2 s.
        assert wait_for(lambda: planned_ahead(tmp_path / "out")[1] is not None, 120), "the driver did not plan ahead"
        ahead = planned_ahead(tmp_path / "out")[1]
        assert ahead is not None and 1 <= ahead < 3, ahead
        assert wait_for(lambda: sum(e["event"] == "chat" for e in read_stats(stats_path)) > ahead, 120), "the worker asked the VLM nothing"
        workers = set(_stage_workers("stage1", tmp_path)) - before
        assert len(workers) == 1, workers
        victim = workers.pop()
        os.kill(victim, signal.SIGKILL)
        restarted = wait_for(lambda: set(_stage_workers("stage1", tmp_path)) - before - {victim}, 60, 0.05)
        out, err = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert restarted, "the killed stage 1 worker was not restarted"
    assert driver.returncode == 0, err[-3000:]
    batch = read_batch(tmp_path / "out")
    assert {e["status"] for e in batch["photos"]} == {"done"}, batch["photos"]
    chats = [e for e in read_stats(stats_path) if e["event"] == "chat"]
    assert len(chats) == 4, "three photos planned once each, plus the killed one again"
    assert planned_ahead(tmp_path / "out") == (ahead, ahead), "the plans made ahead were used, not asked for again"
    assert server_starts(read_stats(stats_path)) == 1, "the vLLM server outlives a stage worker's crash"


def test_photo_that_keeps_killing_its_worker_is_marked_failed(tmp_path: Path):
    # The worker plans the photo itself (no plan made ahead): each attempt is a VLM request in flight there.
    driver, stats_path, before = _batch_with_slow_vlm(tmp_path, 1, "--max-attempts", "2", "--no-plan-ahead")
    killed: set[int] = set()
    try:
        # Every time a worker has the photo in flight, kill it (a photo that segfaults its worker).
        while driver.poll() is None:
            n = sum(1 for e in read_stats(stats_path) if e["event"] == "chat")
            if n > len(killed):
                for pid in set(_stage_workers("stage1", tmp_path)) - before - killed:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
            assert len(killed) <= 5, "the photo was retried without bound"
            wait_for(lambda: driver.poll() is not None, 0.1, 0.02)
        out, err = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 1, err[-3000:]
    assert len(killed) == 2, f"--max-attempts 2: {len(killed)} attempts"
    (entry,) = read_batch(tmp_path / "out")["photos"]
    assert entry["status"] == "failed"
    assert "signal 9" in entry["error"] and "\n" not in entry["error"], entry["error"]


# ---------------------------------------------------------------- the driver killed mid-batch, then resumed


def _kill_batch_when(driver: subprocess.Popen, ready, timeout: float, what: str) -> None:
    """Poll ready() every 50 ms (at most `timeout` s, else fail with `what`), then kill the whole
    batch: its process group, as a terminal's kill would. Killed also when the wait fails."""
    try:
        assert wait_for(ready, timeout, 0.05), what
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)


@pytest.mark.slow
def test_driver_killed_mid_batch_resumes_without_losing_anything(tmp_path: Path):
    photos = tmp_path / "photos"
    n = 6
    make_photos(photos, n)
    flags, env = stand_in_vllm(tmp_path / "vllm", chat_delay=1.0)
    stats_path = tmp_path / "vllm" / "stats.jsonl"
    out = tmp_path / "out"
    argv = batch_argv(photos, out, *VLM_LITE, *FAST, *flags, "--vlm-concurrency", "1")
    driver = subprocess.Popen(
        argv, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    _kill_batch_when(driver, lambda: len(list(out.glob("**/masks/masks.json"))) >= 2, 180, "stage 1 made no progress")
    # Whatever the driver had started goes away with it (workers see their stdin close and their
    # starter gone; the vLLM server dies with its launcher).
    seen = survivors(lambda: {**_stage_workers("stage1", tmp_path), **processes("fake_vllm.py", str(tmp_path))}, 60)
    assert not seen, f"processes outlived the killed batch: {seen}"
    finished = {p: p.stat().st_mtime_ns for p in out.glob("**/masks/masks.json")}
    chats_before = sum(1 for e in read_stats(stats_path) if e["event"] == "chat")
    assert 2 <= len(finished) < n
    # The same command finishes the rest.
    proc = subprocess.run(argv, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    batch = read_batch(out)
    assert len(batch["photos"]) == n and {e["status"] for e in batch["photos"]} == {"done"}, batch["photos"]
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime, f"finished stage 1 work was redone: {path}"
    chats_after = sum(1 for e in read_stats(stats_path) if e["event"] == "chat") - chats_before
    assert chats_after <= n - len(finished) + 1, "photos planned before the kill were planned again"
    assert server_starts(read_stats(stats_path)) == 2, "one server per run of the batch"
    assert not temp_files(out), f"temporary files left: {temp_files(out)[:5]}"


@pytest.mark.slow
def test_driver_killed_during_stage_2_keeps_finished_photos(tmp_path: Path):
    photos = tmp_path / "photos"
    n = 6
    make_photos(photos, n)
    out = tmp_path / "out"
    # Turntables on the CPU renderer make stage 2 take a second or two per photo.
    argv = batch_argv(photos, out, *LITE, "--no-progress", "--gif-frames", "8", "--gif-size", "96", "--inflate-gaussians", "4000")
    driver = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def done_photos() -> list[dict]:
        try:
            return [e for e in read_batch(out)["photos"] if e["status"] == "done"]
        except (OSError, ValueError, KeyError):
            return []

    spawned: set[int] = set()  # the driver's children, gathered at every poll up to the kill
    _kill_batch_when(driver, lambda: spawned.update(children(driver.pid)) or len(done_photos()) >= 1, 300, "no photo finished")
    # Generous: a worker killed inside an fsync leaves only when the disk has answered.
    seen = survivors(lambda: alive(spawned), 60)
    assert not seen, f"stage workers outlived the killed batch: {seen}"
    done_before = done_photos()
    if len(done_before) == n:
        pytest.skip("the batch finished before it could be killed (machine too fast for this timing)")
    kept = {p: p.stat().st_mtime_ns for e in done_before for p in (out / e["run_dir"]).glob("objects/*/gaussians.pt")}
    assert kept
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {e["status"] for e in read_batch(out)["photos"]} == {"done"}
    for path, mtime in kept.items():
        assert path.stat().st_mtime_ns == mtime, f"a finished object was redone: {path}"
    assert not temp_files(out), f"temporary files left: {temp_files(out)[:5]}"

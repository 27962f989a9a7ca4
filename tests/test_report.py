"""`hvdscale report`: two short real runs compared in one HTML page with embedded plots, the
page rendered by headless Chromium, the PNGs read back; training curves in steps.jsonl; bad
input refused in one line with nothing half-written; `log.report: true` at the end of a run."""
import html
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from hvdscale.cli import main
from hvdscale.config import load_config
from hvdscale.engine.lr import plan_lr

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# 1024 examples; run A: 64 per step (16 steps/epoch), run B: 32 per step (32 steps/epoch)
SMALL = ["--set", "data.train_limit=1024", "--set", "data.test_limit=301",
         "--set", "batch.reference=64", "--set", "train.threads=1",
         "--set", "log.progress=false", "--set", "log.tensorboard=false",
         "--set", "lr.warmup_steps=4", "--set", "train.epochs=2",
         "--set", "train.eval_every_steps=8", "--set", "train.target_accuracy=0.5",
         "--set", "log.every_steps=4", "--set", "checkpoint.every_epochs=2"]
PNGS = ("accuracy_time.png", "accuracy_epochs.png", "accuracy_examples.png",
        "train_loss.png", "images_per_sec.png", "lr.png")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real one-process torch runs of the default recipe differing in the batch; run A
    writes its own report at the end (log.report: true) and knows its tau_ref."""
    base = tmp_path_factory.mktemp("runs")
    a, b = base / "batch64", base / "batch32"
    assert main(["train", "--no-horovod", *SMALL, "--set", "batch.per_worker=64",
                 "--set", "log.report=true", "--tau-ref", "3000", "--out", str(a)]) == 0
    assert main(["train", "--no-horovod", *SMALL, "--set", "batch.per_worker=32",
                 "--out", str(b)]) == 0
    return a, b


def summary_of(run):
    return read_jsonl(run / "metrics.jsonl")[-1]


def test_steps_file_holds_the_training_curves(runs):
    a, _ = runs
    steps = read_jsonl(a / "steps.jsonl")
    evals = [r for r in read_jsonl(a / "metrics.jsonl") if "event" not in r]
    # log.every_steps=4 over 32 steps (evaluations at multiples of 8 add no other points)
    assert [s["step"] for s in steps] == list(range(4, 33, 4))
    assert all(s["global_batch"] == 64 and s["workers"] == 1 for s in steps)
    assert all(np.isfinite(s["loss"]) and s["loss"] > 0 for s in steps)
    assert all(s["images_per_sec"] > 0 for s in steps[1:])
    # the lr is the schedule's, computed here from the recipe independently of the engine
    cfg = load_config(None, SMALL[1::2] + ["batch.per_worker=64"])
    plan = plan_lr(cfg, 64, 16, 32)
    assert [s["lr"] for s in steps] == pytest.approx([plan.schedule(s["step"] - 1)
                                                      for s in steps])
    # an evaluation's train_loss is the mean of the losses since the previous evaluation
    by_step = {s["step"]: s["loss"] for s in steps}
    for ev in evals:
        window = [by_step[ev["step"] - 4], by_step[ev["step"]]]
        assert ev["train_loss"] == pytest.approx(np.mean(window), rel=1e-5)
    recipe = json.loads((a / "recipe.json").read_text())
    assert recipe["batch"]["per_worker"] == 64 and recipe["name"] == "fashion_mnist_lamb"


def test_log_report_writes_the_runs_report_at_the_end(runs):
    a, _ = runs
    page = (a / "report" / "index.html").read_text()
    assert page.count("data:image/png;base64,") == len(PNGS)
    assert all((a / "report" / name).is_file() for name in PNGS)


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    return out


def test_pngs_read_back_as_real_plots(report):
    for name in PNGS:
        image = np.asarray(Image.open(report / name).convert("RGB"))
        assert image.shape[0] > 200 and image.shape[1] > 300, name
        # a plot: many colours, and the runs' two line colours (matplotlib's C0 and C1)
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50, name
        for color in ((0x1f, 0x77, 0xb4), (0xff, 0x7f, 0x0e)):
            assert (np.abs(image.astype(int) - color).sum(axis=2) < 30).sum() > 50, \
                (name, color)


def test_page_names_runs_by_what_differs(report, runs):
    page = (report / "index.html").read_text()
    assert "batch 64" in page and "batch 32" in page
    assert "hvdscale report: fashion_mnist_lamb" in page
    # torch in both: the framework does not label the curves
    assert ">torch<" not in page.split("<tbody>")[1].split("</td>")[0]


PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images].map(i => ({file: i.dataset.file, complete: i.complete,
                                                  width: i.naturalWidth, height: i.naturalHeight}));
  const rows = [...document.querySelectorAll("#runs tbody tr")].map(tr => {
    const row = {run: tr.dataset.run};
    tr.querySelectorAll("td[data-key]").forEach(td => { row[td.dataset.key] = td.textContent; });
    return row;
  });
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify({images, rows});
  document.body.appendChild(pre);
});
</script>"""


def chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (Debian package `chromium`; "
                    "launchers/install.sh installs it)")
    try:        # Ubuntu's `chromium` is a stub for a snap, which containers cannot run
        works = subprocess.run([exe, "--version"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        works = False
    if not works:
        pytest.skip(f"{exe} --version fails: no usable Chromium here")
    return exe


def headless(exe, profile, *args, timeout=120):
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_page_renders_in_headless_chromium_with_both_runs_numbers(report, runs, tmp_path):
    exe = chromium()
    probed = tmp_path / "probed.html"
    probed.write_text((report / "index.html").read_text().replace("</body>", PROBE + "</body>"))
    proc = headless(exe, tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom",
                    probed.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert '<pre id="probe">' in dom, dom[-2000:]
    probe = json.loads(html.unescape(dom.split('<pre id="probe">')[1].split("</pre>")[0]))
    images = probe["images"]
    assert sorted(i["file"] for i in images) == sorted(PNGS)
    for image in images:              # decoded, at the PNG's own size: no broken image
        assert image["complete"] and image["width"] > 300 and image["height"] > 200, image
        with Image.open(report / image["file"]) as png:
            assert (image["width"], image["height"]) == png.size
    rows = {row["run"]: row for row in probe["rows"]}
    assert len(rows) == 2
    for run in runs:
        summary, row = summary_of(run), rows[str(run)]
        assert row["final_accuracy"] == f"{summary['final_test_accuracy']:.4f}"
        assert row["best_accuracy"] == f"{summary['best_test_accuracy']:.4f}"
        assert row["steps"] == str(summary["steps"])
        assert row["global_batch"] == str(summary["global_batch"])
        assert row["workers"] == "1" and row["framework"] == "torch"
        assert row["images_per_sec"] == f"{summary['images_per_sec']:,.0f}"
        efficiency = summary["scaling_efficiency"]       # run A only: it has a tau_ref
        assert (efficiency is not None) == (run == runs[0])
        assert row["scaling_efficiency"] == (f"{efficiency:.3f}" if efficiency else "\u2013")
        steps_to_target = summary["steps_to_target"]
        assert row["steps_to_target"] == (str(steps_to_target) if steps_to_target else "\u2013")


def test_screenshot_is_not_blank(report, tmp_path):
    exe = chromium()
    shot = tmp_path / "page.png"
    proc = headless(exe, tmp_path / "profile", "--window-size=1400,1800",
                    "--hide-scrollbars", f"--screenshot={shot}",
                    (report / "index.html").as_uri())
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 100


def test_steps_logged_again_after_a_resume_keep_the_resumed_history():
    from hvdscale.report import replayed_steps_dropped
    # checkpoint at 8, lines up to 16, killed; resumed from 8: 12 and 16 again, then 20
    logged = [{"step": s, "session": 1} for s in (4, 8, 12, 16)] + \
             [{"step": s, "session": 2} for s in (12, 16, 20)]
    kept = replayed_steps_dropped(logged)
    assert [(r["step"], r["session"]) for r in kept] == [(4, 1), (8, 1), (12, 2), (16, 2),
                                                         (20, 2)]


def test_a_resumed_run_continues_its_steps_file(tmp_path):
    """Paused after 12 steps (checkpoint at 12), resumed to the end: one history 4..32."""
    out = tmp_path / "run"
    args = ["train", "--no-horovod", *SMALL, "--set", "batch.per_worker=64", "--out", str(out)]
    assert main([*args, "--stop-after-steps", "12"]) == 0
    assert [s["step"] for s in read_jsonl(out / "steps.jsonl")] == [4, 8, 12]
    assert main([*args, "--resume"]) == 0
    steps = read_jsonl(out / "steps.jsonl")
    assert [s["step"] for s in steps] == list(range(4, 33, 4))
    assert all(np.isfinite(s["loss"]) for s in steps)


# ------------------------------------------------------------------ bad input
def refused(capsys, *args):
    rc = main(["report", *map(str, args)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("hvdscale report: error: "), err
    return err


def test_a_directory_without_metrics_is_refused(tmp_path, capsys, runs):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    err = refused(capsys, runs[0], tmp_path / "empty", "--out", out)
    assert "empty: no metrics.jsonl" in err
    assert not out.exists()


def test_a_truncated_metrics_file_is_refused_and_nothing_is_written(tmp_path, capsys, runs):
    run = tmp_path / "cut"
    shutil.copytree(runs[1], run, ignore=shutil.ignore_patterns("report", "checkpoints"))
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text[:-40])      # a crash in the middle of a line
    out = tmp_path / "out"
    out.mkdir()
    err = refused(capsys, runs[0], run, "--out", out)
    lines = len(text.splitlines())
    assert f"metrics.jsonl line {lines}: not a whole JSON record" in err
    assert list(out.iterdir()) == []


def test_runs_of_different_recipes_are_refused(tmp_path, capsys, runs):
    other = tmp_path / "other"
    shutil.copytree(runs[1], other, ignore=shutil.ignore_patterns("report", "checkpoints"))
    records = read_jsonl(other / "metrics.jsonl")
    records[-1]["recipe"] = "imagenet_resnet50"
    (other / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    err = refused(capsys, runs[0], other, "--out", out)
    assert "runs of different recipes" in err and "imagenet_resnet50" in err
    assert not out.exists()
    # the user can insist
    assert main(["report", str(runs[0]), str(other), "--out", str(out), "--any-recipe"]) == 0
    assert (out / "index.html").is_file()

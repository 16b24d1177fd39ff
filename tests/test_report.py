"""The report of a fit run (``vldistill report RUN_DIR``): report.md with its pictures and one self-contained
report.html; and the pieces it draws from (loss terms on their own axes, per-class accuracy)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import torch

from vldistill.cli import main
from vldistill.data.sources import load_data
from vldistill.students import build_student
from vldistill.tokenization import train_wordpiece
from vldistill.train.fit import tokenizer_corpus
from vldistill.train.report import per_class_accuracy, plot_losses

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def fit_run(tmp_path_factory) -> Path:
    data = load_data("bundled:easyvqa", "train", ["en"], limit=256)
    torch.manual_seed(11)
    tok = train_wordpiece(tokenizer_corpus(data, ["en"]), vocab_size=300)
    teacher = tmp_path_factory.mktemp("teacher") / "model"
    build_student("test-clip", tok, projection_dim=24, **{"vision.hidden_size": 48}).save_pretrained(teacher)
    out = tmp_path_factory.mktemp("fit") / "run"
    args = ["fit", "dcclip", "--tiny", "--teacher", str(teacher), "--output", str(out), "--baseline"]
    assert main([*args, "--train.progress", "false", "--train.tensorboard", "false", "--train.log_every", "2"]) == 0
    return out


def test_report_of_a_fit_run_has_every_picture_and_a_self_contained_html(fit_run, tmp_path, capsys):
    assert main(["report", str(fit_run), "--output", str(tmp_path)]) == 0
    written = json.loads(capsys.readouterr().out)
    for name in ("report-losses", "report-accuracy", "report-classes", "report-examples"):
        png = Path(written[name])
        assert png.read_bytes().startswith(PNG) and png.stat().st_size > 10_000, name
    md = (tmp_path / "report.md").read_text()
    assert all(f"]({n}.png)" in md for n in ("report-losses", "report-classes", "report-examples"))
    assert "student:" in md and "baseline:" in md and "teacher:" in md  # the eval.json comparison
    page = (tmp_path / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 4 and all(base64.b64decode(x).startswith(PNG) for x in images)
    assert 'src="report' not in page and "http" not in page  # nothing outside the file


def test_report_names_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_each_loss_term_gets_its_own_axis(tmp_path):
    rows = [
        {"stage": "distill", "stage_index": 0, "step": 2, "fd_image": 1e-4, "xling": 0.02, "loss": 5.0, "lr": 1e-3},
        {"stage": "align", "stage_index": 1, "step": 2, "clip": 3.4, "clip/en": 3.3, "loss": 3.4},
    ]
    import matplotlib.pyplot as plt

    made = []
    real = plt.subplots

    def spy(*a, **k):
        fig, axes = real(*a, **k)
        made.append(axes)
        return fig, axes

    plt.subplots = spy
    try:
        plot_losses(
            {"student": rows, "baseline": [{"stage_index": 0, "step": 4, "clip": 3.0, "loss": 3.0}]}, tmp_path / "l.png"
        )
    finally:
        plt.subplots = real
    titles = [ax.get_title() for ax in made[0].flat if ax.get_title()]
    assert titles == ["clip", "fd_image", "xling", "loss (weighted total)"]  # sub-terms (clip/en) are not terms
    clip_ax = made[0].flat[0]
    assert {line.get_label() for line in clip_ax.get_lines()} == {"student", "baseline"}
    assert list(clip_ax.get_lines()[0].get_xdata()) == [4]  # stage 2's step 2 follows stage 1's last step 2


def test_per_class_accuracy_by_hand():
    assert per_class_accuracy([0, 1, 1, 2], [0, 1, 2, 2], 4) == [1.0, 1.0, 0.5, None]

import base64
import re

import pytest
from matplotlib import image as mimage

from pipeline.evaluation.report import (
    display_token,
    expert_colours,
    image_html,
    plot_bars,
    plot_expert_shares,
    plot_lines,
    plot_passkey,
    plot_repetition,
    plot_token_experts,
    table_html,
    token_experts_html,
    write_html,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_bytes=2000):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > min_bytes
    pixels = mimage.imread(path)
    assert pixels.shape[0] > 50 and pixels.shape[1] > 50
    assert pixels[..., :3].std() > 0.01  # something was drawn, not a blank canvas


@pytest.fixture
def routing_summary():
    shares = {"chat": [[0.4, 0.2, 0.2, 0.2]] * 3, "code": [[0.1, 0.1, 0.3, 0.5]] * 3}
    repetition = {"chat": {"same_first": [0.3, 0.4, 0.5], "topk_overlap": [0.6, 0.7, 0.8]},
                  "all": {"same_first": [0.3, 0.35, 0.4], "topk_overlap": [0.6, 0.65, 0.7]}}
    return shares, repetition


def test_every_plot_is_written_and_not_blank(tmp_path, routing_summary):
    shares, repetition = routing_summary
    paths = [
        plot_expert_shares(shares, [0, 2], tmp_path / "shares.png", title="base"),
        plot_repetition(repetition, {"same_first": 0.25, "topk_overlap": 5 / 6}, tmp_path / "rep.png"),
        plot_passkey({"lengths": [256, 512], "depths": [0.0, 0.5, 1.0], "trials": 2,
                      "accuracy": [[1.0, 0.5, 0.0], [0.0, 0.5, 1.0]]}, tmp_path / "passkey.png"),
        plot_lines({"sft vs base": [0.1, 0.2, 0.05]}, tmp_path / "tv.png", xlabel="layer", ylabel="TV",
                   title="routing shift"),
        plot_bars({"base": {"chat": 30.0, "code": 12.0}, "sft": {"chat": 20.0}}, tmp_path / "ppl.png",
                  ylabel="perplexity", title="held-out"),
        plot_token_experts(["\u2581The", "\u2581cost", "\u2581is", "\u2581$", "5", "<0x0A>", "\u2581ok"] * 20,
                           {0: [0, 1, 2, 3, 0, 1, 2] * 20, 2: [3, 3, 1, 0, 2, 2, 1] * 20}, 4,
                           tmp_path / "text.png", title="sample"),
    ]
    for path in paths:
        assert_png(path)


def test_display_token_reads_like_text():
    assert display_token("\u2581Hello") == " Hello"
    assert display_token("<0x0A>") == "\u21b5"
    assert display_token("<0xE2>") == "\u00b7"
    assert display_token("ing") == "ing"


def test_token_html_escapes_and_colours_by_expert():
    out = token_experts_html(["\u2581<b>", "\u2581&", "x"], [0, 1, 0], 4)
    assert "&lt;b&gt;" in out and "&amp;" in out and "<b>" not in out
    colours = expert_colours(4)
    assert out.count(colours[0]) == 2 and out.count(colours[1]) == 1
    assert len(set(expert_colours(8))) == 8 and len(set(expert_colours(16))) == 16


def test_html_embeds_images_and_tables(tmp_path, routing_summary):
    png = plot_expert_shares(routing_summary[0], [0], tmp_path / "s.png")
    page = write_html(tmp_path / "report.html", "Eval <tiny>", [
        ("Shares", image_html(png, "shares")),
        ("Table", table_html(["source", "ppl"], [["chat", 12.3456789], ["<code>", 3]])),
    ])
    text = page.read_text()
    assert "<title>Eval &lt;tiny&gt;</title>" in text
    embedded = re.search(r'src="data:image/png;base64,([^"]+)"', text).group(1)
    assert base64.b64decode(embedded) == png.read_bytes()
    assert "<td>12.35</td>" in text and "&lt;code&gt;" in text
    assert not (tmp_path / "report.html.tmp").exists()


def _pixels_of(path, colour: str) -> int:
    import numpy as np
    from matplotlib import colors as mcolors

    rgb = np.array(mcolors.to_rgb(colour))
    return int((np.abs(mimage.imread(path)[..., :3] - rgb).max(-1) < 0.05).sum())


def test_perplexities_orders_of_magnitude_apart_are_all_readable(tmp_path):
    # A random base (~32,000) next to SFT and DPO (~17): on a linear axis the tuned bars are < 1 pixel.
    ppl = {"base": {"chat": 32398.0, "code": 30000.0}, "sft": {"chat": 17.7, "code": 20.1},
           "dpo": {"chat": 17.5, "code": 19.0}}
    flat = plot_bars(ppl, tmp_path / "linear.png", ylabel="perplexity", title="t")
    log = plot_bars(ppl, tmp_path / "log.png", ylabel="perplexity", title="t", log_scale=True)
    assert _pixels_of(flat, "C1") < 500  # the legend swatch only
    for colour in ("C0", "C1", "C2"):
        assert _pixels_of(log, colour) > 3000, colour

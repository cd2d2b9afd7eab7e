"""The HTML report in a real browser: headless Chromium renders it, every image loads, and the
console stays clean. ``.ci/run`` installs Debian's ``chromium-headless-shell`` for it."""

import json
import re
import shutil
import subprocess

import pytest
import torch
from torch import nn

import normlab

BROWSER = next(
    (shutil.which(name) for name in ("chromium-headless-shell", "chromium", "google-chrome")
     if shutil.which(name)),
    None,
)  # fmt: skip

# installed first, in <head>: errors of the page and of its resources, then on load what the
# images did, written into the page for --dump-dom to show
PROBE = """<script>
window.normlabErrors = [];
window.addEventListener("error", e => window.normlabErrors.push(String(e.message || e.type)), true);
const consoleError = console.error;
console.error = (...args) => { window.normlabErrors.push(args.join(" ")); consoleError(...args); };
window.addEventListener("load", () => {
  const images = [...document.images];
  const result = {
    images: images.length,
    loaded: images.filter(i => i.complete && i.naturalWidth > 0).length,
    errors: window.normlabErrors,
    headings: [...document.querySelectorAll("h2")].map(h => h.textContent),
  };
  const pre = document.createElement("pre");
  pre.id = "normlab-probe";
  pre.textContent = JSON.stringify(result);
  document.body.appendChild(pre);
});
</script>"""


@pytest.mark.slow
@pytest.mark.skipif(BROWSER is None, reason="needs headless Chromium (.ci/run installs it)")
def test_a_report_of_dozens_of_layers_renders_in_chromium(tmp_path):
    torch.manual_seed(0)
    layers = [nn.Linear(16, 32, bias=False)]
    for _ in range(15):  # 46 recorded layers: each kind's view is a heatmap, not 46 lines
        layers += [nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 32, bias=False)]
    result = normlab.audit(nn.Sequential(*layers), torch.randn(64, 16))
    assert len(result.report.snapshot.layers) == 46
    page = result.to_html(tmp_path / "report.html").read_text()
    (tmp_path / "probed.html").write_text(page.replace("</head>", PROBE + "</head>", 1))
    dom = subprocess.run(
        [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
         "--dump-dom", (tmp_path / "probed.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    found = re.search(r'<pre id="normlab-probe">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    probe = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert probe["errors"] == []
    # propagation; per family (activations, normalizations, linear) a heatmap of the outputs
    # and one of their gradients; the weight gradients' heatmap
    assert probe["images"] == probe["loaded"] == 8
    assert "Every layer, by kind, at the last recording" in probe["headings"]

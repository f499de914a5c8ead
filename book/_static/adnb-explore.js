// The book's interactive figures without a kernel (adnb/interactive.py writes them): each control picks a
// position in its grid of values, and each view shows the precomputed frame whose key (the positions of the
// controls it depends on, comma-separated) is listed in the frame's data-keys. No network, no library.
(function () {
  "use strict";

  function setup(figure) {
    const controls = Array.from(figure.querySelectorAll(".adnb-explore-controls input, .adnb-explore-controls select"));
    const views = Array.from(figure.querySelectorAll(".adnb-explore-view"));
    function update() {
      const position = {};
      for (const control of controls) {
        position[control.name] = control.value;
        const shown = figure.querySelector(`output[for="${control.id}"]`);
        if (shown) shown.value = JSON.parse(control.dataset.labels)[Number(control.value)];
      }
      for (const view of views) {
        const key = view.dataset.controls.split(" ").map((name) => position[name]).join(",");
        for (const frame of view.querySelectorAll("img[data-keys]")) {
          frame.hidden = !frame.dataset.keys.split(" ").includes(key);
        }
      }
    }
    for (const control of controls) {
      control.addEventListener("input", update);
      control.addEventListener("change", update);
    }
    figure.querySelector(".adnb-explore-controls").addEventListener("submit", (event) => event.preventDefault());
    update();
  }

  function setupAll() {
    document.querySelectorAll("figure.adnb-explore").forEach(setup);
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", setupAll);
  else setupAll();
})();

// Runs the page's app.js against a minimal fake DOM; prints the task selection and the trained-on line.
const fs = require("fs");
const [appPath, healthJson, tasksJson] = process.argv.slice(2);
const els = {};
function el(id) {
  if (!els[id]) {
    els[id] = {
      id, textContent: "", value: "", className: "", hidden: false, style: {}, dataset: {}, children: [],
      listeners: {}, checked: false, files: [],
      append(...xs) { for (const x of xs) if (typeof x === "object") this.children.push(x); },
      replaceChildren() { this.children = []; },
      addEventListener(ev, f) { this.listeners[ev] = f; },
      get selectedOptions() { return this.children.filter((o) => o.value === this.value); },
    };
  }
  return els[id];
}
const docListeners = {};
global.document = {
  getElementById: el,
  createElement: () => ({ dataset: {}, style: {}, append() {}, addEventListener() {}, children: [] }),
  addEventListener: (ev, f) => { docListeners[ev] = f; },
};
global.window = {};
global.fetch = async (url) => ({ json: async () => JSON.parse(url === "/health" ? healthJson : tasksJson) });
eval(fs.readFileSync(appPath, "utf8"));
docListeners["DOMContentLoaded"]();
setTimeout(() => {
  const select = el("task");
  process.stdout.write(JSON.stringify({
    selected: select.value, options: select.children.map((o) => o.textContent),
    trained_on: el("trained-on").textContent, trained_on_class: el("trained-on").className,
  }));
}, 50);
